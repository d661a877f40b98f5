"""What every command shares: Hydra's config folder, the typed-config check, and logging.

Commands (all Hydra apps composed from conf/, so config groups such as `sink=s3` work for all):

    python -m pipeline                          harvest (pipeline/__main__.py, conf/config.yaml)
    python -m pipeline.outputs.postprocess      latent_stats, by_latent, examples (conf/postprocess.yaml)
    python -m pipeline.outputs.delphi_export    delphi latent cache (conf/delphi_export.yaml)
    python -m pipeline.outputs.browser          static HTML latent browser (conf/browser.yaml)
    python -m pipeline.verify                   committed shards against their markers (conf/verify.yaml)

Output goes through module loggers to stdout (conf/hydra/job_logging/pipeline.yaml);
`quiet=true` keeps warnings and errors only, `hydra.verbose=true` adds debug messages.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pipeline.config import BrowserConfig, DelphiExportConfig, PostprocessConfig, RunConfig, VerifyConfig

# Absolute: a relative config_path is resolved against the *calling module* when an app is not
# started with `python -m` (the `sae-harvest` console script, in-process sweeps in tests), and
# Hydra then looks for a Python package `conf` that does not exist.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# Each command's conf/<name>.yaml lists its schema first, so every group merges into a typed config.
SCHEMAS = {"run_schema": RunConfig, "postprocess_schema": PostprocessConfig,
           "delphi_export_schema": DelphiExportConfig, "browser_schema": BrowserConfig,
           "verify_schema": VerifyConfig}
for _name, _schema in SCHEMAS.items():
    ConfigStore.instance().store(name=_name, node=_schema)


def hydra_root(sink_root: str, local: str) -> str:
    """Where Hydra's run folder goes (conf/config.yaml): beside the output for a local sink; for an
    object store (`s3://...`) the local folder `local`, since Hydra writes with plain file I/O and
    would otherwise create a folder literally named `s3:`."""
    remote = "://" in sink_root and not sink_root.startswith("file://")
    return local if remote else sink_root


OmegaConf.register_new_resolver("hydra_root", hydra_root, replace=True)


def unknown_keys(node, schema, prefix: str = "") -> list[str]:
    """Keys in `node` that `schema` (a dataclass) does not declare. Hydra rejects `a.typo=1`, but
    `+a.typo=1` is allowed to add keys and OmegaConf.to_object would quietly keep them."""
    if not dataclasses.is_dataclass(schema) or not isinstance(node, DictConfig):
        return []
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    unknown = []
    for key in node:
        if key not in fields:
            unknown.append(f"{prefix}{key}")
            continue
        sub = node[key]
        if isinstance(sub, DictConfig):
            typ = hints[key]
            typ = next((a for a in typing.get_args(typ) if dataclasses.is_dataclass(a)), typ)  # Optional[X]
            unknown += unknown_keys(sub, typ, f"{prefix}{key}.")
    return unknown


def to_typed(dcfg: DictConfig, schema: type):
    """The typed config the code receives; any key `schema` does not declare is an error."""
    unknown = unknown_keys(dcfg, schema)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}: not declared in pipeline/config.py (typo?)")
    return OmegaConf.to_object(dcfg)


def setup_logging(quiet: bool = False) -> None:
    """Quiet: warnings and errors only. Outside Hydra (Ray workers, tests) also installs the
    same plain stdout handler Hydra's job_logging config gives the driver."""
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    if quiet:
        root.setLevel(logging.WARNING)
    elif root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)


def redact_hydra_files() -> None:
    """Hydra saved the composed config and the command line (.hydra/*.yaml, multirun.yaml) before
    calling us, credentials included: rewrite them masked, by the manifest's rule."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from pipeline.runtime.manifest import redact

    hc = HydraConfig.get()
    files = list((Path(hc.runtime.output_dir) / hc.output_subdir).glob("*.yaml")) if hc.output_subdir else []
    if hc.mode == RunMode.MULTIRUN:
        files.append(Path(hc.sweep.dir) / "multirun.yaml")
    for f in files:
        if f.is_file():
            data = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
            clean = redact(data)
            if clean != data:
                OmegaConf.save(OmegaConf.create(clean), f)


# Hydra flags that print the composed config and exit before the app runs.
SHOW_CONFIG_FLAGS = ("--cfg", "-c", "--info", "-i")


def run_app(app: Callable[[], None]) -> None:
    """Run a Hydra app; when it only shows the config (`--cfg job`, `--info`), mask credentials
    in what it prints, since a value given on the command line (`sink.storage_options.secret=...`)
    would otherwise be printed as typed."""
    if not any(a in SHOW_CONFIG_FLAGS or a.startswith(("--cfg=", "--info=")) for a in sys.argv[1:]):
        app()
        return
    import contextlib
    import io

    import yaml

    from pipeline.runtime.manifest import redact, redact_text

    shown = io.StringIO()
    try:
        with contextlib.redirect_stdout(shown):
            app()
    finally:
        text = shown.getvalue()
        try:  # `--cfg`: YAML, masked value by value so it stays valid YAML
            data = yaml.safe_load(text)
        except yaml.YAMLError:
            data = None
        text = yaml.safe_dump(redact(data), sort_keys=False) if isinstance(data, dict) else redact_text(text)
        sys.stdout.write(text)


def command(config_name: str, schema: type, body: Callable[[typing.Any], None]) -> Callable[[], None]:
    """A Hydra app over conf/<config_name>.yaml that hands `body` the typed, checked config."""

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name=config_name)
    def app(dcfg: DictConfig) -> None:
        redact_hydra_files()
        cfg = to_typed(dcfg, schema)
        setup_logging(cfg.quiet)
        body(cfg)

    return lambda: run_app(app)

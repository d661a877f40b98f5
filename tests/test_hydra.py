"""The Hydra app's contract: every preset composes into a typed RunConfig, mistakes fail before any
work (in the compose API and on the real command line), and `--cfg job` shows no secrets."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline.__main__ import to_run_config  # also registers the `run_schema` structured config
from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["model", "sae", "corpus", "sink", "cluster", "experiment"]


def _compose(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_run_config(cfg)


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_preset_composes_into_the_typed_config(group, option):
    cfg = _compose([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    if group != "experiment":
        assert type(getattr(cfg, group)).__name__.endswith("Config")


def _leaves(node, prefix: tuple = ()) -> dict[tuple, object]:
    if isinstance(node, dict) and node:
        return {k: v for key, sub in node.items() for k, v in _leaves(sub, (*prefix, key)).items()}
    return {prefix: node}


@pytest.mark.parametrize("name", [p.stem for p in sorted((CONF / "experiment").glob("*.yaml"))])
def test_experiment_preset_composes_what_its_yaml_says(name):
    """An experiment = its group choices + its own values, and nothing else changed: compared
    with composing those group choices on the command line under experiment=none."""
    spec = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text()) or {}
    groups = {}
    for entry in spec.pop("defaults", []):
        (key, option), = entry.items()
        assert key.startswith("override /"), entry
        groups[key.removeprefix("override /")] = option
    cfg = asdict(_compose([f"experiment={name}"]))
    base = asdict(_compose(["experiment=none", *[f"{g}={o}" for g, o in groups.items()]]))
    own = _leaves(spec) if spec else {}
    got, want = _leaves(cfg), _leaves(base)
    for path, value in own.items():
        node = cfg
        for key in path:
            node = node[key]
        assert node == value, (path, node, value)
    # A path the preset sets, or one above or below it (`demo: null` replaces the whole `demo` node).
    covered = lambda path: any(path[:len(p)] == p or p[:len(path)] == path for p in own)  # noqa: E731
    assert {p: v for p, v in got.items() if not covered(p)} == {p: v for p, v in want.items() if not covered(p)}
    if name != "none":  # a preset that changes nothing would be a copy of `none`
        assert own or groups
        assert cfg != asdict(_compose(["experiment=none"]))


def test_presets_set_what_they_promise():
    nightly = _compose(["experiment=nightly"])
    assert nightly.run_id == "nightly" and nightly.fail_on_quarantine and nightly.demo is None
    assert nightly.cluster.address == "auto" and nightly.corpus.name == "files" and nightly.corpus.max_tokens is None
    # The command line still wins over the preset's group choices.
    local = _compose(["experiment=nightly", "cluster=local", "sink=local"])
    assert local.cluster.address is None and local.sink.root == "./out"
    plain = _compose(["experiment=none"])
    assert plain.demo is None and plain.corpus.max_tokens is None and not plain.fail_on_quarantine
    assert _compose([]).demo is not None  # the default stays `make demo`


@pytest.mark.parametrize("override", ["corpus.ctx_lenn=5", "+corpus.ctx_lenn=5", "+sink.secret=1", "cluster.gpus=1"])
def test_unknown_key_is_a_composition_error(override):
    # `+` may add keys in Hydra; the app's own check (to_run_config) still refuses undeclared ones.
    with pytest.raises((ConfigCompositionException, ValueError), match="ctx_lenn|secret|gpus"):
        _compose([override])


@pytest.mark.parametrize("override", ["corpus.ctx_len=abc", "cluster.num_workers=1.5", "fail_on_quarantine=maybe",
                                      "sae.hookpoints=layers.4"])
def test_wrong_type_is_an_error(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120, check=False)


def test_cli_rejects_typo_and_wrong_type_before_any_work(tmp_path):
    typo = _cli("corpus.ctx_lenn=5", f"sink.root={tmp_path}")
    assert typo.returncode != 0 and "ctx_lenn" in typo.stderr, typo.stderr
    added = _cli("+sink.aws_secret=x", f"sink.root={tmp_path}")
    assert added.returncode != 0 and "aws_secret" in added.stderr, added.stderr
    wrong = _cli("corpus.ctx_len=abc", f"sink.root={tmp_path}")
    assert wrong.returncode != 0 and "ctx_len" in wrong.stderr, wrong.stderr
    # Nothing started: no run folder (the `+` case reaches the app, so Hydra's log dir may exist).
    assert [p.name for p in tmp_path.iterdir()] in ([], ["_hydra"])


def test_cli_cfg_job_prints_resolved_config_without_secrets():
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    env = {"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE123",
           "AWS_SESSION_TOKEN": "session-" + secret, "SAE_HARVEST_S3_ROOT": "s3://nightly-bucket/harvest",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:5999"}
    out = _cli("sink=s3", "--cfg", "job", "--resolve", env=env)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.sink.root == "s3://nightly-bucket/harvest" and cfg.sink.endpoint_url == "http://127.0.0.1:5999"
    assert cfg.run_id == "demo" and cfg.corpus.ctx_len == 256
    for leaked in (secret, "AKIAEXAMPLE123"):
        assert leaked not in out.stdout + out.stderr


def test_cli_cfg_job_masks_credentials_given_on_the_command_line():
    """A credential typed as an override is printed masked by `--cfg job` (Hydra prints before our app runs)."""
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    out = _cli("sink=s3", f"+sink.storage_options.secret={secret}", "+sink.storage_options.key=AKIAEXAMPLE123",
               "--cfg", "job")
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.sink.storage_options.secret == "***" and cfg.sink.storage_options.key == "***", out.stdout
    assert cfg.corpus.ctx_len == 256  # the rest printed as composed
    for leaked in (secret, "AKIAEXAMPLE123"):
        assert leaked not in out.stdout + out.stderr

"""`python -m pipeline` / `sae-harvest`: the Hydra app.

    python -m pipeline                                # experiment=demo on the embedded default
    python -m pipeline run_id=nightly corpus=files 'corpus.paths=[s3://bucket/web/*.jsonl]' sink=s3
    python -m pipeline --cfg job                      # print the resolved config
    python -m pipeline -m 'sae.hookpoints=[layers.4],[layers.8]'   # a sweep: one run per member

Sweeps (`-m`): Hydra's basic launcher runs the members one after another in this process, each
calling `run()`. Every member gets its own run id, `<run_id>--<swept key=value,...>` (e.g.
`demo--sae.hookpoints=layers.4`), so members never share an output folder and rerunning the same
sweep resumes each member. Members that share corpus, tokenizer and ctx_len tokenize once
(`corpus.token_cache`). Sweeping `run_id` itself leaves ids as given.

Output: a progress line every few seconds and a summary at the end, through module loggers to
stdout (pipeline/cli.py). `quiet=true`: warnings and errors only; `hydra.verbose=true`: debug too.

Exit status: non-zero when the run raised, when `fail_on_quarantine` is set (the nightly
preset) and a document was quarantined, or when `verify` is set (the nightly preset) and a
committed shard does not match its commit marker (pipeline/outputs/verify.py). Runs that did something leave `summary.json` and
`_runs/<timestamp>.json` beside the manifest (pipeline/runtime/summary.py).
"""
from __future__ import annotations

import logging
import re
import sys
from datetime import datetime, timezone

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline.cli import CONF_DIR, redact_hydra_files, run_app, setup_logging, to_typed
from pipeline.config import RunConfig

log = logging.getLogger(__name__)

# Keys that never name a sweep member: Hydra's own, and the run id the member id is built from.
_NOT_IN_RUN_ID = re.compile(r"^(hydra\.|hydra/|run_id$)")


def to_run_config(dcfg: DictConfig) -> RunConfig:
    """The typed config the code receives; any key RunConfig does not declare is an error."""
    return to_typed(dcfg, RunConfig)


def _swept_keys(argv: list[str], sweeper_params: dict | None) -> set[str]:
    """Keys given more than one value on the command line (a,b / range / choice) or in hydra.sweeper.params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = set(sweeper_params or {})
    args = [a for a in argv if not a.startswith("-")]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001  Hydra already accepted these overrides; naming the member is best effort
        return keys
    return keys | {o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()}


def member_run_id(base: str, task_overrides: list[str], swept: set[str]) -> str:
    """`base--k1=v1,k2=v2` over this member's values of the swept keys; a safe folder name."""
    parts = []
    for item in sorted(task_overrides):
        key, _, value = item.partition("=")
        key = key.lstrip("+~")
        if _NOT_IN_RUN_ID.match(key) or (swept and key not in swept):
            continue
        value = re.sub(r"[\[\]'\" ]", "", value)  # [layers.4] -> layers.4
        parts.append(f"{key}={value}")
    if not parts:
        return base
    return base + "--" + re.sub(r"[^A-Za-z0-9._,=+-]", "_", ",".join(parts))


def _sweep_member_run_id(dcfg: DictConfig) -> str | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    params = hc.sweeper.get("params")
    params = OmegaConf.to_container(params) if params is not None else None
    swept = _swept_keys(sys.argv[1:], params)
    if "run_id" in swept:
        return None
    return member_run_id(dcfg.run_id, list(hc.overrides.task), swept)


def _record_failure(cfg: RunConfig, started: datetime, err: Exception) -> None:
    """Best effort: a failed run leaves summary.json with status "failed" for the nightly monitor."""
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.manifest import redact_text
    from pipeline.runtime.summary import RunSummary, summary_record, write_run_summary

    try:
        store = RunStore(cfg.sink, cfg.run_id)
        # A run that failed after doing work (poison shards, dispatch.ShardFailed) carries its summary.
        done = getattr(err, "summary", None) or RunSummary(cfg.run_id, store.url, hookpoints=list(cfg.sae.hookpoints))
        write_run_summary(store, summary_record(done, started_at=started, failures=1,
                                                error=redact_text(f"{type(err).__name__}: {err}")[:2000]))
    except Exception as also:  # noqa: BLE001  the original error is the one to report
        log.error(f"[{cfg.run_id}] could not record the failure: {also}")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(dcfg: DictConfig) -> None:
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.driver import run
    from pipeline.runtime.summary import summary_record, write_run_summary

    redact_hydra_files()
    member_id = _sweep_member_run_id(dcfg)
    if member_id is not None:
        dcfg.run_id = member_id
    cfg = to_run_config(dcfg)
    setup_logging(cfg.quiet)
    if member_id is not None:
        log.info(f"[sweep] member {cfg.run_id}")
    started = datetime.now(timezone.utc)
    try:
        summary = run(cfg)
    except Exception as err:
        _record_failure(cfg, started, err)
        raise
    log.info(summary.describe())
    write_run_summary(RunStore(cfg.sink, cfg.run_id), summary_record(summary, started_at=started))
    if cfg.demo is not None and summary.hookpoints:
        from pipeline.outputs.demo import show_top_contexts

        show_top_contexts(cfg, summary.hookpoints[0])  # a dictionary id (hookpoint or crosscoder=NAME)
    failed = []
    if cfg.verify:  # the nightly preset: check every committed shard against its marker
        from pipeline.outputs.verify import verify_run

        report = verify_run(RunStore(cfg.sink, cfg.run_id))
        (log.info if report.ok else log.error)(report.describe())
        if not report.ok:
            failed.append(f"[{cfg.run_id}] {report.describe()}")
    if cfg.fail_on_quarantine and (summary.quarantined or summary.shards_quarantined):
        failed.append(f"[{cfg.run_id}] {summary.quarantined} document(s) and {summary.shards_quarantined} shard(s) "
                      f"quarantined and fail_on_quarantine=true; see manifest.json 'quarantined' under {summary.output}")
    if failed:
        sys.exit("\n".join(failed))


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()

"""What a run did: `RunSummary` (counts), `Progress` (the live line) and the JSON record.

`RunSummary` is what `pipeline.runtime.driver.run` returns; a machine-readable copy of each
run that did something goes next to the manifest:

    {sink}/{run_id}/_runs/20261125T113214.123456Z.json   one per run (history, never rewritten)
    {sink}/{run_id}/summary.json                         the latest of them

Monitoring (the nightly CronJob, dashboards) reads `summary.json`; `_runs/` keeps the history.
A rerun with nothing to do writes nothing (the run folder stays byte-identical, see
docs/DESIGN.md), unless it failed or quarantined something, which is always worth a record.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from pipeline.outputs.layout import SUMMARY_KEY, run_history_key
from pipeline.outputs.sink import RunStore
from pipeline.sae import fvu

if TYPE_CHECKING:
    from pipeline.runtime.worker import ShardResult

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    output: str
    shards_done: int = 0
    shards_skipped: int = 0
    tokens: int = 0
    pairs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    quarantined: int = 0
    retries: int = 0  # shards redone after their worker died
    planned_bytes: int = 0  # corpus bytes fully planned so far (for the ETA)
    shards_by_node: dict[str, int] = field(default_factory=dict)
    setup_seconds: float = 0.0  # config checks, tokenizer, demo-SAE fitting: before any shard
    hookpoints: list[str] = field(default_factory=list)
    # hookpoint -> FVU check over this invocation's shards, token-weighted (pipeline/sae/fvu.py)
    fvu: dict[str, dict] = field(default_factory=dict)
    acts_overflow: int = 0  # activations saturated at the fp16 range (output.acts_dtype=float32 avoids)
    # shard id -> worker deaths charged to it (only shards that were alone on the dying worker)
    charged: dict[int, int] = field(default_factory=dict)
    poison_shards: list[dict] = field(default_factory=list)  # driver.poison_record of each
    shards_quarantined: int = 0  # set aside for killing workers, this run or earlier ones

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def account(self, result: ShardResult) -> None:
        """Add one shard's result (a shard a retried task found committed counts as skipped)."""
        if result.skipped:
            self.shards_skipped += 1
            return
        self.shards_done += 1
        self.shards_by_node[result.node] = self.shards_by_node.get(result.node, 0) + 1
        self.tokens += result.tokens
        self.pairs += result.pairs
        self.bytes += result.bytes
        if result.fvu:
            self.fvu = fvu.merge(self.fvu, result.fvu)
        self.acts_overflow += result.acts_overflow

    def describe(self) -> str:
        bpp = self.bytes / self.pairs if self.pairs else float("nan")
        return (
            f"run {self.run_id}: {self.shards_done} shards written, {self.shards_skipped} already committed; "
            f"{self.tokens:,} tokens, {self.pairs:,} (latent, act) pairs over {len(self.hookpoints)} hookpoint(s), "
            f"{self.bytes / 1e6:.1f} MB ({bpp:.2f} B/pair incl. contexts), {self.seconds:.1f}s extracting "
            f"(+{self.setup_seconds:.1f}s setup), {self.tokens_per_second:,.0f} tokens/s; "
            f"quarantined documents: {self.quarantined}, shard retries: {self.retries}"
            + (f"; {self.acts_overflow:,} activations beyond fp16 stored saturated (output.acts_dtype=float32)"
               if self.acts_overflow else "")
            + (f"; shards quarantined for killing their workers: {self.shards_quarantined}"
               if self.shards_quarantined else "") + "\n"
            + "".join(f"poison {describe_poison(p)}\n" for p in self.poison_shards)
            + "".join(f"FVU check {hook}: FVU {s['fvu']:.4f}, dead in sample {s['dead_fraction']:.4f} "
                      f"({s['tokens']:,} sampled tokens, {s['shards']} shards)\n" for hook, s in self.fvu.items())
            + f"output: {self.output}"
        )


class Progress:
    """One line every few seconds: shards done, tokens/s, ETA (from max_tokens or corpus bytes)."""

    def __init__(self, run_id: str, total_tokens: int | None, total_bytes: int, every: float = 5.0):
        self.run_id, self.total_tokens, self.total_bytes, self.every = run_id, total_tokens, total_bytes, every
        self.started = time.perf_counter()
        self.last = 0.0

    def update(self, summary: RunSummary, force: bool = False) -> None:
        """Log the progress line, at most once every `every` seconds unless `force`."""
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        rate = summary.tokens / elapsed if elapsed > 0 else 0.0
        if self.total_tokens:
            fraction = summary.tokens / self.total_tokens
        else:
            fraction = summary.planned_bytes / self.total_bytes if self.total_bytes else 0.0
        eta = max(0.0, elapsed * (1 - fraction) / fraction) if fraction > 0 else float("nan")
        eta_text = "?" if math.isnan(eta) else f"{eta:,.0f}s"
        log.info(f"[{self.run_id}] shards {summary.shards_done} done, {summary.shards_skipped} skipped | "
                 f"{summary.tokens:,} tokens | {rate:,.0f} tokens/s | ETA {eta_text}")


def summary_record(summary, *, started_at: datetime | None = None, failures: int = 0,
                   error: str | None = None) -> dict:
    """JSON-ready dict from a pipeline.runtime.driver.RunSummary (fields it lacks are reported as 0/None)."""
    finished = datetime.now(timezone.utc)
    seconds = float(getattr(summary, "seconds", 0.0))
    return {
        "run_id": summary.run_id,
        "output": summary.output,
        "status": "failed" if failures or error else "complete",
        "started_at": started_at.isoformat() if started_at else None,
        "finished_at": finished.isoformat(),
        "seconds": round(seconds, 3),
        "hookpoints": list(summary.hookpoints),
        "tokens": summary.tokens,
        "pairs": summary.pairs,
        "bytes": summary.bytes,
        "shards_new": summary.shards_done,
        "shards_skipped": summary.shards_skipped,
        "quarantined": summary.quarantined,
        "failures": failures,
        "retries": summary.retries,
        "charged_attempts": {str(k): v for k, v in getattr(summary, "charged", {}).items()},
        "poison_shards": list(getattr(summary, "poison_shards", [])),
        "shards_quarantined": getattr(summary, "shards_quarantined", 0),
        "acts_overflow": getattr(summary, "acts_overflow", 0),
        "tokens_per_second": round(summary.tokens / seconds, 1) if seconds > 0 else 0.0,
        "fvu": dict(getattr(summary, "fvu", {}) or {}),
        "error": error,
    }


def write_run_summary(store: RunStore, record: dict, *, always: bool = False) -> str | None:
    """Write `_runs/<UTC timestamp>.json` and `summary.json`; returns the history key or None.

    Skipped (returns None) when the run changed nothing and nothing went wrong, unless `always`.
    """
    idle = not (record["shards_new"] or record["quarantined"] or record.get("shards_quarantined")
                or record["failures"] or record["error"])
    if idle and not always:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    key = run_history_key(stamp)
    store.write_json(key, record)
    store.write_json(SUMMARY_KEY, record)
    return key


def describe_poison(rec: dict) -> str:
    """One line for a poison shard record (driver.poison_record): where it is and why it was set aside."""
    docs = ", ".join(rec["documents"][:5]) + (f", ... ({rec['n_documents']} in all)" if rec["n_documents"] > 5 else "")
    return (f"shard {rec['shard']} (seq_id {rec['seq_ids'][0]}-{rec['seq_ids'][1]}, {rec['file'] or 'in memory'}, "
            f"documents {docs}) {rec['reason']}")


def rerun_command(cfg, extra: str = "") -> str:
    """The command that runs `cfg` again (as typed, under Hydra; credentials masked), plus `extra`."""
    import shlex

    from pipeline.runtime.manifest import redact_text

    overrides = None
    try:
        from hydra.core.hydra_config import HydraConfig

        if HydraConfig.initialized():
            overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("run_id=")]
    except Exception:  # noqa: BLE001  not under Hydra: name the run and leave the settings to the user
        overrides = None
    args = [f"run_id={cfg.run_id}"] + ([shlex.quote(o) for o in overrides] if overrides is not None
                                       else ["<the same settings>"])
    return redact_text(" ".join(["python -m pipeline", *args, *([extra] if extra else [])]))

"""A machine-readable record of each run that did something, next to the manifest.

    {sink}/{run_id}/_runs/20261125T113214.123456Z.json   one per run (history, never rewritten)
    {sink}/{run_id}/summary.json                         the latest of them

Monitoring (the nightly CronJob, dashboards) reads `summary.json`; `_runs/` keeps the history.
A rerun with nothing to do writes nothing (the run folder stays byte-identical, see
DESIGN.md), unless it failed or quarantined something, which is always worth a record.
"""
from __future__ import annotations

from datetime import datetime, timezone

from pipeline.sink import RunStore


def summary_record(summary, *, started_at: datetime | None = None, failures: int = 0,
                   error: str | None = None) -> dict:
    """JSON-ready dict from a pipeline.run.RunSummary (fields it lacks are reported as 0/None)."""
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
        "failures": failures + int(getattr(summary, "failures", 0)),
        "retries": int(getattr(summary, "retries", 0)),  # RunSummary does not count these yet
        "tokens_per_second": round(summary.tokens / seconds, 1) if seconds > 0 else 0.0,
        "error": error,
    }


def write_run_summary(store: RunStore, record: dict, *, always: bool = False) -> str | None:
    """Write `_runs/<UTC timestamp>.json` and `summary.json`; returns the history key or None.

    Skipped (returns None) when the run changed nothing and nothing went wrong, unless `always`.
    """
    idle = not record["shards_new"] and not record["quarantined"] and not record["failures"] and not record["error"]
    if idle and not always:
        return None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    key = f"_runs/{stamp}.json"
    store.write_json(key, record)
    store.write_json("summary.json", record)
    return key

"""The driver: prepare -> plan -> dispatch -> finalize.

    prepare   pipeline/runtime/preflight.py   corpus files, tokenizer, SAEs checked against the model
    plan      plan_run (here)                 shards still to do, in ledger order (runtime/ledger.py),
                                              tokenized and packed as a stream (data/)
    dispatch  pipeline/runtime/dispatch.py    harvest actors: harvest + encode + write + commit marker
    finalize  pipeline/runtime/manifest.py    manifest "complete"; the summary goes back to the CLI

The driver holds only the shards in flight and a sorted array of committed shard ids, so its
memory does not grow with the corpus. Re-running a run id skips committed shards; a run with
nothing left to do changes no file.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import numpy as np

from pipeline.config import RunConfig
from pipeline.data.corpus import CorpusError, CorpusFile, Quarantined
from pipeline.data.packing import Shard
from pipeline.data.token_cache import cached_plan_shards
from pipeline.outputs.sink import RunStore
from pipeline.runtime.dispatch import ray_dispatcher
from pipeline.runtime.ledger import FileRecord, Ledger
from pipeline.runtime.manifest import close_run, open_run
from pipeline.runtime.preflight import prepare
from pipeline.runtime.summary import Progress, RunSummary
from pipeline.runtime.worker import ShardPayload

log = logging.getLogger(__name__)


def run(cfg: RunConfig, dispatcher=None) -> RunSummary:
    """Extract latents for `cfg`; resumable: a second call with the same run id does only what is left.

    `dispatcher`: anything with RayDispatcher's methods (bench/driver.py passes an in-process one);
    default: a pool of Ray harvest actors, started only once there is a shard to do."""
    store = RunStore(cfg.sink, cfg.run_id)
    prep = prepare(cfg)
    open_run(store, prep.manifest)

    started = time.perf_counter()
    ledger = Ledger(store)
    committed = np.asarray(store.committed_shards(), dtype=np.int64)
    summary = RunSummary(cfg.run_id, store.url, hookpoints=list(prep.sae_by_hook), setup_seconds=prep.seconds)
    progress = Progress(cfg.run_id, cfg.corpus.max_tokens, sum(f.size for f in prep.files))

    def account(block: bool) -> None:
        for result in dispatcher.completed(block=block):
            summary.account(result)
        progress.update(summary)

    try:
        for shard in plan_run(cfg, prep.files, ledger, committed, prep.tokenizer, prep.corpus_storage, summary):
            if dispatcher is None:
                dispatcher = ray_dispatcher(cfg, prep.sae_by_hook)
                log.info(f"[{cfg.run_id}] {cfg.cluster.num_workers} harvest worker(s); writing to {store.url}")
            while not dispatcher.has_room():
                account(block=True)
            dispatcher.submit(to_payload(shard))
            account(block=False)
        while dispatcher is not None and dispatcher.pending():
            account(block=True)
    finally:
        if dispatcher is not None:
            summary.retries = dispatcher.retries
            dispatcher.close()

    summary.seconds = time.perf_counter() - started
    ledger.compact()  # next start-up reads one snapshot (runtime/ledger.py); no-op if nothing changed
    close_run(store, prep.manifest, ledger.summary(), ledger.quarantined(), fvu_check=summary.fvu,
              acts_overflow=summary.acts_overflow)
    progress.update(summary, force=True)
    return summary


def plan_run(cfg: RunConfig, files: list[CorpusFile], ledger: Ledger, committed: np.ndarray, tokenizer,
             storage_opts: dict | None, summary: RunSummary) -> Iterator[Shard]:
    """Shards still to do, in ledger order: known files first (same shards as before), then new
    files after every known shard. Skipped shards are counted in `summary`, not yielded."""
    current = {f.url: f for f in files}
    known = []
    for rec in ledger.in_order():
        f = current.get(rec.url)
        if f is None:
            log.info(f"[{cfg.run_id}] {rec.url} is no longer in the corpus; its {rec.n_shards} committed shard(s) stay")
            continue
        if f.fingerprint != rec.fingerprint:
            if cfg.corpus.on_changed_file == "error":
                raise CorpusError(
                    f"{rec.url} changed since run {cfg.run_id!r} planned it (fingerprint {rec.fingerprint} -> "
                    f"{f.fingerprint}); use a new run_id, or corpus.on_changed_file=skip to keep the earlier output"
                )
            log.warning(f"[{cfg.run_id}] {rec.url} changed; keeping its earlier output (corpus.on_changed_file=skip)")
            continue
        known.append((f, rec))
    new = [f for f in files if f.url not in ledger.records]
    budget = cfg.corpus.max_tokens

    def is_committed(shard_id: int) -> bool:
        pos = np.searchsorted(committed, shard_id)
        return bool(pos < len(committed) and committed[pos] == shard_id)

    for f, rec in known + [(f, None) for f in new]:
        if budget is not None and budget <= 0:
            return
        if rec is None:
            rec = FileRecord(ordinal=ledger.next_ordinal(), url=f.url, fingerprint=f.fingerprint,
                             first_shard=ledger.next_shard(int(committed[-1]) if len(committed) else -1))
            ledger.save(rec)  # first shard fixed before any of the file's shards is submitted
        elif rec.complete and all(is_committed(s) for s in range(rec.first_shard, rec.last_shard + 1)):
            summary.shards_skipped += rec.n_shards
            if budget is not None:
                budget -= rec.tokens
            continue
        file_cfg = dataclasses.replace(cfg.corpus, max_tokens=budget)
        quarantined: list[dict] = []

        def on_quarantine(q: Quarantined, quarantined: list[dict] = quarantined) -> None:
            quarantined.append(dataclasses.asdict(q))
            log.warning(f"[{cfg.run_id}] quarantined {q.file} {q.location}: {q.reason}")

        contexts = tokens = 0
        last = None
        for shard in cached_plan_shards([f], file_cfg, tokenizer, tokenizer.eos_token_id, storage_options=storage_opts,
                                 on_quarantine=on_quarantine, first_shard=rec.first_shard):
            last = shard.shard_id
            contexts += len(shard.contexts)
            n_tokens = sum(len(c.token_ids) for c in shard.contexts)
            tokens += n_tokens
            if is_committed(shard.shard_id):
                summary.shards_skipped += 1
            else:
                rec = ledger.reserve(rec, shard.shard_id)  # durable before the shard is submitted
                yield shard
        summary.quarantined += len(quarantined)
        summary.planned_bytes += f.size
        truncated = budget is not None and tokens >= budget
        rec = dataclasses.replace(rec, last_shard=last if last is not None else rec.first_shard - 1,
                                  contexts=contexts, tokens=tokens, complete=not truncated,
                                  quarantined=quarantined)
        ledger.save(rec)
        if budget is not None:
            budget -= tokens


def to_payload(shard: Shard) -> ShardPayload:
    return ShardPayload(shard.shard_id, shard.seq_start, [c.doc_id for c in shard.contexts],
                        [int(c.doc_offset) for c in shard.contexts], [c.token_ids for c in shard.contexts])

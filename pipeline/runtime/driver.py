"""The driver: prepare -> plan -> dispatch -> finalize.

    prepare   pipeline/runtime/preflight.py   corpus files and SAEs checked against the model (no tokenizer)
    plan      plan_run (here)                 shards still to do, in ledger order (runtime/ledger.py),
                                              from the metadata of tokenize tasks (runtime/staging.py)
    dispatch  pipeline/runtime/dispatch.py    harvest actors: harvest + encode + write + commit marker
    finalize  pipeline/runtime/manifest.py    manifest "complete"; the summary goes back to the CLI

The driver never loads the tokenizer and never holds a token: Ray tasks tokenize each file into
the run's staging area, the driver assigns shard ids from their counts and sends each harvest
actor a `ShardTask` (where its contexts are staged). It holds only the shards in flight, a window
of tokenize results and a sorted array of committed shard ids, so its memory does not grow with
the corpus. Re-running a run id skips committed shards; a run with
nothing left to do changes no file.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator

import numpy as np

from pipeline.config import RunConfig
from pipeline.data import token_cache
from pipeline.data.corpus import CorpusError, CorpusFile
from pipeline.outputs.layout import commit_key, quarantine_key
from pipeline.outputs.sink import RunStore
from pipeline.runtime.dispatch import PoisonShard, ShardFailed, TokenizePool, ray_dispatcher, ray_tokenize_pool
from pipeline.runtime.ledger import FileRecord, Ledger
from pipeline.runtime.manifest import close_run, open_run
from pipeline.runtime.preflight import prepare
from pipeline.runtime.staging import clear_staging
from pipeline.runtime.summary import Progress, RunSummary, describe_poison, rerun_command
from pipeline.runtime.worker import ShardTask

log = logging.getLogger(__name__)


def run(cfg: RunConfig, dispatcher=None, tokenize: Callable[[], TokenizePool] | None = None) -> RunSummary:
    """Extract latents for `cfg`; resumable: a second call with the same run id does only what is left.

    `dispatcher`: anything with RayDispatcher's methods (bench/driver.py passes an in-process one);
    default: a pool of Ray harvest actors, started once there is a shard to do or a file to tokenize.
    `tokenize`: makes the pool of tokenize tasks (default: Ray tasks, `dispatch.ray_tokenize_pool`),
    called only once there is a file to tokenize. The driver itself never loads the tokenizer."""
    if cfg.cluster.on_poison_shard not in ("fail", "quarantine"):
        raise ValueError(f"cluster.on_poison_shard={cfg.cluster.on_poison_shard!r}: use fail or quarantine")
    store = RunStore(cfg.sink, cfg.run_id)
    prep = prepare(cfg)
    previous = open_run(store, prep.manifest)
    # The tokenizer's record comes from the first tokenize task; a run that tokenizes nothing
    # keeps the one an earlier invocation recorded.
    tokenizer = {"info": (previous or {}).get("tokenizer")}

    started = time.perf_counter()
    ledger = Ledger(store)
    committed = np.asarray(store.committed_shards(), dtype=np.int64)
    # Shards an earlier run quarantined (cluster.on_poison_shard=quarantine) count as settled,
    # unless this run is asked to retry them.
    quarantined = np.setdiff1d(np.asarray(store.quarantined_shards(), dtype=np.int64), committed)
    retried = quarantined.tolist() if cfg.cluster.retry_quarantined else []
    if len(quarantined) and not retried:
        log.warning(f"[{cfg.run_id}] {len(quarantined)} quarantined shard(s) left alone "
                    f"(cluster.retry_quarantined=true retries them): {quarantined[:10].tolist()}")
        committed = np.union1d(committed, quarantined)
    summary = RunSummary(cfg.run_id, store.url, hookpoints=list(prep.sae_by_hook), setup_seconds=prep.seconds)
    progress = Progress(cfg.run_id, cfg.corpus.max_tokens, sum(f.size for f in prep.files))
    # Tokenize tasks run on other processes/nodes: the local token cache must be an absolute path.
    task_cfg = cfg
    if cfg.corpus.token_cache and "://" not in cfg.corpus.token_cache:
        task_cfg = dataclasses.replace(cfg, corpus=dataclasses.replace(
            cfg.corpus, token_cache=os.path.abspath(os.path.expanduser(cfg.corpus.token_cache))))
    used_staging = []

    def start_workers() -> None:
        nonlocal dispatcher
        if dispatcher is None:
            dispatcher = ray_dispatcher(cfg, prep.sae_by_hook)
            log.info(f"[{cfg.run_id}] {cfg.cluster.num_workers} harvest worker(s); writing to {store.url}")

    def make_pool() -> TokenizePool:
        used_staging.append(True)
        pool = (tokenize or (lambda: ray_tokenize_pool(task_cfg, prep.corpus_storage)))()
        # A file to tokenize means shards to do: the harvest actors load the model and SAEs while
        # the first files are tokenized, not after (actor creation returns at once).
        start_workers()
        return pool

    def account(block: bool) -> None:
        for result in dispatcher.completed(block=block):
            summary.account(result)
        progress.update(summary)

    plan = plan_run(cfg, prep.files, ledger, committed, make_pool, summary,
                    on_tokenizer=lambda info: tokenizer.update(info=info))
    poisoned = []
    try:
        for task in plan:
            start_workers()  # a known file's shard needs no tokenize task
            while not dispatcher.has_room():
                account(block=True)
            dispatcher.submit(task)
            account(block=False)
        while dispatcher is not None and dispatcher.pending():
            account(block=True)
        if dispatcher is not None and dispatcher.poisoned:  # every other shard is committed by now
            poisoned = [poison_record(store, p) for p in dispatcher.poisoned]
    finally:
        plan.close()  # stops tokenize tasks a max_tokens plan no longer needs
        if dispatcher is not None:
            summary.retries = dispatcher.retries
            summary.charged = dict(sorted(dispatcher.charged.items()))
            dispatcher.close()

    summary.seconds = time.perf_counter() - started
    summary.poison_shards = poisoned
    for shard_id in retried:  # quarantined by an earlier run: committed now, it is no longer set aside
        if store.exists(commit_key(shard_id)):
            store.remove(quarantine_key(shard_id))
    fail = bool(poisoned) and cfg.cluster.on_poison_shard == "fail"
    if poisoned and not fail:
        for rec in poisoned:
            store.write_json(quarantine_key(rec["shard"]), rec)
            log.error(f"[{cfg.run_id}] quarantined {describe_poison(rec)}; retry with: "
                      f"{rerun_command(cfg, 'cluster.retry_quarantined=true')}")
    if used_staging and not fail:
        clear_staging(store)  # every planned shard is settled: the staged tokens served their purpose
    ledger.compact()  # next start-up reads one snapshot (runtime/ledger.py); no-op if nothing changed
    prep.manifest["tokenizer"] = tokenizer["info"]
    shard_quarantine = [store.read_json(quarantine_key(i)) for i in store.quarantined_shards()]
    summary.shards_quarantined = len(shard_quarantine)
    close_run(store, prep.manifest, ledger.summary(), ledger.quarantined() + shard_quarantine,
              fvu_check=summary.fvu, acts_overflow=summary.acts_overflow,
              failed_shards=poisoned if fail else None)
    progress.update(summary, force=True)
    if fail:
        err = ShardFailed("\n".join(
            [f"[{cfg.run_id}] {describe_poison(rec)}" for rec in poisoned]
            + [f"every other shard is committed ({summary.shards_done} this run). Rerun to retry "
               f"{'it' if len(poisoned) == 1 else 'them'} (nothing else is redone): {rerun_command(cfg)}; "
               f"or finish without: {rerun_command(cfg, 'cluster.on_poison_shard=quarantine')}"]))
        err.summary = summary
        raise err
    return summary


def poison_record(store: RunStore, poison: PoisonShard) -> dict:
    """What the run records of a poison shard: where it is in the corpus and why it was set aside.
    `documents`: the documents its contexts start in (read back from the staging area)."""
    task = poison.task
    if isinstance(task, ShardTask):
        from pipeline.runtime.staging import read_shard

        try:
            doc_ids = read_shard(store, task.tokens_key, task.local, task.n_contexts)[0]
        except OSError as err:
            doc_ids = [f"(unreadable: {err})"]
        n, source = task.n_contexts, task.source
    else:
        doc_ids, n, source = list(task.doc_ids), len(task.token_ids), ""
    docs = list(dict.fromkeys(doc_ids))
    return {"shard": task.shard_id, "seq_ids": [task.seq_start, task.seq_start + n - 1], "file": source,
            "documents": docs[:100], "n_documents": len(docs), "attempts": poison.attempts,
            "reason": f"killed its worker {poison.attempts} time(s), alone on it; last: {poison.cause}"}


# A batch of planned files is made durable in one ledger write before any of its shards is
# submitted; it grows while tokenize results are already there, up to these limits.
BATCH_FILES = 1000
BATCH_SHARDS = 10_000


def plan_run(cfg: RunConfig, files: list[CorpusFile], ledger: Ledger, committed: np.ndarray,
             tokenize: Callable[[], TokenizePool] | None, summary: RunSummary,
             on_tokenizer: Callable[[dict], None] | None = None) -> Iterator[ShardTask]:
    """Shards still to do, in ledger order: known files first (same shards as before), then new
    files after every known shard. Skipped shards are counted in `summary`, not yielded.

    Files are tokenized by tasks (`tokenize()` makes the pool on first need; pipeline/runtime/staging.py),
    `cluster.tokenize_ahead` ahead; their results are taken in file order, so ids are assigned
    exactly as a sequential plan would: a file's first shard from the ledger, `corpus.max_tokens`
    cut at the context boundary plan_shards cuts at. What is yielded is a `ShardTask` (where the
    contexts are staged), never tokens. `on_tokenizer` gets the first result's tokenizer record."""
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
    size, ctx_len, max_tokens = cfg.corpus.shard_size, cfg.corpus.ctx_len, cfg.corpus.max_tokens
    if size <= 0:
        raise ValueError(f"corpus.shard_size={size} must be positive")
    if ctx_len <= 0:
        raise ValueError(f"ctx_len={ctx_len} must be positive (corpus.ctx_len)")

    def is_committed(shard_id: int) -> bool:
        pos = np.searchsorted(committed, shard_id)
        return bool(pos < len(committed) and committed[pos] == shard_id)

    def all_committed(first: int, last: int) -> bool:  # `committed` is sorted and unique: count, don't walk
        return int(np.searchsorted(committed, last, "right") - np.searchsorted(committed, first)) == last - first + 1

    def done(rec: FileRecord | None, budget: int | None) -> bool:
        """Finished and committed: nothing to tokenize. A file cut by `corpus.max_tokens` is
        finished when the budget left for it is no more than what it gave (a larger one reads on)."""
        if rec is None or rec.last_shard is None:
            return False
        finished = rec.complete or (budget is not None and rec.tokens >= budget)
        return finished and all_committed(rec.first_shard, rec.last_shard)

    order = known + [(f, None) for f in new]
    pool: TokenizePool | None = None
    jobs: dict[int, int] = {}  # index in `order` -> pool job (files that need tokenizing)
    budget = max_tokens
    for i, (f, rec) in enumerate(order):  # a file needs tokenizing unless finished and committed
        if budget is not None and budget <= 0:
            break
        if done(rec, budget):
            if budget is not None:
                budget -= rec.tokens
            continue
        if pool is None:
            pool = tokenize()
        jobs[i] = pool.add(f, max_tokens)  # a single file never needs more than the whole budget
    budget = max_tokens
    batch_recs: list[FileRecord] = []
    batch_files: list[tuple[FileRecord, str, int]] = []  # (record, staged key, contexts planned)
    batch_shards = 0

    def shard_tasks() -> Iterator[ShardTask]:
        # Made at submit time, one at a time: a file of a million shards is not a list of them.
        for rec, key, n in batch_files:
            for local in range(rec.n_shards):
                shard_id = rec.first_shard + local
                if is_committed(shard_id):
                    summary.shards_skipped += 1
                else:
                    yield ShardTask(shard_id, shard_id * size, key, local, min(size, n - local * size), rec.url)

    try:
        for i, (f, rec) in enumerate(order):
            if budget is not None and budget <= 0:
                break
            if i not in jobs:
                summary.shards_skipped += rec.n_shards
                if budget is not None:
                    budget -= rec.tokens
                continue
            # Flush the batch before blocking on a result that is not there yet: its shards can run.
            if batch_recs and (not pool.ready(jobs[i]) or len(batch_recs) >= BATCH_FILES
                               or batch_shards >= BATCH_SHARDS):
                ledger.save_many(batch_recs)  # durable before any of these shards is submitted
                yield from shard_tasks()
                batch_recs, batch_files, batch_shards = [], [], 0
            meta = pool.result(jobs[i])
            if on_tokenizer is not None:
                on_tokenizer(meta["tokenizer"])
                on_tokenizer = None
            if meta.get("cache") in ("hit", "staged"):
                token_cache.stats["hits"] += 1
            else:
                token_cache.stats["misses"] += 1
            # The same cut plan_shards makes: after the first context at which the budget is reached.
            # Every context but the file's last is ctx_len tokens, so the counts decide it.
            n = meta["contexts"]
            if budget is not None:
                n = min(n, -(-budget // ctx_len))
            tokens = meta["tokens"] if n == meta["contexts"] else n * ctx_len
            truncated = budget is not None and tokens >= budget
            quarantined = [{k: v for k, v in q.items() if k != "before_context"} for q in meta["quarantined"]
                           if not truncated or q["before_context"] < n]
            for q in quarantined:
                log.warning(f"[{cfg.run_id}] quarantined {q['file']} {q['location']}: {q['reason']}")
            if rec is None:
                rec = FileRecord(ordinal=ledger.next_ordinal(), url=f.url, fingerprint=f.fingerprint,
                                 first_shard=ledger.next_shard(int(committed[-1]) if len(committed) else -1))
            n_shards = -(-n // size)
            last = rec.first_shard + n_shards - 1
            reserved = rec.reserved_shard
            if n_shards:
                reserved = max(last, reserved if reserved is not None else -1)
            rec = dataclasses.replace(rec, last_shard=last, reserved_shard=reserved, contexts=n, tokens=tokens,
                                      complete=not truncated, quarantined=quarantined)
            ledger.remember(rec)  # in memory now (the next file's first shard comes after it), durable below
            batch_recs.append(rec)
            batch_files.append((rec, meta["key"], n))
            batch_shards += n_shards
            summary.quarantined += len(quarantined)
            summary.planned_bytes += f.size
            if budget is not None:
                budget -= tokens
        if batch_recs:
            ledger.save_many(batch_recs)
            yield from shard_tasks()
    finally:
        if pool is not None:
            pool.close()

"""Post-processing for autointerp: latent_stats, the by_latent inverted index, and examples.

    python -m pipeline.outputs.postprocess run_id=demo [sink=s3] [sink.root=s3://bucket/runs] [bucket_size=65536] ...

A map / shuffle / reduce over COMMITTED shards only, as Ray tasks (the engine: pipeline/outputs/post_engine.py):

1. scatter, one task per new (hookpoint, shard): read the shard's latents part once (column
   projected), drop zero activations and split its pairs by bucket (bucket = latent_id //
   bucket_size), vectorised, into `_post/spill/hookpoint=H/bucket=B/shard=S.parquet`, then
   `_post/scatter/hookpoint=H/shard=S.json` (written last: the buckets it touched, its token
   count and the spill settings). A scattered shard is never read again.
2. bucket, one task per touched (hookpoint, bucket): the task lists its own spill folder (its
   contributors), skips itself if `_post/hookpoint=H/bucket=B.json` already records exactly those
   shards and settings, else reduces its spill parts within `task_memory_mb` (in latent ranges
   held in numpy; DuckDB out of core only for float32 acts), writing
   `by_latent/.../bucket=B/part-0.parquet`, `examples/.../bucket=B/part-0.parquet`, the bucket's statistics (`_post/stats/...`) and last the bucket marker.

The driver holds the committed shard ids, one bool per bucket and a bounded window of task refs;
it never reads a per-shard marker itself. `_post/hookpoint=H/stats.json` records the shards and
settings of the last complete pass: a rerun with nothing new starts no task, and a new shard
marks dirty only the buckets it touched. Then the driver streams the per-bucket statistics, one
bucket at a time, into `latent_stats/hookpoint=H/part-0.parquet` (density needs the total
token count, which any new shard changes). A crosscoder's latent_stats also get `dec_norm_frac`,
each latent's decoder-norm share per input, joined bucket by bucket (pipeline/outputs/dec_norms.py).
Output is deterministic: a total sort order, exact
integer sums, and example selection by rank and hash (post_engine's docstring has the spec).

Examples are stored by reference (issue 23): `examples/.../bucket=B/part-0.parquet` holds
(latent_id, kind, rank, seq_id, pos, act) per chosen activation; the window rule (window,
before = window // 2, after = window - window // 2 - 1, start = clamp(pos - before, 0,
max(len - window, 0))) is in the part's schema metadata, and pipeline/outputs/windows.py
(`read_windows`) cuts the token windows and their per-token acts from contexts/ and latents/
where they are read. kind=quantile: the latent's activations (descending) are cut into
n_quantiles equal-count groups, rank = group * per_quantile + j (group 0 = highest).
kind=random: windows where the latent is active nowhere (act 0).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import command
from pipeline.config import PostprocessConfig, SinkConfig
from pipeline.outputs.dec_norms import DecNormFractions
from pipeline.outputs.layout import (
    DEC_NORM_FRAC,
    DEC_NORM_INPUTS,
    MANIFEST_KEY,
    STATS_SCHEMA,
    bucket_marker_key,
    bucket_stats_key,
    by_latent_key,
    dictionary_ids,
    examples_key,
    latents_key,
    scatter_dir,
    scatter_marker_key,
    spill_dir,
    spill_key,
    stats_dir,
    stats_key,
    stats_schema,
    stats_state_key,
)
from pipeline.outputs.post_engine import (
    expand_ranges,
    reduce_bucket,
    spill_settings,
    split_pairs,
    write_spill,
)
from pipeline.outputs.sink import RunStore, with_retries
from pipeline.outputs.windows import window_start  # noqa: F401 - re-exported: the examples' window rule

log = logging.getLogger(__name__)


KINDS = ("top", "quantile", "random")


def to_ranges(ids: list[int]) -> list[list[int]]:
    """[0,1,2,5,6] -> [[0,2],[5,6]]: a bucket marker stays small when it covers a million shards."""
    out: list[list[int]] = []
    for i in sorted(ids):
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


# -- reading -------------------------------------------------------------------------------
def read_json_or_none(store: RunStore, key: str) -> dict | None:
    try:
        return store.read_json(key)
    except FileNotFoundError:
        return None


# -- pass 1: scatter -------------------------------------------------------------------------
def scatter_shard(store: RunStore, hook: str, shard: int, bucket_size: int, cfg: PostprocessConfig | None = None) -> dict:
    """Split one committed shard's active pairs by bucket (vectorised, see post_engine); marker last.
    An existing marker with the same spill settings means the shard is already scattered: returned as is."""
    cfg = cfg or PostprocessConfig(bucket_size=bucket_size)
    settings = spill_settings(cfg)
    done = read_json_or_none(store, scatter_marker_key(hook, shard))
    if done is not None and done.get("settings") == settings:
        return {**done, "scattered": False}
    t = store.read_committed_part(shard, latents_key(hook, shard), ["seq_id", "pos", "latent_ids", "acts"])
    pairs, parts = split_pairs(t, cfg)
    touched, counts = [], []
    for b, part in parts:
        write_spill(store, spill_key(hook, b, shard), part)
        touched.append(b)
        counts.append(part.num_rows)
    marker = {"shard": shard, "tokens": int(t.num_rows), "pairs": pairs, "buckets": touched, "bucket_pairs": counts,
              "settings": settings}
    store.write_json(scatter_marker_key(hook, shard), marker)  # last: the spill files are complete
    return {**marker, "scattered": True}


# -- pass 2: one bucket -------------------------------------------------------------------------
def bucket_settings(cfg: PostprocessConfig) -> dict:
    """The settings a bucket's outputs depend on: a change reruns the bucket."""
    skip = {"run_id", "sink", "hookpoints", "num_cpus", "task_memory_mb", "quiet", "logit_effects"}
    return {k: v for k, v in asdict(cfg).items() if k not in skip}


def spilled_shards(store: RunStore, hook: str, bucket: int, committed: np.ndarray) -> list[int]:
    """Committed shards with a spill part in this bucket: one listing, in the bucket's own task."""
    folder = store.path(spill_key(hook, bucket, 0).rsplit("/", 1)[0])
    try:
        names = with_retries(f"list {folder}", lambda: store.fs.ls(folder, detail=False), store.cfg.retries)
    except FileNotFoundError:
        return []
    store.fs.invalidate_cache(folder)
    ids = [int(n.rsplit("/", 1)[-1][len("shard="):-len(".parquet")]) for n in names
           if n.rsplit("/", 1)[-1].startswith("shard=") and n.endswith(".parquet")]
    ids = np.asarray(sorted(ids), np.int64)
    return ids[np.isin(ids, committed)].tolist()


def process_bucket(store: RunStore, hook: str, bucket: int, shards: list[int] | None, n_latents: int,
                   committed, cfg: PostprocessConfig) -> dict:
    """Rebuild one bucket (post_engine.reduce_bucket) unless its marker says it is current.
    shards=None: the contributors are the committed shards with a spill part here (listed by this task)."""
    committed = np.asarray(committed, np.int64)
    lo, hi = bucket * cfg.bucket_size, min((bucket + 1) * cfg.bucket_size, n_latents)
    if shards is None:
        shards = spilled_shards(store, hook, bucket, committed)
    done = read_json_or_none(store, bucket_marker_key(hook, bucket))
    if done and done["shards"] == to_ranges(shards) and done["settings"] == bucket_settings(cfg):
        return {**done, "skipped": True}
    keys = [spill_key(hook, bucket, s) for s in shards]
    pairs, stats, timings = reduce_bucket(store, hook, bucket, lo, hi, keys, committed, cfg,
                                 by_latent_key(hook, bucket), examples_key(hook, bucket))
    store.write_table(bucket_stats_key(hook, bucket), stats)
    marker = {"hookpoint": hook, "bucket": bucket, "latents": [lo, hi], "pairs": pairs,
              "shards": to_ranges(shards), "settings": bucket_settings(cfg)}
    store.write_json(bucket_marker_key(hook, bucket), marker)  # last
    return {**marker, "skipped": False, "seconds": timings}


# -- latent_stats assembly -----------------------------------------------------------------------
def write_latent_stats(store: RunStore, hook: str, n_buckets: int, total_tokens: int, cfg: PostprocessConfig,
                       dec_norms: DecNormFractions | None = None) -> None:
    """Stream the per-bucket statistics into one part, one bucket (row group) in memory at a time.
    `dec_norms` (a crosscoder): each bucket also gets its latents' decoder-norm fractions per input."""
    full = store.path(stats_key(hook))
    target = f"{full}.tmp" if store.is_local else full  # object stores: the upload completes on close
    store.fs.makedirs(store.path(stats_dir(hook)), exist_ok=True)
    meta = {b"histogram_edges_log2": f"{cfg.hist_log2_min},{cfg.hist_log2_max},{cfg.hist_bins}".encode(),
            b"total_tokens": str(total_tokens).encode()}
    schema = STATS_SCHEMA
    if dec_norms is not None:
        schema = stats_schema(len(dec_norms.inputs))
        meta[DEC_NORM_INPUTS] = json.dumps(dec_norms.inputs).encode()
    with store.fs.open(target, "wb") as f, \
            pq.ParquetWriter(f, schema.with_metadata(meta), compression=store.cfg.compression) as writer:
        for b in range(n_buckets):
            t = store.read_part(bucket_stats_key(hook, b))
            n_active = t["n_active"].to_numpy()
            sums = t["sum_act"].to_numpy()
            density = n_active / total_tokens if total_tokens else np.zeros(len(n_active))
            mean = np.divide(sums, n_active, out=np.zeros(len(sums)), where=n_active > 0).astype(np.float32)
            out = pa.Table.from_arrays(
                [t["latent_id"], t["n_active"], pa.array(density), t["max_act"], pa.array(mean),
                 t["sum_act"], t["sum_sq_act"], t["quantiles"], t["histogram"], pa.array(n_active == 0)],
                schema=STATS_SCHEMA.with_metadata(meta),
            )
            if dec_norms is not None:  # joined per bucket: only this bucket's decoder rows are read
                out = out.append_column(schema.field(DEC_NORM_FRAC), dec_norms.column(t["latent_id"].to_numpy()))
                out = out.replace_schema_metadata(meta)
            writer.write_table(out)
    if store.is_local:
        store.fs.mv(target, full)


# -- driver -------------------------------------------------------------------------------------
def _remote(fn, num_cpus: float):
    """A Ray task; Ray starts (or is joined) only once there is work, so a no-op rerun is instant.

    Joined only where RAY_ADDRESS names a cluster (`ray job submit` sets it); otherwise a Ray of
    its own, never whichever cluster was last started on the machine (plain `ray.init()` joins
    that one: another user's, or a test's)."""
    import os
    import sys

    import ray

    task = ray.remote(num_cpus=num_cpus, max_retries=3)(fn)

    def submit(*args):
        # Harvest workers a run in this driver kept (cluster.reuse_workers) hold CPU slots these
        # tasks need: end them first. Nothing to do unless the harvest side was imported.
        dispatch = sys.modules.get("pipeline.runtime.dispatch")
        if dispatch is not None:
            dispatch.release_kept_workers()
        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False, log_to_driver=True)
        return task.remote(*args)

    return submit


def _bounded(submit, items, max_in_flight: int):
    """Submit one task per item with at most max_in_flight outstanding; yield results as they come."""
    import ray

    pending = []
    for item in items:
        pending.append(submit(*item))
        if len(pending) >= max_in_flight:
            ready, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(ready)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield from ray.get(ready)


def _scatter_task(sink: SinkConfig, run_id: str, hook: str, shard: int, cfg: PostprocessConfig) -> dict:
    import time

    t0 = time.perf_counter()
    m = scatter_shard(RunStore(sink, run_id), hook, shard, cfg.bucket_size, cfg)
    return {"shard": m["shard"], "tokens": m["tokens"], "buckets": m["buckets"], "scattered": m["scattered"],
            "bucket_pairs": m.get("bucket_pairs", [0] * len(m["buckets"])), "seconds": time.perf_counter() - t0}


def _bucket_task(sink: SinkConfig, run_id: str, *args) -> dict:
    m = process_bucket(RunStore(sink, run_id), *args)
    return {"pairs": m["pairs"], "skipped": m["skipped"], "seconds": m.get("seconds", {})}


def postprocess(store: RunStore, cfg: PostprocessConfig) -> dict:
    """Scatter new committed shards, rebuild touched buckets, refresh latent_stats. Returns counts.

    The driver holds the committed shard ids, one bool per bucket and the in-flight refs: scatter
    markers are read by the tasks, and each bucket task lists its own contributors."""
    manifest = store.read_json(MANIFEST_KEY)
    hooks = cfg.hookpoints or dictionary_ids(manifest)
    committed = np.asarray(store.committed_shards(), np.int64)
    scatter_fn = _remote(_scatter_task, cfg.num_cpus)
    bucket_fn = _remote(_bucket_task, cfg.num_cpus)
    in_flight = max(4, 4 * int(max(1.0, cfg.num_cpus)) * 8)
    summary = {"shards": len(committed), "scattered": 0, "buckets_run": 0, "buckets_skipped": 0, "pairs": 0,
               "task_seconds": {}}  # summed over tasks, per stage: scatter, fetch, stats, sort, examples
    settings = bucket_settings(cfg)

    for hook in hooks:
        n_latents = int(manifest["saes"][hook]["n_latents"])
        n_buckets = -(-n_latents // cfg.bucket_size)
        state_key = stats_state_key(hook)
        prev = read_json_or_none(store, state_key)
        ranges = to_ranges(committed.tolist())
        if prev and prev["settings"] == settings and prev["shards"] == ranges:
            summary["buckets_skipped"] += n_buckets
            log.info(f"[{store.run_id}] post-processed {hook}: up to date ({prev['tokens']:,} tokens)")
            continue
        if prev and prev["settings"] == settings:  # incremental: only shards new since the last full pass
            new = committed[~np.isin(committed, expand_ranges(prev["shards"]))]
            total_tokens, dirty = int(prev["tokens"]), np.zeros(n_buckets, bool)
        else:
            if prev and prev.get("spill") != spill_settings(cfg):
                for folder in (spill_dir(hook), scatter_dir(hook)):
                    if store.exists(folder):  # another bucket layout: old spill parts would be misread
                        store.fs.rm(store.path(folder), recursive=True)
            new, total_tokens, dirty = committed, 0, np.ones(n_buckets, bool)

        # Pass 1: every new shard through a task, which scatters it or reads its existing marker.
        scattered, weight = 0, np.zeros(n_buckets, np.int64)  # new pairs per bucket: biggest buckets first
        for m in _bounded(scatter_fn, ((store.cfg, store.run_id, hook, int(s), cfg) for s in new), in_flight):
            total_tokens += m["tokens"]
            dirty[np.asarray(m["buckets"], np.int64)] = True
            weight[np.asarray(m["buckets"], np.int64)] += np.asarray(m["bucket_pairs"], np.int64)
            scattered += m["scattered"]
            summary["task_seconds"]["scatter"] = summary["task_seconds"].get("scatter", 0.0) + m["seconds"]
        summary["scattered"] += scattered

        # Pass 2: dirty buckets; each lists its contributors and skips itself if its marker is current.
        run = 0
        if dirty.any():
            import ray

            committed_ref = ray.put(committed)
            todo = ((store.cfg, store.run_id, hook, int(b), None, n_latents, committed_ref, cfg)
                    for b in sorted(np.flatnonzero(dirty).tolist(), key=lambda b: -weight[b]))  # the tail is short
            for m in _bounded(bucket_fn, todo, in_flight):
                summary["pairs"] += 0 if m["skipped"] else m["pairs"]
                run += not m["skipped"]
                for stage, sec in m["seconds"].items():
                    summary["task_seconds"][stage] = summary["task_seconds"].get(stage, 0.0) + sec
        summary["buckets_run"] += run
        summary["buckets_skipped"] += n_buckets - run
        write_latent_stats(store, hook, n_buckets, total_tokens, cfg, DecNormFractions.for_dictionary(manifest, hook))
        store.write_json(state_key, {"tokens": total_tokens, "shards": ranges, "settings": settings,
                                     "spill": spill_settings(cfg)})
        log.info(f"[{store.run_id}] post-processed {hook}: {scattered} shard(s) scattered, "
                 f"{run} of {n_buckets} bucket(s) rebuilt, {total_tokens:,} tokens")
    # Imported here: it needs torch, which the scatter and bucket tasks (this module) never do.
    from pipeline.outputs.logit_effects import write_logit_effects

    summary["logit_effects"] = write_logit_effects(store, cfg)
    return summary


def _main(cfg: PostprocessConfig) -> None:
    log.info(postprocess(RunStore(cfg.sink, cfg.run_id), cfg))


main = command("postprocess", PostprocessConfig, _main)


if __name__ == "__main__":
    main()

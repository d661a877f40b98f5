"""Post-processing for autointerp: latent_stats, the by_latent inverted index, and examples.

    python -m pipeline.outputs.postprocess run_id=demo [sink=s3] [sink.root=s3://bucket/runs] [bucket_size=65536] ...

Two passes over COMMITTED shards only, both Ray tasks, so no process ever holds every latent:

1. scatter, one task per (hookpoint, shard): read the shard's latents part once (column
   projected), drop zero activations, and write its pairs split by bucket
   (bucket = latent_id // bucket_size) to `_post/spill/hookpoint=H/bucket=B/shard=S.parquet`,
   then `_post/scatter/hookpoint=H/shard=S.json` (written last: lists the buckets it touched
   and the shard's token count). A scattered shard is never read again.
   We chose scatter over "every bucket task scans everything": that costs n_buckets full scans
   of latents/, this costs one scan plus one write of the pairs.
2. bucket, one task per (hookpoint, bucket): read that bucket's spill files, sort, and write
   `by_latent/.../bucket=B/part-0.parquet`, `examples/.../bucket=B/part-0.parquet`, the
   bucket's statistics (`_post/stats/...`), and last `_post/hookpoint=H/bucket=B.json`, which
   records the shards that contributed pairs and the settings. A bucket whose contributing
   shards and settings are unchanged is skipped, so a nightly run redoes only touched buckets.

Then the driver streams the per-bucket statistics, one bucket at a time, into
`latent_stats/hookpoint=H/part-0.parquet` (density needs the total token count, which any new
shard changes). Output is deterministic: sorted pairs and per-bucket seeded sampling.

Example windows: `token_ids` are context tokens [start, start + window) with
start = clamp(pos - window // 2, 0, len - window); `acts` are this latent's activations at
those positions (0 where it is not active). kind=quantile: the latent's activations (descending)
are cut into n_quantiles equal-count groups, rank = group * per_quantile + j (group 0 = highest).
kind=random: windows where the latent is active nowhere.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import asdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import command
from pipeline.config import PostprocessConfig, SinkConfig
from pipeline.outputs.layout import (
    BY_LATENT_SCHEMA,
    EXAMPLES_SCHEMA,
    MANIFEST_KEY,
    STATS_SCHEMA,
    bucket_marker_key,
    bucket_stats_key,
    by_latent_key,
    contexts_key,
    examples_key,
    latents_key,
    scatter_marker_key,
    spill_key,
    stats_dir,
    stats_key,
    stats_state_key,
)
from pipeline.outputs.logit_effects import write_logit_effects
from pipeline.outputs.sink import RunStore

log = logging.getLogger(__name__)

KINDS = ("top", "quantile", "random")
POS_BITS = 24  # (seq_id, pos) packed into one int64 key: seq_id << POS_BITS | pos


def hist_edges(cfg: PostprocessConfig) -> np.ndarray:
    """The fixed histogram bin edges shared by every latent (inner edges; outer bins are open)."""
    return np.exp2(np.linspace(cfg.hist_log2_min, cfg.hist_log2_max, cfg.hist_bins + 1))


def window_start(pos: np.ndarray | int, length: np.ndarray | int, window: int):
    return np.clip(np.asarray(pos) - window // 2, 0, np.maximum(np.asarray(length) - window, 0))


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


class Contexts:
    """Token ids by seq_id, reading (and keeping) one contexts shard at a time as needed."""

    def __init__(self, store: RunStore, shard_size: int):
        self.store, self.shard_size = store, shard_size
        self.shards: dict[int, dict[int, np.ndarray]] = {}

    def shard(self, shard_id: int) -> dict[int, np.ndarray]:
        if shard_id not in self.shards:
            t = self.store.read_committed_part(shard_id, contexts_key(shard_id), ["seq_id", "token_ids"])
            flat = t["token_ids"].combine_chunks()
            values = flat.values.to_numpy()
            offsets = flat.offsets.to_numpy()
            self.shards[shard_id] = {
                int(s): values[offsets[i]:offsets[i + 1]] for i, s in enumerate(t["seq_id"].to_numpy())
            }
        return self.shards[shard_id]

    def tokens(self, seq_id: int) -> np.ndarray:
        return self.shard(int(seq_id) // self.shard_size)[int(seq_id)]


# -- pass 1: scatter -------------------------------------------------------------------------
def scatter_shard(store: RunStore, hook: str, shard: int, bucket_size: int) -> dict:
    t = store.read_committed_part(shard, latents_key(hook, shard), ["seq_id", "pos", "latent_ids", "acts"])
    ids_col, acts_col = t["latent_ids"].combine_chunks(), t["acts"].combine_chunks()
    k = ids_col.type.list_size
    ids = ids_col.flatten().to_numpy().astype(np.int32)
    acts = acts_col.flatten().to_numpy(zero_copy_only=False).astype(np.float16)
    seq = np.repeat(t["seq_id"].to_numpy(), k)
    pos = np.repeat(t["pos"].to_numpy(), k)
    keep = acts > 0  # top-k keeps k values even where ReLU made them 0: those are not active
    ids, acts, seq, pos = ids[keep], acts[keep], seq[keep], pos[keep]
    order = np.lexsort((pos, seq, -acts.astype(np.float32), ids))
    ids, acts, seq, pos = ids[order], acts[order], seq[order], pos[order]
    buckets = ids // bucket_size
    touched, starts = np.unique(buckets, return_index=True)
    ends = np.append(starts[1:], len(ids))
    for b, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist()):
        part = pa.Table.from_arrays(
            [pa.array(ids[s:e]), pa.array(seq[s:e]), pa.array(pos[s:e]), pa.array(acts[s:e], type=pa.float16())],
            schema=BY_LATENT_SCHEMA,
        )
        store.write_table(spill_key(hook, b, shard), part)
    marker = {"shard": shard, "tokens": int(t.num_rows), "pairs": len(ids), "buckets": touched.tolist()}
    store.write_json(scatter_marker_key(hook, shard), marker)  # last: the spill files are complete
    return marker


# -- pass 2: one bucket -------------------------------------------------------------------------
def bucket_settings(cfg: PostprocessConfig) -> dict:
    """The settings a bucket's outputs depend on: a change reruns the bucket."""
    skip = {"run_id", "sink", "hookpoints", "num_cpus", "quiet", "logit_effects"}
    return {k: v for k, v in asdict(cfg).items() if k not in skip}


def _stats_table(lo: int, hi: int, ids, acts32, cfg: PostprocessConfig) -> pa.Table:
    """Per-latent sums, max, quantiles and fixed-bin histogram for latents [lo, hi)."""
    n = hi - lo
    local = ids.astype(np.int64) - lo
    n_active = np.bincount(local, minlength=n)
    sum_act = np.bincount(local, weights=acts32, minlength=n)
    sum_sq = np.bincount(local, weights=acts32.astype(np.float64) ** 2, minlength=n)
    max_act = np.zeros(n, np.float32)
    np.maximum.at(max_act, local, acts32)
    edges = hist_edges(cfg)
    bins = np.clip(np.searchsorted(edges[1:-1], acts32, side="right"), 0, cfg.hist_bins - 1)
    hist = np.bincount(local * cfg.hist_bins + bins, minlength=n * cfg.hist_bins).reshape(n, cfg.hist_bins)
    probs = np.linspace(0, 1, cfg.n_quantiles + 1)
    starts = np.concatenate([[0], np.cumsum(n_active)])
    quantiles = [
        np.quantile(acts32[starts[i]:starts[i + 1]], probs).astype(np.float32) if n_active[i] else np.zeros(0, np.float32)
        for i in range(n)
    ]
    return pa.table(
        {
            "latent_id": pa.array(np.arange(lo, hi, dtype=np.int32)),
            "n_active": pa.array(n_active.astype(np.int64)),
            "max_act": pa.array(max_act),
            "sum_act": pa.array(sum_act),
            "sum_sq_act": pa.array(sum_sq),
            "quantiles": pa.array(quantiles, type=pa.list_(pa.float32())),
            "histogram": pa.array(list(hist), type=pa.list_(pa.int64())),
        }
    )


def process_bucket(store: RunStore, hook: str, bucket: int, shards: list[int], n_latents: int,
                   committed: list[int], shard_size: int, cfg: PostprocessConfig) -> dict:
    lo, hi = bucket * cfg.bucket_size, min((bucket + 1) * cfg.bucket_size, n_latents)
    parts = [store.read_part(spill_key(hook, bucket, s)) for s in shards]
    pairs = pa.concat_tables(parts) if parts else BY_LATENT_SCHEMA.empty_table()
    ids = pairs["latent_id"].to_numpy()
    seq = pairs["seq_id"].to_numpy()
    pos = pairs["pos"].to_numpy()
    acts = pairs["act"].to_numpy(zero_copy_only=False)
    acts32 = acts.astype(np.float32)
    order = np.lexsort((pos, seq, -acts32, ids))  # by latent, act desc; ties by (seq, pos)
    ids, seq, pos, acts, acts32 = ids[order], seq[order], pos[order], acts[order], acts32[order]

    by_latent = pa.Table.from_arrays(
        [pa.array(ids, pa.int32()), pa.array(seq, pa.int64()), pa.array(pos, pa.int32()),
         pa.array(acts, pa.float16())], schema=BY_LATENT_SCHEMA)
    store.write_table(by_latent_key(hook, bucket), by_latent)
    store.write_table(bucket_stats_key(hook, bucket), _stats_table(lo, hi, ids, acts32, cfg))
    examples = bucket_examples(store, hook, bucket, ids, seq, pos, acts32, committed, shard_size, cfg)
    store.write_table(examples_key(hook, bucket), examples)
    marker = {"hookpoint": hook, "bucket": bucket, "latents": [lo, hi], "pairs": len(ids),
              "shards": to_ranges(shards), "settings": bucket_settings(cfg)}
    store.write_json(bucket_marker_key(hook, bucket), marker)  # last
    return marker


def bucket_examples(store: RunStore, hook: str, bucket: int, ids, seq, pos, acts32, committed: list[int],
                    shard_size: int, cfg: PostprocessConfig) -> pa.Table:
    """top / quantile / random windows for every active latent of the bucket (pairs sorted by latent, act desc)."""
    contexts = Contexts(store, shard_size)
    rng = np.random.default_rng([cfg.seed, zlib.crc32(hook.encode()), bucket])
    keys = (seq.astype(np.int64) << POS_BITS) | pos.astype(np.int64)
    latents, starts, counts = np.unique(ids, return_index=True, return_counts=True)
    pool = sorted(rng.choice(committed, size=min(cfg.random_pool_shards, len(committed)), replace=False).tolist()) \
        if committed else []
    rows: dict[str, list] = {name: [] for name in EXAMPLES_SCHEMA.names}
    W = cfg.window

    for latent, s, c in zip(latents.tolist(), starts.tolist(), counts.tolist()):
        lkeys = np.sort(keys[s:s + c])
        lacts = acts32[s:s + c][np.argsort(keys[s:s + c], kind="stable")]

        def add(kind: str, rank: int, seq_id: int, p: int, latent=latent, lkeys=lkeys, lacts=lacts) -> None:
            toks = contexts.tokens(seq_id)
            start = int(window_start(p, len(toks), W))
            window = toks[start:start + W]
            lo_i, hi_i = np.searchsorted(lkeys, [(seq_id << POS_BITS) | start, (seq_id << POS_BITS) | (start + len(window))])
            win_acts = np.zeros(len(window), np.float32)
            win_acts[(lkeys[lo_i:hi_i] & ((1 << POS_BITS) - 1)) - start] = lacts[lo_i:hi_i]
            for name, value in zip(EXAMPLES_SCHEMA.names, (latent, kind, rank, seq_id, p, window, win_acts)):
                rows[name].append(value)

        for r in range(min(cfg.top_n, c)):
            add("top", r, int(seq[s + r]), int(pos[s + r]))
        for q, group in enumerate(np.array_split(np.arange(c), cfg.n_quantiles)):
            if len(group) == 0:
                continue
            picks = np.sort(rng.choice(group, size=min(cfg.per_quantile, len(group)), replace=False))
            for j, i in enumerate(picks.tolist()):
                add("quantile", q * cfg.per_quantile + j, int(seq[s + i]), int(pos[s + i]))
        # Random non-activating windows: draw (seq_id, pos) from a few context shards, keep those
        # where this latent is active nowhere in the window.
        taken: set[tuple[int, int]] = set()
        for _ in range(cfg.n_random * 10):
            if len(taken) >= cfg.n_random or not pool:
                break
            shard_ctx = contexts.shard(int(pool[rng.integers(len(pool))]))
            seq_ids = sorted(shard_ctx)
            seq_id = int(seq_ids[rng.integers(len(seq_ids))])
            n_tok = len(shard_ctx[seq_id])
            p = int(rng.integers(n_tok)) if n_tok else 0
            start = int(window_start(p, n_tok, W))
            if (seq_id, start) in taken or n_tok == 0:
                continue
            lo_i, hi_i = np.searchsorted(lkeys, [(seq_id << POS_BITS) | start, (seq_id << POS_BITS) | (start + W)])
            if hi_i > lo_i:
                continue
            taken.add((seq_id, start))
            add("random", len(taken) - 1, seq_id, p)
    return pa.table(
        {
            "latent_id": pa.array(rows["latent_id"], pa.int32()),
            "kind": pa.array(rows["kind"], pa.string()),
            "rank": pa.array(rows["rank"], pa.int32()),
            "seq_id": pa.array(rows["seq_id"], pa.int64()),
            "pos": pa.array(rows["pos"], pa.int32()),
            "token_ids": pa.array(rows["token_ids"], pa.list_(pa.int32())),
            "acts": pa.array(rows["acts"], pa.list_(pa.float32())),
        },
        schema=EXAMPLES_SCHEMA,
    )


# -- latent_stats assembly -----------------------------------------------------------------------
def write_latent_stats(store: RunStore, hook: str, n_buckets: int, total_tokens: int, cfg: PostprocessConfig) -> None:
    """Stream the per-bucket statistics into one part, one bucket (row group) in memory at a time."""
    full = store.path(stats_key(hook))
    target = f"{full}.tmp" if store.is_local else full  # object stores: the upload completes on close
    store.fs.makedirs(store.path(stats_dir(hook)), exist_ok=True)
    meta = {b"histogram_edges_log2": f"{cfg.hist_log2_min},{cfg.hist_log2_max},{cfg.hist_bins}".encode(),
            b"total_tokens": str(total_tokens).encode()}
    with store.fs.open(target, "wb") as f, \
            pq.ParquetWriter(f, STATS_SCHEMA.with_metadata(meta), compression=store.cfg.compression) as writer:
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
            writer.write_table(out)
    if store.is_local:
        store.fs.mv(target, full)


# -- driver -------------------------------------------------------------------------------------
def _remote(fn, num_cpus: float):
    """A Ray task; Ray starts (or is joined) only once there is work, so a no-op rerun is instant."""
    import ray

    task = ray.remote(num_cpus=num_cpus, max_retries=3)(fn)

    def submit(*args):
        if not ray.is_initialized():
            ray.init(include_dashboard=False, log_to_driver=True)
        return task.remote(*args)

    return submit


def _gather(refs: list) -> list:
    import ray

    return ray.get(refs) if refs else []


def _scatter_task(sink: SinkConfig, run_id: str, hook: str, shard: int, bucket_size: int) -> dict:
    return scatter_shard(RunStore(sink, run_id), hook, shard, bucket_size)


def _bucket_task(sink: SinkConfig, run_id: str, *args) -> dict:
    return process_bucket(RunStore(sink, run_id), *args)


def postprocess(store: RunStore, cfg: PostprocessConfig) -> dict:
    """Scatter new committed shards, rebuild touched buckets, refresh latent_stats. Returns counts."""
    manifest = store.read_json(MANIFEST_KEY)
    hooks = cfg.hookpoints or manifest["hookpoints"]
    shard_size = int(manifest["shard_size"])
    committed = store.committed_shards()
    scatter_fn = _remote(_scatter_task, cfg.num_cpus)
    bucket_fn = _remote(_bucket_task, cfg.num_cpus)
    summary = {"shards": len(committed), "scattered": 0, "buckets_run": 0, "buckets_skipped": 0, "pairs": 0}

    for hook in hooks:
        n_latents = int(manifest["saes"][hook]["n_latents"])
        n_buckets = -(-n_latents // cfg.bucket_size)
        # Pass 1: scatter committed shards that have no scatter marker yet.
        markers = {s: read_json_or_none(store, scatter_marker_key(hook, s)) for s in committed}
        todo = [s for s, m in markers.items() if m is None]
        refs = [scatter_fn(store.cfg, store.run_id, hook, s, cfg.bucket_size) for s in todo]
        for m in _gather(refs):
            markers[m["shard"]] = m
        summary["scattered"] += len(todo)
        contributors: list[list[int]] = [[] for _ in range(n_buckets)]
        for s in committed:
            for b in markers[s]["buckets"]:
                contributors[b].append(s)
        total_tokens = sum(markers[s]["tokens"] for s in committed)

        # Pass 2: buckets whose contributing shards or settings changed.
        refs = []
        for b in range(n_buckets):
            done = read_json_or_none(store, bucket_marker_key(hook, b))
            if done and done["shards"] == to_ranges(contributors[b]) and done["settings"] == bucket_settings(cfg):
                summary["buckets_skipped"] += 1
                continue
            refs.append(bucket_fn(store.cfg, store.run_id, hook, b, contributors[b], n_latents,
                                         committed, shard_size, cfg))
        for m in _gather(refs):
            summary["pairs"] += m["pairs"]
        summary["buckets_run"] += len(refs)

        state = {"tokens": total_tokens, "shards": to_ranges(committed), "settings": bucket_settings(cfg)}
        if refs or read_json_or_none(store, stats_state_key(hook)) != state:
            write_latent_stats(store, hook, n_buckets, total_tokens, cfg)
            store.write_json(stats_state_key(hook), state)
        log.info(f"[{store.run_id}] post-processed {hook}: {len(todo)} shard(s) scattered, "
                 f"{len(refs)} of {n_buckets} bucket(s) rebuilt, {total_tokens:,} tokens")
    summary["logit_effects"] = write_logit_effects(store, cfg)  # pipeline/outputs/logit_effects.py
    return summary


def _main(cfg: PostprocessConfig) -> None:
    log.info(postprocess(RunStore(cfg.sink, cfg.run_id), cfg))


main = command("postprocess", PostprocessConfig, _main)


if __name__ == "__main__":
    main()

"""Post-processing benchmark on a synthetic run in the real layout (manifest, contexts and latents
parts, commit markers), Zipf latent ids over L = 2^20.

    python bench/postprocess.py [--pairs 100000000] [--out bench/results/postprocess.txt]

Prints, side by side from one run:
- pairs/s of the real `postprocess()` (local Ray, 2 CPUs), against the 206k pairs/s measured
  for the code before issue 14 on this machine;
- the same per-latent count / sum / max by ONE plain DuckDB query over the same spill Parquet our
  stats stage reads, and our stats stage's time over DuckDB's (stats stage = the bucket tasks'
  GROUP BY, which also computes exact sums and the histogram; the map, shared by every later
  stage, is reported beside it). Also the same query straight over the latents parts (unnest of
  the k-lists), the one-liner a user would write instead of running post-processing, beside our
  map + stats and beside the whole postprocess() wall time (issue 23: target <= 1.5x);
- peak RSS and time of the largest task (the hottest bucket's reduce, in a fresh process) at 1x
  and at 4x the corpus (4x: the hot bucket's input replicated with new seq_ids and contexts), at
  each task_memory_mb in --rss-memory-mb (the default, 512, first: the in-memory ranges' budget and
  DuckDB's memory_limit). Also DuckDB writing the by_latent index alone, the floor of the index stage.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from pipeline.config import PostprocessConfig, SinkConfig  # noqa: E402
from pipeline.outputs.layout import (  # noqa: E402
    CONTEXTS_SCHEMA,
    LATENTS_PARQUET,  # noqa: E402
    bucket_marker_key,
    commit_key,
    contexts_key,
    latents_key,
    spill_key,
)
from pipeline.outputs.postprocess import postprocess  # noqa: E402
from pipeline.outputs.sink import RunStore  # noqa: E402

HOOK = "layers.0"
BEFORE_PAIRS_PER_S = 206_000  # issue 14, the code before this engine, same machine


def make_run(root: Path, pairs: int, k: int, n_latents: int, ctx_len: int, shard_tokens: int, seed: int = 0) -> RunStore:
    store = RunStore(SinkConfig(root=str(root)), "bench")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_latents).astype(np.int32)  # hot latents spread over buckets
    tokens = pairs // k
    shard_size = shard_tokens // ctx_len
    n_shards = -(-tokens // shard_tokens)
    store.write_json("manifest.json", {"run_id": "bench", "hookpoints": [HOOK], "shard_size": shard_size,
                                       "ctx_len": ctx_len, "saes": {HOOK: {"n_latents": n_latents, "k": k}}})
    for shard in range(n_shards):
        n_tok = min(shard_tokens, tokens - shard * shard_tokens)
        n_ctx = -(-n_tok // ctx_len)
        seq = shard * shard_size + np.arange(n_ctx, dtype=np.int64)
        lengths = np.full(n_ctx, ctx_len)
        lengths[-1] = n_tok - ctx_len * (n_ctx - 1)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        ctx = pa.Table.from_arrays([pa.array(seq), pa.array(np.full(n_ctx, f"doc{shard}")), pa.array(np.zeros(n_ctx, np.int32)),
                                    pa.ListArray.from_arrays(pa.array(offsets), pa.array(rng.integers(0, 50000, n_tok, dtype=np.int32)))],
                                   schema=CONTEXTS_SCHEMA)
        files = [store.write_table(contexts_key(shard), ctx)]
        ids = perm[(rng.zipf(1.1, n_tok * k) - 1) % n_latents]
        acts = np.sort(rng.exponential(1.0, (n_tok, k)).astype(np.float16), axis=1)[:, ::-1].reshape(-1)
        lat = pa.Table.from_arrays([pa.array(np.repeat(seq, lengths)), pa.array(np.arange(n_tok) - np.repeat(offsets[:-1], lengths), pa.int32()),
                                    pa.FixedSizeListArray.from_arrays(pa.array(ids), k),
                                    pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(acts), pa.float16()), k)],
                                   names=["seq_id", "pos", "latent_ids", "acts"])
        files.append(store.write_table(latents_key(HOOK, shard), lat, **LATENTS_PARQUET))
        store.write_json(commit_key(shard), {"shard": shard, "tokens": n_tok, "files": [f.__dict__ for f in files]})
    return store


def duckdb_stats(root: Path, threads: int, source: str = "spill") -> float:
    """One plain DuckDB query: count / sum / max per active latent, over the spill Parquet (the
    files our stats stage reads) or straight over the latents parts."""
    import duckdb

    pairs = {
        "spill": f"SELECT latent_id, act FROM read_parquet('{root}/bench/_post/spill/*/*/*.parquet')",
        "latents": f"""SELECT unnest(latent_ids) AS latent_id, unnest(acts) AS act
                       FROM read_parquet('{root}/bench/latents/*/*/*.parquet')""",
    }[source]
    con = duckdb.connect(config={"threads": threads})
    t0 = time.perf_counter()
    con.execute(f"SELECT latent_id, count(*), sum(act), max(act) FROM ({pairs}) WHERE act > 0 GROUP BY latent_id").fetchall()
    return time.perf_counter() - t0


def duckdb_index(root: Path, threads: int, bucket_size: int) -> float:
    """DuckDB writing the by_latent index alone, the same rows in the same order and files
    (partitioned by bucket, sorted by latent, act desc, seq_id, pos), straight from the latents
    parts: what an engine needs for the index without the statistics or examples."""
    import duckdb

    out = root / "duckdb-by_latent"
    con = duckdb.connect(config={"threads": threads, "temp_directory": str(root / "duckdb-tmp")})
    t0 = time.perf_counter()
    con.execute(f"""COPY (SELECT latent_id // {bucket_size} AS bucket, latent_id, seq_id, pos, act
                          FROM (SELECT seq_id, pos, unnest(latent_ids) AS latent_id, unnest(acts) AS act
                                FROM read_parquet('{root}/bench/latents/*/*/*.parquet')) WHERE act > 0
                          ORDER BY latent_id, act DESC, seq_id, pos)
                    TO '{out}' (FORMAT parquet, PARTITION_BY (bucket), COMPRESSION zstd)""")
    seconds = time.perf_counter() - t0
    shutil.rmtree(out, ignore_errors=True)
    return seconds


TASK = """
import json, sys
from pipeline.config import PostprocessConfig, SinkConfig
from pipeline.outputs.postprocess import process_bucket
from pipeline.outputs.sink import RunStore
a = json.loads(sys.argv[1])
store = RunStore(SinkConfig(root=a["root"]), "bench")
m = process_bucket(store, a["hook"], a["bucket"], None, a["n_latents"], store.committed_shards(), PostprocessConfig(**a["cfg"]))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))  # ru_maxrss survives exec
print(json.dumps({"pairs": m["pairs"], "maxrss_mb": int(hwm.split()[1]) / 1024}))
"""


def task_rss(store: RunStore, bucket: int, cfg: PostprocessConfig, n_latents: int) -> dict:
    """Re-run one bucket's reduce in a fresh process; its peak RSS."""
    store.fs.rm(store.path(bucket_marker_key(HOOK, bucket)))
    args = {"root": store.cfg.root, "hook": HOOK, "bucket": bucket, "n_latents": n_latents,
            "cfg": {k: v for k, v in cfg.__dict__.items() if k not in ("sink", "hookpoints", "logit_effects")}}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", TASK, json.dumps(args)], capture_output=True, text=True, env=env, check=True)
    return {**json.loads(out.stdout[out.stdout.rindex("{"):]), "seconds": time.perf_counter() - t0}


def replicate_bucket(store: RunStore, bucket: int, times: int, shard_size: int) -> None:
    """`times` x the hot bucket's input: copies of its spill parts and of the contexts, with new seq_ids."""
    import pyarrow.parquet as pq

    from pipeline.outputs.post_engine import write_spill

    shards = store.committed_shards()
    n = max(shards) + 1
    for r in range(1, times):
        for s in shards:
            new = s + r * n
            shift = r * n * shard_size
            ctx = pq.read_table(store.path(contexts_key(s)))
            ctx = ctx.set_column(0, "seq_id", pa.array(ctx["seq_id"].to_numpy() + shift))
            f = store.write_table(contexts_key(new), ctx)
            store.write_json(commit_key(new), {"shard": new, "tokens": 0, "files": [f.__dict__]})
            key = spill_key(HOOK, bucket, s)
            if store.exists(key):
                sp = pq.read_table(store.path(key))
                write_spill(store, spill_key(HOOK, bucket, new), sp.set_column(1, "seq_id", pa.array(sp["seq_id"].to_numpy() + shift)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=100_000_000)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--latents", type=int, default=1 << 20)
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--shard-tokens", type=int, default=1 << 17)
    ap.add_argument("--bucket-size", type=int, default=1 << 16)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--rss-memory-mb", default="512,1024",
                    help="task_memory_mb value(s) for the RSS measurement, comma-separated (the default is 512)")
    ap.add_argument("--workdir", default=None, help="where the synthetic run goes (default: a temp folder)")
    ap.add_argument("--out", default=None, help="also write the report here")
    args = ap.parse_args()
    lines = [f"$ python bench/postprocess.py {' '.join(sys.argv[1:])}".rstrip()]

    def say(msg: str) -> None:
        print(msg, flush=True)
        lines.append(msg)

    tmp = Path(tempfile.mkdtemp(prefix="bench-post-", dir=args.workdir))
    try:
        t0 = time.perf_counter()
        store = make_run(tmp, args.pairs, args.k, args.latents, args.ctx_len, args.shard_tokens)
        shard_size = args.shard_tokens // args.ctx_len
        say(f"synthetic run: {args.pairs:,} (latent, act) slots, k={args.k}, L={args.latents:,}, Zipf(1.1) ids, "
            f"{len(store.committed_shards())} shards; generated in {time.perf_counter() - t0:.1f}s")

        import ray

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        cfg = PostprocessConfig(run_id="bench", bucket_size=args.bucket_size, num_cpus=1)  # default task_memory_mb
        t0 = time.perf_counter()
        summary = postprocess(store, cfg)
        wall = time.perf_counter() - t0
        ray.shutdown()
        pairs = summary["pairs"]
        sec = summary["task_seconds"]
        say(f"postprocess(): {pairs:,} active pairs in {wall:.1f}s = {pairs / wall / 1e3:,.0f}k pairs/s "
            f"({pairs / wall / BEFORE_PAIRS_PER_S:.1f}x the 206k pairs/s before; target >= 10x)")
        say("  task seconds (summed over tasks): " + ", ".join(f"{k} {v:.1f}" for k, v in sec.items()))
        say(f"  driver peak RSS (postprocess() only, before the DuckDB queries below): "
            f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")

        t_duck = duckdb_stats(tmp, args.cpus)
        stats_wall = sec.get("stats", 0.0) / args.cpus  # tasks ran on args.cpus CPUs in parallel
        map_wall = sec.get("scatter", 0.0) / args.cpus
        say(f"one plain DuckDB query (count/sum/max per latent over the same spill Parquet, {args.cpus} threads): {t_duck:.1f}s")
        say(f"  our stats stage / DuckDB = {stats_wall:.1f}s / {t_duck:.1f}s = {stats_wall / t_duck:.2f} (target <= 1.5); "
            f"with the shared map: ({map_wall:.1f}s + {stats_wall:.1f}s) / {t_duck:.1f}s = {(map_wall + stats_wall) / t_duck:.2f}")
        t_raw = duckdb_stats(tmp, args.cpus, "latents")
        say(f"the same DuckDB query straight over the latents parts: {t_raw:.1f}s; our map + stats / it = "
            f"({map_wall:.1f}s + {stats_wall:.1f}s) / {t_raw:.1f}s = {(map_wall + stats_wall) / t_raw:.2f}")
        say(f"  the whole post-processing (map + stats + index + examples, postprocess() wall) / it = "
            f"{wall:.1f}s / {t_raw:.1f}s = {wall / t_raw:.2f} (target <= 1.5)")
        t_index = duckdb_index(tmp, args.cpus, args.bucket_size)
        say(f"DuckDB writing the by_latent index alone (COPY ... ORDER BY latent_id, act DESC, seq_id, pos, "
            f"PARTITION_BY bucket), from the latents parts: {t_index:.1f}s = {t_index / t_raw:.2f}x its own aggregate; "
            f"our whole post-processing / it = {wall / t_index:.2f}")

        hot = max(range(-(-args.latents // args.bucket_size)),
                  key=lambda b: store.read_json(bucket_marker_key(HOOK, b))["pairs"])
        limits = [int(mb) for mb in args.rss_memory_mb.split(",")]
        caps = {mb: dataclasses.replace(cfg, task_memory_mb=mb) for mb in limits}
        r1 = {mb: task_rss(store, hot, caps[mb], args.latents) for mb in limits}
        replicate_bucket(store, hot, 4, shard_size)
        r4 = {mb: task_rss(store, hot, caps[mb], args.latents) for mb in limits}
        for mb in limits:
            a, b = r1[mb], r4[mb]
            say(f"largest task (bucket {hot}'s reduce, fresh process, task_memory_mb {mb}): "
                f"{a['pairs']:,} pairs -> {a['maxrss_mb']:.0f} MB peak RSS in {a['seconds']:.0f}s; 4x: {b['pairs']:,} "
                f"pairs -> {b['maxrss_mb']:.0f} MB in {b['seconds']:.0f}s; ratio {b['maxrss_mb'] / a['maxrss_mb']:.2f} "
                "(target <= 1.2)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

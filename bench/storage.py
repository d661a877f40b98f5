"""Storage and post-processing benchmark on synthetic latents written by the real sink.

    python bench/storage.py [--latents 65536] [--k 32] [--tokens 200000] [--keep DIR]

Prints bytes per stored (latent id, activation) pair in `latents/` (target <= 5), the same
pairs in delphi's cache layout (pipeline.outputs.delphi_export, tokens excluded), and post-processing
throughput in pairs/s. Latent ids follow a Zipf-like frequency (a few latents fire often, most
rarely), activations are descending per row, as the top-k encoder writes them.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import PostprocessConfig, SinkConfig
from pipeline.outputs.layout import (
    CONTEXTS_SCHEMA,
    LATENTS_PARQUET,
    commit_key,
    contexts_key,
    latents_key,
    latents_table,
)
from pipeline.outputs.sink import RunStore

HOOK = "layers.6"


def zipf_ids(rng: np.random.Generator, n: int, k: int, n_latents: int, alpha: float = 1.1) -> np.ndarray:
    """n rows of k distinct ids; id frequency ~ 1 / rank^alpha through a fixed random permutation."""
    ranks = np.minimum(rng.zipf(alpha, (n, k)) - 1, n_latents - 1)
    ranks.sort(axis=1)
    ranks = np.maximum.accumulate(ranks - np.arange(k), axis=1) + np.arange(k)  # make each row distinct
    ranks = np.where(ranks >= n_latents, ranks - n_latents + k, ranks) % n_latents
    perm = np.random.default_rng(1234).permutation(n_latents)
    ids = perm[ranks]
    shuffle = np.argsort(rng.random((n, k)), axis=1)  # which latent gets the largest act is not by id
    return np.take_along_axis(ids, shuffle, axis=1).astype(np.int32)


def write_synthetic_run(root: Path, n_latents: int, k: int, tokens: int, ctx_len: int = 256,
                        shard_size: int = 64, seed: int = 0) -> tuple[RunStore, int]:
    store = RunStore(SinkConfig(root=str(root)), "bench")
    rng = np.random.default_rng(seed)
    n_ctx = tokens // ctx_len
    for shard in range(-(-n_ctx // shard_size)):
        seq = np.arange(shard * shard_size, min((shard + 1) * shard_size, n_ctx))
        toks = rng.integers(0, 49152, (len(seq), ctx_len)).astype(np.int32)
        ctx = pa.Table.from_arrays([pa.array(seq), pa.array(["doc"] * len(seq)), pa.array(np.zeros(len(seq), np.int32)),
                                    pa.array(list(toks), pa.list_(pa.int32()))], schema=CONTEXTS_SCHEMA)
        files = [store.write_table(contexts_key(shard), ctx)]
        n = len(seq) * ctx_len
        vals = -np.sort(-rng.gamma(2.0, 1.5, (n, k)), axis=1)  # descending per row
        ids = zipf_ids(rng, n, k, n_latents)
        table = latents_table(np.repeat(seq, ctx_len), np.tile(np.arange(ctx_len, dtype=np.int32), len(seq)),
                              torch.from_numpy(vals), torch.from_numpy(ids))
        files.append(store.write_table(latents_key(HOOK, shard), table, **LATENTS_PARQUET))
        store.write_json(commit_key(shard), {"shard": shard, "tokens": n, "files": [f.__dict__ for f in files]})
    store.write_json("manifest.json", {"run_id": "bench", "hookpoints": [HOOK], "shard_size": shard_size,
                                       "ctx_len": ctx_len, "saes": {HOOK: {"n_latents": n_latents, "k": k}},
                                       "tokenizer": {"eos_token_id": 0}})
    return store, n_ctx * ctx_len * k


def folder_bytes(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.rglob(f"*{suffix}"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=1 << 16)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--bucket-size", type=int, default=1 << 14)
    ap.add_argument("--keep", default=None, help="write here and keep it (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        started = time.perf_counter()
        store, pairs = write_synthetic_run(root, args.latents, args.k, args.tokens)
        print(f"synthetic run: L={args.latents}, k={args.k}, {pairs // args.k:,} tokens, {pairs:,} pairs "
              f"({time.perf_counter() - started:.1f}s)")
        ours = folder_bytes(root / "bench" / "latents", ".parquet")
        print(f"latents/ (ours):   {ours / pairs:.2f} bytes/pair  ({ours / 1e6:.1f} MB; target <= 5)")

        import ray

        from pipeline.outputs.delphi_export import export_delphi
        from pipeline.outputs.postprocess import postprocess

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        summary = postprocess(store, PostprocessConfig(bucket_size=args.bucket_size), log=lambda *_: None)
        seconds = time.perf_counter() - started
        print(f"post-processing:   {summary['pairs'] / seconds:,.0f} pairs/s ({summary['pairs']:,} active pairs, "
              f"{summary['buckets_run']} buckets, {seconds:.1f}s on {os.cpu_count()} CPUs)")
        export_delphi(store, root / "delphi", save_tokens=False, log=lambda *_: None)
        delphi = folder_bytes(root / "delphi", ".safetensors")
        print(f"delphi layout:     {delphi / summary['pairs']:.2f} bytes/pair  ({delphi / 1e6:.1f} MB, tokens excluded)")
        print(f"ratio ours/delphi: {ours / pairs / (delphi / summary['pairs']):.2f} (target < 0.5)")
        ray.shutdown()
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

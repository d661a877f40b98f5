"""How fast pyarrow writes the examples table's token windows, by compression: the floor under
post-processing's examples stage (issue 14: at the postprocess bench's 94M windows this write is
about half the task time). 500k windows of 32 int32 tokens + 32 float32 activations in the
EXAMPLES_SCHEMA layout, one thread, written to memory, best of 2.

    python bench/examples_write.py
"""
from __future__ import annotations

import io
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

N_WINDOWS, WINDOW = 500_000, 32


def table(rng: np.random.Generator) -> pa.Table:
    n = N_WINDOWS * WINDOW
    tokens = (rng.zipf(1.3, size=n) % 49152).astype(np.int32)
    acts = np.where(rng.random(n) < 0.1, rng.random(n, dtype=np.float32) * 5, 0).astype(np.float32)
    offsets = pa.array(np.arange(0, n + 1, WINDOW, dtype=np.int32))
    return pa.table({
        "latent_id": rng.integers(0, 1 << 20, N_WINDOWS).astype(np.int32),
        "kind": pa.array(["top"] * N_WINDOWS),
        "rank": np.zeros(N_WINDOWS, np.int32),
        "seq_id": rng.integers(0, 1 << 30, N_WINDOWS),
        "pos": rng.integers(0, 256, N_WINDOWS).astype(np.int32),
        "token_ids": pa.ListArray.from_arrays(offsets, pa.array(tokens)),
        "acts": pa.ListArray.from_arrays(offsets, pa.array(acts)),
    })


def seconds_and_bytes(t: pa.Table, **options) -> tuple[float, int]:
    best, size = float("inf"), 0
    for _ in range(2):
        buf = io.BytesIO()
        start = time.perf_counter()
        pq.write_table(t, buf, **options)
        best = min(best, time.perf_counter() - start)
        size = len(buf.getvalue())
    return best, size


def main() -> None:
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    t = table(np.random.default_rng(0))
    dictionary = {"use_dictionary": ["latent_id", "kind"]}  # what post_engine.write_examples uses
    variants = {
        "zstd-3 (what post-processing writes)": dict(compression="zstd", compression_level=3),
        "zstd-1": dict(compression="zstd", compression_level=1),
        "lz4": dict(compression="lz4"),
        "uncompressed (list encoding alone)": dict(compression="none"),
    }
    print(f"{N_WINDOWS:,} windows of {WINDOW} tokens + acts, one thread")
    for name, options in variants.items():
        s, size = seconds_and_bytes(t, **options, **dictionary)
        print(f"  {name:38s} {s / N_WINDOWS * 1e6:5.2f} s per million windows  {size / N_WINDOWS:6.1f} B/window")


if __name__ == "__main__":
    main()

"""The post-processing engine: a vectorised map per shard and a DuckDB reduce per latent bucket.

map (one committed shard): arrow -> numpy, drop zero activations, compute each pair's bucket
    and histogram bin, split by bucket with one stable radix argsort, write one spill part per
    touched bucket. No per-row Python; memory is one shard.
reduce (one latent bucket): DuckDB over that bucket's spill parts, with `memory_limit` and a
    `temp_directory`, so sorts and aggregates go out of core: memory is bounded whatever the
    corpus size (a Zipf-hot latent with 1e8 pairs only costs disk).
    1. one GROUP BY latent: counts, exact sums (activations are float16, so act * 2^24 is an
       integer and the sums are int128: order-independent and deterministic; a float32 run's acts
       are rounded to 2^-24 for the sums only), max;
    2. one ORDER BY (latent, act desc, seq, pos) streamed in record batches: written straight to
       by_latent, histogram bins counted (np.bincount per batch), and the few rows at precomputed
       ranks (top-n, quantile picks, the order statistics of the quantiles: one [latents, columns]
       matrix, no search) kept as they pass;
    3. two hash joins against small tables: the (latent, candidate window) hits that rule out
       random examples, and, unordered, the window activations of the chosen examples, scattered
       into a dense [examples, window] float16 array (a latent twice at one position, which a
       top-k never gives: the max);
    4. windows' tokens from the contexts, one pass in contexts-shard order (a bounded LRU of
       shards): each distinct (seq_id, start) window is cut once, as a row of a sliding-window view;
    5. the examples part written in chunks of examples (Parquet's list encoding and zstd of the
       token windows are most of the reduce's time: ~90 windows of 32 tokens per live latent).
    Memory beyond DuckDB's limit is per example (about 300 bytes), bounded by bucket_size * ~90,
    not by the corpus.

Example selection is by rank and by a deterministic hash (splitmix64 of the seed and ids), so
reruns give the same set and nothing depends on the order of Python loops:
- top: ranks 0..top_n-1 in (act desc, seq, pos) order.
- quantile q: the q-th of n_quantiles equal-count groups (np.array_split sizes) of that order;
  m = min(per_quantile, size) picks at group_start + (u + j * size // m) % size, j < m, with
  u = mix64(mix64(seed) ^ (latent << 16 | q)) % size; ranked q * per_quantile + (order of the picks).
- random: from the random_pool_shards committed contexts shards with the smallest
  mix64(mix64(seed ^ bucket) ^ shard), the 10 * n_random token positions with the smallest
  mix64(mix64(seed ^ bucket) ^ (seq << 24 | pos)) give candidate windows (distinct starts); each
  latent takes, in mix64(candidate hash ^ latent) order, the first n_random where it is active
  nowhere in the window.
"""
from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PostprocessConfig
from pipeline.outputs.layout import contexts_key
from pipeline.outputs.sink import RunStore, with_retries


def spill_schema(act_type: pa.DataType | None = None) -> pa.Schema:
    """A spill part keeps the latents' act type (float16, or float32 for output.acts_dtype=float32)."""
    return pa.schema([("latent_id", pa.int32()), ("seq_id", pa.int64()), ("pos", pa.int32()),
                      ("act", act_type or pa.float16()), ("bin", pa.uint8())])


SPILL_SCHEMA = spill_schema()
SPILL_VERSION = 2
POS_BITS = 24
SCALE = 2.0 ** 24  # float16 values are integer multiples of 2^-24
KIND_CODES = ("top", "quantile", "random")
EXAMPLES_PER_PASS = 1 << 20  # examples whose windows and activations are held at once (~300 bytes each)
_M1, _M2, _GOLDEN = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), np.uint64(0x9E3779B97F4A7C15)


def mix64(x) -> np.ndarray:
    """splitmix64's finaliser, vectorised (uint64 arithmetic wraps)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, dtype=np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def expand_ranges(ranges: list[list[int]]) -> np.ndarray:
    """[[0,2],[5,6]] -> [0,1,2,5,6] (int64)."""
    if not ranges:
        return np.zeros(0, np.int64)
    r = np.asarray(ranges, np.int64)
    lens = r[:, 1] - r[:, 0] + 1
    return np.repeat(r[:, 0] - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())


def spill_settings(cfg: PostprocessConfig) -> dict:
    """What a spill part depends on: a change re-scatters."""
    return {"version": SPILL_VERSION, "bucket_size": cfg.bucket_size, "hist_bins": cfg.hist_bins,
            "hist_log2_min": cfg.hist_log2_min, "hist_log2_max": cfg.hist_log2_max}


def hist_edges(cfg: PostprocessConfig) -> np.ndarray:
    """The fixed histogram bin edges shared by every latent (inner edges; outer bins are open)."""
    return np.exp2(np.linspace(cfg.hist_log2_min, cfg.hist_log2_max, cfg.hist_bins + 1))


def hist_bin(acts: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Each activation's histogram bin (uint8), searched as float32. float16 input: a lookup in the
    bins of all 65536 float16 bit patterns, computed the same way (identical bins, no search per pair)."""
    if acts.dtype == np.float16:
        return _hist_lut(cfg.hist_log2_min, cfg.hist_log2_max, cfg.hist_bins)[acts.view(np.uint16)]
    edges = hist_edges(cfg)
    return np.clip(np.searchsorted(edges[1:-1], acts.astype(np.float32), side="right"), 0, cfg.hist_bins - 1).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _hist_lut(log2_min: float, log2_max: float, bins: int) -> np.ndarray:
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    with np.errstate(invalid="ignore"):  # the NaN patterns (never active: post-processing keeps act > 0)
        return hist_bin(every.astype(np.float32),
                        PostprocessConfig(hist_log2_min=log2_min, hist_log2_max=log2_max, hist_bins=bins))


# -- map ------------------------------------------------------------------------------------------
def split_pairs(latents: pa.Table, cfg: PostprocessConfig) -> tuple[int, Iterator[tuple[int, pa.Table]]]:
    """(active pairs, (bucket, spill table) per touched bucket) of one shard's latents part."""
    if cfg.hist_bins > 256:
        raise ValueError(f"hist_bins={cfg.hist_bins}: at most 256")
    ids_col, acts_col = latents["latent_ids"].combine_chunks(), latents["acts"].combine_chunks()
    schema = spill_schema(acts_col.type.value_type)
    k = ids_col.type.list_size
    ids = ids_col.flatten().to_numpy()
    acts = acts_col.flatten().to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(acts > 0)  # top-k keeps k values even where ReLU made them 0
    row = keep // k
    ids, acts = ids[keep].astype(np.int32, copy=False), acts[keep]
    seq = latents["seq_id"].to_numpy()[row]
    pos = latents["pos"].to_numpy()[row].astype(np.int32, copy=False)
    bucket = ids // cfg.bucket_size
    small = bucket.astype(np.uint16) if bucket.size == 0 or bucket.max() < 1 << 16 else bucket
    order = np.argsort(small, kind="stable")  # radix sort on uint16
    bucket = bucket[order]
    touched, starts = np.unique(bucket, return_index=True) if bucket.size else (np.zeros(0, np.int32), np.zeros(0, np.int64))
    ends = np.append(starts[1:], len(bucket))
    ids, seq, pos, acts = ids[order], seq[order], pos[order], acts[order]
    bins = hist_bin(acts, cfg)

    def parts() -> Iterator[tuple[int, pa.Table]]:
        for b, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist()):
            yield b, pa.Table.from_arrays([pa.array(ids[s:e]), pa.array(seq[s:e]), pa.array(pos[s:e]),
                                           pa.array(acts[s:e], schema.field("act").type), pa.array(bins[s:e])],
                                          schema=schema)

    return len(ids), parts()


def write_spill(store: RunStore, key: str, table: pa.Table) -> None:
    """Spill parts are ours and read once: lz4, fast to write and read back."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="lz4", use_dictionary=False)
    store.write_bytes(key, sink.getvalue().to_pybytes())


# -- reduce ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def local_output(store: RunStore, key: str, scratch: str) -> Iterator[str]:
    """A local path to write `key` to; renamed (local store) or uploaded (object store) on success."""
    full = store.path(key)
    if store.is_local:
        folder, name = os.path.split(full)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}")
        yield tmp
        os.replace(tmp, full)
    else:
        tmp = os.path.join(scratch, key.replace("/", "_"))
        yield tmp
        with_retries(f"upload {key}", lambda: store.fs.put_file(tmp, full), store.cfg.retries)
        os.remove(tmp)


def duckdb_connect(scratch: str, memory_mb: int, threads: int):
    import duckdb

    con = duckdb.connect(config={"memory_limit": f"{memory_mb}MB", "temp_directory": os.path.join(scratch, "duck"),
                                 "threads": max(1, threads), "preserve_insertion_order": False})
    con.execute("SET enable_progress_bar = false")  # it would print to the task's stdout
    return con


class ContextsLRU:
    """(seq_ids, offsets, values) of contexts shards, at most `capacity` held at once."""

    def __init__(self, store: RunStore, capacity: int = 4):
        self.store, self.capacity = store, capacity
        self.cache: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def get(self, shard: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if shard in self.cache:
            self.cache.move_to_end(shard)
            return self.cache[shard]
        t = self.store.read_committed_part(shard, contexts_key(shard), ["seq_id", "token_ids"])
        tok = t["token_ids"].combine_chunks()
        offsets = tok.offsets.to_numpy().astype(np.int64)
        values = tok.values.to_numpy()[offsets[0]:offsets[-1]] if len(tok) else np.zeros(0, np.int32)
        offsets = offsets - offsets[0]
        seq = t["seq_id"].to_numpy()
        if not np.all(seq[1:] > seq[:-1]):  # rows in seq_id order (the writer's order; checked)
            order = np.argsort(seq)
            lens = np.diff(offsets)[order]
            starts = offsets[:-1][order]
            values = np.concatenate([values[s:s + n] for s, n in zip(starts, lens)]) if len(lens) else values
            seq, offsets = seq[order], np.concatenate([[0], np.cumsum(lens)])
        self.cache[shard] = (seq, offsets, values)
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return self.cache[shard]


def quantile_ranks(n: np.ndarray, cfg: PostprocessConfig):
    """Per latent: descending ranks of the two order statistics of each quantile, and np.quantile's gamma."""
    probs = np.linspace(0, 1, cfg.n_quantiles + 1)
    virtual = (n[:, None] - 1) * probs[None, :]  # numpy's 'linear' method
    prev = np.floor(virtual)
    above = virtual >= (n[:, None] - 1)
    gamma = virtual - np.where(above, -1, prev)
    prev = np.where(above, n[:, None] - 1, prev).astype(np.int64)
    nxt = np.where(above, n[:, None] - 1, prev + 1).astype(np.int64)
    return n[:, None] - 1 - prev, n[:, None] - 1 - nxt, gamma  # descending rank = n - 1 - ascending


def quantile_picks(latent_ids: np.ndarray, n: np.ndarray, cfg: PostprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    """(pick [latents, Q, P] rank in act-desc order, valid [latents, Q, P]) of every quantile pick (see
    module doc): valid picks come first in each group, sorted; example rank = q * per_quantile + j."""
    Q, P = cfg.n_quantiles, cfg.per_quantile
    q = np.arange(Q)[None, :]
    base, extra = (n // Q)[:, None], (n % Q)[:, None]
    size = base + (q < extra)
    gstart = q * base + np.minimum(q, extra)
    m = np.minimum(P, size)
    u = mix64(mix64(np.uint64(cfg.seed)) ^ ((latent_ids.astype(np.uint64)[:, None] << np.uint64(16)) | q.astype(np.uint64)))
    u = (u % np.maximum(size, 1).astype(np.uint64)).astype(np.int64)
    j = np.arange(P)[None, None, :]
    valid = j < m[:, :, None]
    pick = gstart[:, :, None] + (u[:, :, None] + j * size[:, :, None] // np.maximum(m, 1)[:, :, None]) % np.maximum(size, 1)[:, :, None]
    pick = np.sort(np.where(valid, pick, np.iinfo(np.int64).max), axis=2)
    return np.where(valid, pick, 0), valid  # invalid: rank 0, a real row whose value is ignored


def reduce_bucket(store: RunStore, hook: str, bucket: int, lo: int, hi: int, spill_keys: list[str],
                  committed: np.ndarray, shard_size: int, cfg: PostprocessConfig,
                  by_latent_key: str, examples_key: str) -> tuple[int, pa.Table, dict]:
    """Write by_latent and examples for latents [lo, hi) from the given spill parts; return (pairs, stats, seconds per stage)."""
    scratch = tempfile.mkdtemp(prefix=f"sae-post-{bucket}-")
    try:
        return _reduce(store, hook, bucket, lo, hi, spill_keys, committed, shard_size, cfg,
                       by_latent_key, examples_key, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _spill_paths(store: RunStore, keys: list[str], scratch: str) -> list[str]:
    if store.is_local:
        return [store.path(k) for k in keys]
    local = [os.path.join(scratch, "in", k.replace("/", "_")) for k in keys]
    os.makedirs(os.path.join(scratch, "in"), exist_ok=True)
    for k, p in zip(keys, local):  # one at a time: disk, not memory, holds the bucket
        with_retries(f"download {k}", lambda k=k, p=p: store.fs.get_file(store.path(k), p), store.cfg.retries)
    return local


def _reduce(store, hook, bucket, lo, hi, spill_keys, committed, shard_size, cfg, by_latent_key, examples_key, scratch):
    n_lat = hi - lo
    clock = [time.perf_counter()]
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    con = duckdb_connect(scratch, cfg.task_memory_mb, int(max(1, cfg.num_cpus)))
    paths = _spill_paths(store, spill_keys, scratch)
    if paths:
        con.read_parquet(paths).create_view("pairs")
    else:
        # no pairs (a bucket no shard touched): DuckDB has no Arrow float16; it reads the spill's as FLOAT
        con.register("pairs", SPILL_SCHEMA.set(3, pa.field("act", pa.float32())).empty_table())
    lap("fetch")

    # 1. statistics: one scan grouped by latent; exact int128 sums. The histogram is counted in 3.
    # v * v as DOUBLE is exact (v = a float16's 11-bit significand * 2^j: its square has <= 22 bits),
    # and far cheaper than an int128 multiply per row; only the sum needs int128.
    g = con.sql(f"""
        SELECT latent_id, count(*) AS n, CAST(sum(v) AS DOUBLE) AS s,
               CAST(sum(CAST(CAST(v AS DOUBLE) * v AS HUGEINT)) AS DOUBLE) AS sq, max(act) AS mx
        FROM (SELECT latent_id, act, CAST(act * {SCALE} AS BIGINT) AS v FROM pairs) GROUP BY latent_id""").to_arrow_table()
    local = g["latent_id"].to_numpy().astype(np.int64) - lo
    n = np.zeros(n_lat, np.int64)
    n[local] = g["n"].to_numpy()
    sum_act, sum_sq, max_act = np.zeros(n_lat), np.zeros(n_lat), np.zeros(n_lat, np.float32)
    sum_act[local] = g["s"].to_numpy() / SCALE
    sum_sq[local] = g["sq"].to_numpy() / (SCALE * SCALE)
    max_act[local] = g["mx"].to_numpy()
    hist = np.zeros((n_lat, cfg.hist_bins), np.int64)
    lap("stats")
    # 2. the ranks whose rows we need from the sorted stream, one row of columns per active latent:
    # the quantiles' two order statistics, top_n, the quantile picks (missing ones: rank 0, ignored).
    active = np.flatnonzero(n)
    na = n[active]
    first = (np.cumsum(n) - n)[active]  # global index of each active latent's first pair
    q_hi, q_lo, gamma = quantile_ranks(na, cfg)  # [active, Q+1]; desc ranks of the two order statistics
    top = np.arange(cfg.top_n)[None, :]
    top_valid = top < na[:, None]
    q_pick, q_valid = quantile_picks(active + lo, na, cfg)
    nq1 = cfg.n_quantiles + 1
    cols = {"q_hi": slice(0, nq1), "q_lo": slice(nq1, 2 * nq1), "top": slice(2 * nq1, 2 * nq1 + cfg.top_n),
            "pick": slice(2 * nq1 + cfg.top_n, None)}
    need = first[:, None] + np.concatenate(
        [q_hi, q_lo, np.where(top_valid, top, 0), q_pick.reshape(len(active), q_pick.shape[1] * q_pick.shape[2])], axis=1)
    got_seq, got_pos = np.zeros(need.shape, np.int64), np.zeros(need.shape, np.int32)
    got_act = np.zeros(need.shape, np.float32)
    ends = first + na

    # 3. the sorted stream -> by_latent, keeping the needed rows (a batch overlaps a range of latents' rows).
    reader = con.sql("SELECT latent_id, seq_id, pos, act, bin FROM pairs ORDER BY latent_id, act DESC, seq_id, pos") \
        .to_arrow_reader(1 << 20)
    from pipeline.outputs.layout import MANIFEST_KEY, by_latent_schema, run_acts_dtype

    BY_LATENT_SCHEMA = by_latent_schema(run_acts_dtype(store.read_json(MANIFEST_KEY)))  # the run's acts dtype
    offset = 0
    with local_output(store, by_latent_key, scratch) as path, \
            pq.ParquetWriter(path, BY_LATENT_SCHEMA, compression=store.cfg.compression,
                             compression_level=store.cfg.compression_level) as writer:
        for batch in reader:
            act = batch.column("act")
            writer.write_table(pa.Table.from_arrays(
                [batch.column("latent_id"), batch.column("seq_id"), batch.column("pos"), act.cast(BY_LATENT_SCHEMA.field("act").type)],
                schema=BY_LATENT_SCHEMA))
            lat = batch.column("latent_id").to_numpy().astype(np.int64) - lo  # sorted: a short latent range
            cell = (lat - lat[0]) * cfg.hist_bins + batch.column("bin").to_numpy()
            hist.reshape(-1)[lat[0] * cfg.hist_bins:(lat[-1] + 1) * cfg.hist_bins] += \
                np.bincount(cell, minlength=(lat[-1] - lat[0] + 1) * cfg.hist_bins)
            end = offset + batch.num_rows
            r0, r1 = np.searchsorted(ends, offset, side="right"), np.searchsorted(first, end, side="left")
            sub = need[r0:r1]
            inside = (sub >= offset) & (sub < end)
            idx = sub[inside] - offset
            got_seq[r0:r1][inside] = batch.column("seq_id").to_numpy()[idx]
            got_pos[r0:r1][inside] = batch.column("pos").to_numpy()[idx]
            got_act[r0:r1][inside] = act.to_numpy()[idx]
            offset = end
        if offset == 0:
            writer.write_table(BY_LATENT_SCHEMA.empty_table())

    lap("sort")

    # quantiles exactly as np.quantile(acts, linspace(0, 1, Q + 1)) ('linear') computes them
    a_val, b_val = got_act[:, cols["q_hi"]], got_act[:, cols["q_lo"]]
    diff = b_val - a_val
    quant = np.where(gamma >= 0.5, b_val - diff * (1 - gamma), a_val + diff * gamma).astype(np.float32)
    quantiles = np.zeros((n_lat, cfg.n_quantiles + 1), np.float32)
    quantiles[active] = quant
    stats = _stats_table(lo, hi, n, max_act, sum_act, sum_sq, quantiles, hist)

    # 4. examples: top and quantile rows, then random candidates; each list is in (latent, rank)
    # order, so one stable sort by latent gives (latent, kind, rank) order.
    q_valid = q_valid.reshape(len(active), q_valid.shape[1] * q_valid.shape[2])
    q_rank = np.broadcast_to(np.arange(q_valid.shape[1], dtype=np.int32), q_valid.shape)[q_valid]
    contexts = ContextsLRU(store)
    lap("select")
    r_lat, r_rank, r_seq, r_pos = random_examples(con, store, contexts, hook, bucket, active + lo, committed, shard_size, cfg)
    lat_rows = np.broadcast_to((active + lo)[:, None], need.shape)
    ex_lat = np.concatenate([lat_rows[:, cols["top"]][top_valid], lat_rows[:, cols["pick"]][q_valid], r_lat])
    ex_kind = np.repeat(np.array([0, 1, 2], np.int8), [int(top_valid.sum()), int(q_valid.sum()), len(r_lat)])
    ex_rank = np.concatenate([np.broadcast_to(top, top_valid.shape)[top_valid], q_rank, r_rank]).astype(np.int32)
    ex_seq = np.concatenate([got_seq[:, cols["top"]][top_valid], got_seq[:, cols["pick"]][q_valid], r_seq])
    ex_pos = np.concatenate([got_pos[:, cols["top"]][top_valid], got_pos[:, cols["pick"]][q_valid], r_pos])
    lap("random")
    del need, got_seq, got_pos, got_act, lat_rows, r_lat, r_rank, r_seq, r_pos
    order = np.argsort(ex_lat, kind="stable")
    ex_lat, ex_kind, ex_rank, ex_seq, ex_pos = ex_lat[order], ex_kind[order], ex_rank[order], ex_seq[order], ex_pos[order]
    del order
    pa.default_memory_pool().release_unused()  # the sorted stream's batches: memory for the examples
    write_examples(con, store, contexts, examples_key, scratch, ex_lat, ex_kind, ex_rank, ex_seq, ex_pos,
                   shard_size, cfg, lap, act_dtype=BY_LATENT_SCHEMA.field("act").type.to_pandas_dtype())
    con.close()
    lap("examples")
    return int(n.sum()), stats, timings


def _stats_table(lo, hi, n, max_act, sum_act, sum_sq, quantiles, hist) -> pa.Table:
    nq = quantiles.shape[1]
    q_off = np.concatenate([[0], np.cumsum(np.where(n > 0, nq, 0))]).astype(np.int32)
    quant = pa.ListArray.from_arrays(pa.array(q_off), pa.array(quantiles[n > 0].ravel(), pa.float32()))
    h_off = (np.arange(len(n) + 1) * hist.shape[1]).astype(np.int32)
    histogram = pa.ListArray.from_arrays(pa.array(h_off), pa.array(hist.ravel(), pa.int64()))
    return pa.table({"latent_id": pa.array(np.arange(lo, hi, dtype=np.int32)), "n_active": pa.array(n.astype(np.int64)),
                     "max_act": pa.array(max_act), "sum_act": pa.array(sum_act), "sum_sq_act": pa.array(sum_sq),
                     "quantiles": quant.cast(pa.list_(pa.float32())), "histogram": histogram.cast(pa.list_(pa.int64()))})


def random_examples(con, store: RunStore, contexts: ContextsLRU, hook: str, bucket: int, latents: np.ndarray,
                    committed: np.ndarray, shard_size: int, cfg: PostprocessConfig):
    """(latent, rank, seq_id, pos) of random windows where the latent is active nowhere (module doc)."""
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64))
    if not len(committed) or not len(latents) or cfg.n_random <= 0:
        return empty
    salt = mix64(np.uint64(cfg.seed) ^ np.uint64(bucket))
    pool = np.sort(committed[np.argsort(mix64(salt ^ committed.astype(np.uint64)), kind="stable")[:cfg.random_pool_shards]])
    seqs, poss, lens = [], [], []
    for shard in pool.tolist():
        seq, offsets, _ = contexts.get(shard)
        ln = np.diff(offsets)
        seqs.append(np.repeat(seq, ln))
        poss.append(np.arange(ln.sum()) - np.repeat(offsets[:-1], ln))
        lens.append(np.repeat(ln, ln))
    seq, pos, ln = np.concatenate(seqs), np.concatenate(poss), np.concatenate(lens)
    if not len(seq):
        return empty
    h = mix64(salt ^ ((seq.astype(np.uint64) << np.uint64(POS_BITS)) | pos.astype(np.uint64)))
    take = np.argsort(h, kind="stable")[: 10 * cfg.n_random]
    seq, pos, ln, h = seq[take], pos[take], ln[take], h[take]
    start = window_start(pos, ln, cfg.window)
    _, uniq = np.unique((seq << POS_BITS) | start, return_index=True)  # distinct windows; smallest hash kept
    uniq = np.sort(uniq)
    seq, pos, start, stop, h = seq[uniq], pos[uniq], start[uniq], np.minimum(start[uniq] + cfg.window, ln[uniq]), h[uniq]
    cands = pa.table({"cand": np.arange(len(seq)), "seq_id": seq, "lo": start, "hi": stop})
    con.register("cands", cands)
    hits = con.execute("""SELECT DISTINCT p.latent_id, c.cand FROM pairs p JOIN cands c
                          ON p.seq_id = c.seq_id AND p.pos >= c.lo AND p.pos < c.hi""").fetchnumpy()
    con.unregister("cands")
    lat_index = np.searchsorted(latents, hits["latent_id"].astype(np.int64))
    out = ([], [], [], [])
    for c0 in range(0, len(latents), 4096):  # chunks of latents bound the [latents, candidates] matrix
        lat = latents[c0:c0 + 4096]
        key = mix64(h[None, :] ^ lat.astype(np.uint64)[:, None])
        blocked = np.zeros(key.shape, bool)
        sel = (lat_index >= c0) & (lat_index < c0 + len(lat))
        blocked[lat_index[sel] - c0, hits["cand"][sel]] = True
        key[blocked] = np.iinfo(np.uint64).max
        order = np.arange(key.shape[1])[None, :].repeat(len(lat), 0)
        if key.shape[1] > cfg.n_random:  # the n_random smallest, then sorted: the first of a stable argsort
            order = np.argpartition(key, cfg.n_random - 1, axis=1)[:, :cfg.n_random]
        order = np.take_along_axis(order, np.argsort(np.take_along_axis(key, order, 1), axis=1, kind="stable"), 1)
        ok = ~np.take_along_axis(blocked, order, axis=1)
        li, j = np.nonzero(ok)  # unblocked come first in each row, so j is the rank
        out[0].append(lat[li])
        out[1].append(j.astype(np.int32))
        out[2].append(seq[order[li, j]])
        out[3].append(pos[order[li, j]])
    return tuple(np.concatenate(x) for x in out)


def window_start(pos, length, window: int):
    return np.clip(np.asarray(pos) - window // 2, 0, np.maximum(np.asarray(length) - window, 0))


def cut_windows(store: RunStore, contexts: ContextsLRU, seq: np.ndarray, pos: np.ndarray, shard_size: int,
                W: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(start, wlen, widx, windows): each example's window start and length, and its row in `windows`
    [U, W] int32, the distinct (seq_id, start) windows' tokens (past wlen: padding). One pass over
    the contexts shards the examples refer to, in shard order; each distinct window is cut once, as
    one row gather from a sliding-window view (no per-token index arrays)."""
    m = len(seq)
    start, wlen, widx = np.zeros(m, np.int32), np.zeros(m, np.int32), np.zeros(m, np.int64)
    # at most m distinct windows: rows past the last one written are never touched (never resident)
    windows = np.empty((max(m, 1), W), np.int32)
    order = np.argsort(seq, kind="stable")
    shards, cuts = np.unique(seq[order] // shard_size, return_index=True)
    n_win = 0
    for shard, members in zip(shards.tolist(), np.split(order, cuts[1:])):
        cseq, offsets, values = contexts.get(shard)
        row = np.searchsorted(cseq, seq[members])
        if np.any(row >= len(cseq)) or np.any(cseq[np.minimum(row, len(cseq) - 1)] != seq[members]):
            raise OSError(f"{store.path(contexts_key(shard))} lacks a context that latents refer to")
        length = offsets[row + 1] - offsets[row]
        st = window_start(pos[members], length, W)
        start[members], wlen[members] = st, np.minimum(W, length)
        key, inv = np.unique((row.astype(np.int64) << 32) | st, return_inverse=True)
        widx[members] = n_win + inv.reshape(-1)
        padded = np.concatenate([values, np.zeros(W, values.dtype)])  # windows past the end read padding
        view = np.lib.stride_tricks.sliding_window_view(padded, W)
        windows[n_win:n_win + len(key)] = view[offsets[key >> 32] + (key & 0xFFFFFFFF)]
        n_win += len(key)
    windows = windows[:n_win]
    return start, wlen, widx, windows


def window_acts(con, lat, kind, seq, start, wlen, W: int, act_dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """(acts [non-random examples, W] in the run's act dtype, their indices): each example's latent's activations in
    its window (the pairs' own dtype, exact), from one unordered DuckDB join restricted to these
    examples' latent range, scattered (no sort of the hits). Random windows have none by construction."""
    nr = np.flatnonzero(kind != 2)
    win_acts = np.zeros((len(nr), W), act_dtype)
    if not len(nr):
        return win_acts, nr
    con.register("ex", pa.table({"ex": np.arange(len(nr), dtype=np.int32), "latent_id": lat[nr].astype(np.int32),
                                 "seq_id": seq[nr], "lo": start[nr].astype(np.int32),
                                 "hi": (start[nr] + wlen[nr]).astype(np.int32)}))
    hits = con.sql(f"""SELECT e.ex, p.pos - e.lo AS off, p.act FROM ex e JOIN
                         (SELECT latent_id, seq_id, pos, act FROM pairs
                          WHERE latent_id BETWEEN {int(lat[nr[0]])} AND {int(lat[nr[-1]])}) p
                       ON p.latent_id = e.latent_id AND p.seq_id = e.seq_id AND p.pos >= e.lo AND p.pos < e.hi""")
    for b in hits.to_arrow_reader(1 << 20):
        cell = (b.column("ex").to_numpy(), b.column("off").to_numpy())
        act = np.maximum(win_acts[cell], b.column("act").to_numpy().astype(act_dtype))
        win_acts[cell] = act
        lost = win_acts[cell] < act  # a latent twice at one position (never from a top-k): the max
        if lost.any():
            np.maximum.at(win_acts, (cell[0][lost], cell[1][lost]), act[lost])
    con.unregister("ex")
    return win_acts, nr


def write_examples(con, store: RunStore, contexts: ContextsLRU, key: str, scratch: str, lat, kind, rank, seq, pos,
                   shard_size: int, cfg: PostprocessConfig, lap=lambda name: None, chunk: int = 1 << 16,
                   act_dtype=np.float16) -> None:
    """Token windows and this latent's activations in them, `per_pass` examples (a latent range) at
    a time, so memory does not follow the example count: the distinct windows are cut once
    (cut_windows), activations come from one unordered DuckDB join over that latent range, and the
    part is written in chunks of examples."""
    from pipeline.outputs.layout import EXAMPLES_SCHEMA

    W, m, per_pass = cfg.window, len(lat), EXAMPLES_PER_PASS
    kinds = pa.array(list(KIND_CODES), pa.string())
    in_window = np.arange(W)[None, :]
    with local_output(store, key, scratch) as path, \
            pq.ParquetWriter(path, EXAMPLES_SCHEMA, compression=store.cfg.compression,
                             compression_level=store.cfg.compression_level,
                             use_dictionary=["latent_id", "kind"],  # token lists: dictionaries cost, save little
                             write_statistics=["latent_id", "kind", "rank", "seq_id", "pos"]) as writer:
        for g0 in range(0, m, per_pass):
            g = slice(g0, min(m, g0 + per_pass))
            start, wlen, widx, windows = cut_windows(store, contexts, seq[g], pos[g], shard_size, W)
            lap("windows")
            win_acts, nr = window_acts(con, lat[g], kind[g], seq[g], start, wlen, W, act_dtype)
            lap("acts")
            full = bool(np.all(wlen == W))  # contexts at least a window long: every list is W long, no mask
            for c0 in range(0, len(start), chunk):
                c1 = min(len(start), c0 + chunk)
                a, b = np.searchsorted(nr, [c0, c1])
                acts = np.zeros((c1 - c0, W), np.float32)
                acts[nr[a:b] - c0] = win_acts[a:b]
                wl = wlen[c0:c1]
                tokens = windows[widx[c0:c1]]
                if full:
                    out_off = np.arange(c1 - c0 + 1, dtype=np.int32) * W
                    tokens, acts = tokens.reshape(-1), acts.reshape(-1)
                else:
                    out_off = np.concatenate([[0], np.cumsum(wl)]).astype(np.int32)
                    mask = in_window < wl[:, None]
                    tokens, acts = tokens[mask], acts[mask]
                off32 = pa.array(out_off)
                e0, e1 = g0 + c0, g0 + c1
                writer.write_table(pa.Table.from_arrays([
                    pa.array(lat[e0:e1].astype(np.int32)), kinds.take(pa.array(kind[e0:e1])),
                    pa.array(rank[e0:e1], pa.int32()), pa.array(seq[e0:e1].astype(np.int64)),
                    pa.array(pos[e0:e1].astype(np.int32)),
                    pa.ListArray.from_arrays(off32, pa.array(tokens)).cast(pa.list_(pa.int32())),
                    pa.ListArray.from_arrays(off32, pa.array(acts)).cast(pa.list_(pa.float32()))], schema=EXAMPLES_SCHEMA))
            del start, wlen, widx, windows, win_acts, nr
            lap("examples")
        if m == 0:
            writer.write_table(EXAMPLES_SCHEMA.empty_table())

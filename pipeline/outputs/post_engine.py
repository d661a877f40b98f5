"""The post-processing engine: a vectorised map per shard and a bounded reduce per latent bucket.

map (one committed shard): arrow -> numpy, drop zero activations, compute each pair's bucket,
    split by bucket with one stable radix argsort (offsets from a bincount), write one spill part
    per touched bucket. No per-row Python; memory is one shard.
reduce (one latent bucket), in ascending latent ranges whose pairs each fit `task_memory_mb`
    (held_ranges; a bucket that fits is one range): each range is read into numpy
    (InMemoryPairs) and everything below runs over those arrays, so memory is one range's,
    whatever the corpus size. A latent alone over the budget (a Zipf-hot latent with 1e8 pairs)
    is its own range, read in act ranges (_hot_latent_source). Where acts are float32 or
    bucket_size > 2^16, the bucket is DuckDB's, over its spill parts with `memory_limit` and a
    `temp_directory`: sorts and aggregates go out of core and cost disk.
    1. one DuckDB GROUP BY latent: counts, exact sums (activations are float16, so act * 2^24 is an
       integer and the sums are int128: order-independent and deterministic; a float32 run's acts
       are rounded to 2^-24 for the sums only), max;
    2. the random examples' window hits: the (latent, candidate window) pairs that rule out random
       examples (binary searches over the held pairs in token order, or DuckDB's range join);
    3. the pairs in (latent, act desc, seq, pos) order (one uint64 key sort in numpy, or DuckDB's
       ORDER BY; the same rows) streamed in record batches: written straight to by_latent,
       histogram bins counted (np.bincount per batch), and the few rows at precomputed ranks
       (top-n, quantile picks, the order statistics of the quantiles: one [latents, columns]
       matrix, no search) kept as they pass;
    4. the examples part, by reference: (latent_id, kind, rank, seq_id, pos, act) per chosen
       activation, the window rule in its metadata. Nothing is cut from the contexts here:
       pipeline/outputs/windows.py cuts windows where they are read (issue 23: storing each
       example's window and acts was ~65% of the reduce's time and duplicated the corpus).
    Memory beyond the range's budget is per example (about 25 bytes), bounded by bucket_size * ~90,
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
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import PostprocessConfig
from pipeline.outputs.layout import EXAMPLES_SCHEMA
from pipeline.outputs.sink import RunStore, with_retries
from pipeline.outputs.windows import ContextShard, ragged_index, window_metadata, window_start


def spill_schema(act_type: pa.DataType | None = None) -> pa.Schema:
    """A spill part keeps the latents' act type (float16, or float32 for output.acts_dtype=float32)."""
    return pa.schema([("latent_id", pa.int32()), ("seq_id", pa.int64()), ("pos", pa.int32()),
                      ("act", act_type or pa.float16())])


SPILL_SCHEMA = spill_schema()
SPILL_VERSION = 3  # 3: no histogram bin column (the reduce bins the sorted acts)
POS_BITS = 24
SCALE = 2.0 ** 24  # float16 values are integer multiples of 2^-24
KIND_CODES = ("top", "quantile", "random")
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
    return {"version": SPILL_VERSION, "bucket_size": cfg.bucket_size}  # v3: the histogram is the reduce's


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
def active_mask(acts: np.ndarray) -> np.ndarray:
    """acts > 0 (NaN excluded), read from float16's bits: numpy's float16 compare converts every value."""
    if acts.dtype == np.float16:  # positive, +inf included: bit patterns 0x0001..0x7C00 (above: NaN; sign bit: < 0)
        return acts.view(np.uint16) - np.uint16(1) < np.uint16(0x7C00)  # 0 wraps to 0xFFFF
    return acts > 0


def split_pairs(latents: pa.Table, cfg: PostprocessConfig) -> tuple[int, Iterator[tuple[int, pa.Table]]]:
    """(active pairs, (bucket, spill table) per touched bucket) of one shard's latents part.

    Pairs keep the part's row order within a bucket (one stable radix pass on the bucket number),
    so a part written in (seq_id, pos) order gives spill parts in that order too."""
    if cfg.hist_bins > 256:  # the reduce bins into uint8
        raise ValueError(f"hist_bins={cfg.hist_bins}: at most 256")
    ids_col, acts_col = latents["latent_ids"].combine_chunks(), latents["acts"].combine_chunks()
    schema = spill_schema(acts_col.type.value_type)
    k = ids_col.type.list_size
    ids = ids_col.flatten().to_numpy()
    acts = acts_col.flatten().to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(active_mask(acts))  # top-k keeps k values even where ReLU made them 0
    shift = cfg.bucket_size.bit_length() - 1
    bucket = ids[keep] >> shift if cfg.bucket_size == 1 << shift else ids[keep] // cfg.bucket_size
    counts = np.bincount(bucket) if bucket.size else np.zeros(0, np.int64)
    if len(counts) <= 1 << 16:
        keep = keep[np.argsort(bucket.astype(np.uint16), kind="stable")]  # radix sort on uint16
    else:
        keep = keep[np.argsort(bucket, kind="stable")]
    del bucket
    row = keep // k
    ids, acts = ids[keep].astype(np.int32, copy=False), acts[keep]
    seq = latents["seq_id"].to_numpy()[row]
    pos = latents["pos"].to_numpy()[row].astype(np.int32, copy=False)
    touched = np.flatnonzero(counts)
    ends = np.cumsum(counts)[touched]
    starts = ends - counts[touched]

    def parts() -> Iterator[tuple[int, pa.Table]]:
        for b, s, e in zip(touched.tolist(), starts.tolist(), ends.tolist()):
            yield b, pa.Table.from_arrays([pa.array(ids[s:e]), pa.array(seq[s:e]), pa.array(pos[s:e]),
                                           pa.array(acts[s:e], schema.field("act").type)], schema=schema)

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
                  committed: np.ndarray, cfg: PostprocessConfig,
                  by_latent_key: str, examples_key: str) -> tuple[int, pa.Table, dict]:
    """Write by_latent and examples for latents [lo, hi) from the given spill parts; return (pairs, stats, seconds per stage)."""
    scratch = tempfile.mkdtemp(prefix=f"sae-post-{bucket}-")
    try:
        return _reduce(store, hook, bucket, lo, hi, spill_keys, committed, cfg,
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


def _reduce(store, hook, bucket, lo, hi, spill_keys, committed, cfg, by_latent_key, examples_key, scratch):
    clock = [time.perf_counter()]
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - clock[0]
        clock[0] = now

    con = duckdb_connect(scratch, cfg.task_memory_mb, int(max(1, cfg.num_cpus)))
    paths = _spill_paths(store, spill_keys, scratch)
    ranges = held_ranges(paths, lo, hi, cfg)
    if ranges is None and paths:
        con.read_parquet(paths).create_view("pairs")
    elif not paths:
        # no pairs (a bucket no shard touched): DuckDB has no Arrow float16; it reads the spill's as FLOAT
        con.register("pairs", SPILL_SCHEMA.set(3, pa.field("act", pa.float32())).empty_table())
    candidates = random_candidates(store, bucket, committed, cfg)  # the same windows for every range
    lap("fetch")
    from pipeline.outputs.layout import MANIFEST_KEY, by_latent_schema, run_acts_dtype

    by_latent = by_latent_schema(run_acts_dtype(store.read_json(MANIFEST_KEY)))  # the run's acts dtype
    stats, examples = [], []
    with local_output(store, by_latent_key, scratch) as path, \
            pq.ParquetWriter(path, by_latent, compression=store.cfg.compression,
                             compression_level=store.cfg.compression_level) as writer:
        for r in ranges or [LatentRange(lo, hi, -1)]:  # ascending latent ranges: by_latent stays sorted
            if ranges is None:
                source = _duckdb_source(con, r, candidates)
            elif r.hot:
                source = _hot_latent_source(con, paths, r, candidates, cfg, lap)
            else:
                source = _held_source(con, paths, r, candidates, len(ranges) == 1, lap)
            lap("stats")
            part_stats, part_examples = _index_and_examples(r, *source, candidates, writer, by_latent, cfg, lap)
            stats.append(part_stats)
            examples.append(part_examples)
        stats = pa.concat_tables(stats)
        pairs = int(np.sum(stats["n_active"].to_numpy()))
        if pairs == 0:
            writer.write_table(by_latent.empty_table())
    con.close()
    ex = [np.concatenate(col) for col in zip(*examples)]  # ranges ascend, each in (latent, kind, rank) order
    write_examples(store, examples_key, scratch, *ex, cfg)
    lap("examples")
    return pairs, stats, timings


class LatentRange(NamedTuple):
    """Latents [lo, hi) of a bucket reduced together; n_pairs of them (-1: not counted); hot: one
    latent alone over the budget, reduced in act ranges."""
    lo: int
    hi: int
    n_pairs: int
    hot: bool = False


# 1. statistics: one scan grouped by latent; exact int128 sums. The histogram is counted in 3.
# v * v as DOUBLE is exact (v = a float16's 11-bit significand * 2^j: its square has <= 22 bits),
# and far cheaper than an int128 multiply per row; only the sum needs int128. A hot latent's
# table has one row per distinct act with `times`, the pairs it stands for: the same sums.
STATS_SQL = """
    SELECT latent_id, CAST({n} AS BIGINT) AS n, CAST(sum({s}) AS DOUBLE) AS s, CAST(sum({sq}) AS DOUBLE) AS sq, max(act) AS mx
    FROM (SELECT *, CAST(act * {scale} AS BIGINT) AS v FROM {table}) GROUP BY latent_id"""
PAIR_TERMS = dict(n="count(*)", s="v", sq="CAST(CAST(v AS DOUBLE) * v AS HUGEINT)")
TALLY_TERMS = dict(n="sum(times)", s="CAST(v AS HUGEINT) * times", sq="CAST(CAST(v AS DOUBLE) * v AS HUGEINT) * times")


def _latent_stats(con, r: LatentRange, table: str, terms: dict = PAIR_TERMS) -> tuple[np.ndarray, ...]:
    """(n, sum, sum of squares, max) per latent of the range, by STATS_SQL over a DuckDB table."""
    g = con.sql(STATS_SQL.format(**terms, scale=SCALE, table=table)).to_arrow_table()
    local = g["latent_id"].to_numpy().astype(np.int64) - r.lo
    n, sum_act, sum_sq, max_act = (np.zeros(r.hi - r.lo, t) for t in (np.int64, np.float64, np.float64, np.float32))
    n[local] = g["n"].to_numpy()
    sum_act[local] = g["s"].to_numpy() / SCALE
    sum_sq[local] = g["sq"].to_numpy() / (SCALE * SCALE)
    max_act[local] = g["mx"].to_numpy()
    return n, sum_act, sum_sq, max_act


# A source gives a range's statistics, its pairs as a sorted stream of record batches, and its
# random examples' window hits (called once the stream is consumed): the same from all three.

def _held_source(con, paths, r: LatentRange, candidates, whole: bool, lap):
    """A range that fits the budget: read into numpy once; DuckDB aggregates a float32 copy of its
    acts (DuckDB reads no Arrow float16; exact), hits are binary searches, the sort one key sort."""
    in_range = None if whole else (lambda lid, act: (lid >= r.lo) & (lid < r.hi))
    held = InMemoryPairs.load(paths, r.n_pairs, in_range)
    lap("fetch")
    con.register("pairs", held.for_duckdb())
    stats = _latent_stats(con, r, "pairs")
    con.unregister("pairs")  # frees the float32 acts
    hits = None  # found before the sort consumes the held arrays
    if candidates is not None:
        hits = held.window_hits(candidates.seq, candidates.start, candidates.stop)
    return stats, held.sorted_batches(r.lo), lambda: hits


def _duckdb_source(con, r: LatentRange, candidates):
    """The whole bucket by DuckDB over its spill parts (float32 acts, bucket_size > 2^16): out of core."""
    hits = None
    if candidates is not None:
        con.register("cands", pa.table({"cand": np.arange(len(candidates.seq)), "seq_id": candidates.seq,
                                        "lo": candidates.start, "hi": candidates.stop}))
        got = con.execute("""SELECT DISTINCT p.latent_id, c.cand FROM pairs p JOIN cands c
                             ON p.seq_id = c.seq_id AND p.pos >= c.lo AND p.pos < c.hi""").fetchnumpy()
        con.unregister("cands")
        hits = got["latent_id"].astype(np.int64), got["cand"].astype(np.int64)
    return _latent_stats(con, r, "pairs"), _duckdb_sorted(con), lambda: hits


def _hot_latent_source(con, paths, r: LatentRange, candidates, cfg: PostprocessConfig, lap):
    """One latent whose pairs alone are over the budget (a dense latent of a big corpus): its acts
    tallied by float16 value (one bincount of their bits per spill part) give exact statistics, and
    cut its descending act order into ranges that each fit; each act range is read and sorted like
    a held range, so memory is one act range's and the rows are DuckDB's ORDER BY's."""
    latent = r.lo
    tally = np.zeros(1 << 16, np.int64)
    for p in paths:
        t = pq.read_table(p, columns=["latent_id", "act"])
        tally += np.bincount(t["act"].to_numpy()[t["latent_id"].to_numpy() == latent].view(np.uint16), minlength=1 << 16)
        del t
    lap("fetch")
    bits = np.flatnonzero(tally)[::-1]  # the latent's distinct acts (positive float16: bits order as values), descending
    con.register("tally", pa.table({"latent_id": np.full(len(bits), latent, np.int32),
                                    "act": bits.astype(np.uint16).view(np.float16).astype(np.float32), "times": tally[bits]}))
    stats = _latent_stats(con, r, "tally", TALLY_TERMS)
    con.unregister("tally")
    cuts = budget_cuts(tally[bits], (cfg.task_memory_mb << 20) // BYTES_PER_SORTED_PAIR)
    cum = np.concatenate([[0], np.cumsum(tally[bits])])
    hits: list[tuple[np.ndarray, np.ndarray]] = []

    def stream() -> Iterator[pa.RecordBatch]:
        for c0, c1 in zip(cuts[:-1], cuts[1:]):  # act ranges in descending order
            top, bottom = np.uint16(bits[c0]), np.uint16(bits[c1 - 1])
            held = InMemoryPairs.load(paths, int(cum[c1] - cum[c0]), lambda lid, act, top=top, bottom=bottom: (
                lid == latent) & (act.view(np.uint16) <= top) & (act.view(np.uint16) >= bottom))
            if candidates is not None:
                hits.append(held.window_hits(candidates.seq, candidates.start, candidates.stop))
            yield from held.sorted_batches(latent)

    def all_hits():  # a (latent, candidate) found in several act ranges is the same hit: repeats are harmless
        return None if candidates is None else tuple(np.concatenate(x) for x in zip(*hits))
    return stats, stream(), all_hits


def budget_cuts(counts: np.ndarray, cap: int) -> list[int]:
    """Cut points 0 = c_0 < c_1 < ... = len(counts) such that each chunk counts[c_i:c_(i+1)] sums
    to at most `cap`, or is a single entry (one act value of one latent can't be split: its pairs
    are then held together); greedy, one step per chunk, not per entry."""
    cum = np.concatenate([[0], np.cumsum(counts)])
    cuts = [0]
    while cuts[-1] < len(counts):
        i = cuts[-1]
        cuts.append(max(i + 1, int(np.searchsorted(cum, cum[i] + cap, side="right")) - 1))
    return cuts


def _index_and_examples(r: LatentRange, stats, reader, window_hits, candidates, writer, by_latent, cfg, lap):
    """Stream a range's sorted pairs to by_latent, counting histograms and keeping the rows at the
    ranks the examples and quantiles need; returns (stats table, example columns in (latent,
    kind, rank) order)."""
    lo, hi = r.lo, r.hi
    n_lat = hi - lo
    n, sum_act, sum_sq, max_act = stats
    hist = np.zeros((n_lat, cfg.hist_bins), np.int64)
    # 2. the ranks whose rows we need from the sorted stream, one row of columns per active latent:
    # the quantiles' two order statistics, top_n, the quantile picks (missing ones: rank 0, ignored).
    active = np.flatnonzero(n)
    na = n[active]
    first = (np.cumsum(n) - n)[active]  # index of each active latent's first pair in the sorted stream
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
    offset = 0
    for batch in reader:
        act = batch.column("act")
        writer.write_table(pa.Table.from_arrays(
            [batch.column("latent_id"), batch.column("seq_id"), batch.column("pos"), act.cast(by_latent.field("act").type)],
            schema=by_latent))
        lat = batch.column("latent_id").to_numpy().astype(np.int64) - lo  # sorted: a short latent range
        cell = (lat - lat[0]) * cfg.hist_bins + hist_bin(act.to_numpy(zero_copy_only=False), cfg)
        hist.reshape(-1)[lat[0] * cfg.hist_bins:(lat[-1] + 1) * cfg.hist_bins] += \
            np.bincount(cell, minlength=(lat[-1] - lat[0] + 1) * cfg.hist_bins)
        end = offset + batch.num_rows
        r0, r1 = np.searchsorted(ends, offset, side="right"), np.searchsorted(first, end, side="left")
        b_seq, b_pos, b_act = batch.column("seq_id").to_numpy(), batch.column("pos").to_numpy(), act.to_numpy()
        # latents wholly inside the batch: every needed row is in it (a plain gather); the (at most
        # two) latents across the batch's edges: a mask
        i0 = r0 + int(r0 < r1 and first[r0] < offset)
        i1 = max(i0, r1 - int(r1 > r0 and ends[r1 - 1] > end))
        idx = need[i0:i1] - offset
        got_seq[i0:i1], got_pos[i0:i1], got_act[i0:i1] = b_seq[idx], b_pos[idx], b_act[idx]
        for row_i in {r0, r1 - 1} - set(range(i0, i1)) if r1 > r0 else ():
            row = need[row_i]
            inside = (row >= offset) & (row < end)
            got_seq[row_i][inside], got_pos[row_i][inside] = b_seq[row[inside] - offset], b_pos[row[inside] - offset]
            got_act[row_i][inside] = b_act[row[inside] - offset]
        offset = end
    lap("sort")
    r_lat, r_rank, r_seq, r_pos = random_picks(candidates, active + lo, window_hits(), cfg)
    lap("random")

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
    lat_rows = np.broadcast_to((active + lo).astype(np.int32)[:, None], need.shape)  # final dtypes: no copies later
    ex_lat = np.concatenate([lat_rows[:, cols["top"]][top_valid], lat_rows[:, cols["pick"]][q_valid], r_lat.astype(np.int32)])
    ex_kind = np.repeat(np.array([0, 1, 2], np.int8), [int(top_valid.sum()), int(q_valid.sum()), len(r_lat)])
    ex_rank = np.concatenate([np.broadcast_to(top.astype(np.int32), top_valid.shape)[top_valid], q_rank, r_rank])
    ex_seq = np.concatenate([got_seq[:, cols["top"]][top_valid], got_seq[:, cols["pick"]][q_valid], r_seq])
    ex_pos = np.concatenate([got_pos[:, cols["top"]][top_valid], got_pos[:, cols["pick"]][q_valid], r_pos.astype(np.int32)])
    ex_act = np.concatenate([got_act[:, cols["top"]][top_valid], got_act[:, cols["pick"]][q_valid],
                             np.zeros(len(r_lat), np.float32)])
    # radix (the latent's offset in the range fits 16 bits): the three lists merged by latent
    order = np.argsort((ex_lat - lo).astype(np.uint16 if n_lat <= 1 << 16 else np.int32), kind="stable")
    lap("select")
    return stats, tuple(x[order] for x in (ex_lat, ex_kind, ex_rank, ex_seq, ex_pos, ex_act))


SORTED_BATCH_ROWS = 1 << 20  # rows of the sorted stream per record batch
# The in-memory path's need per pair: held latent_id + act + where (14 bytes), the sort key (8,
# built a chunk at a time) and DuckDB's float32 copy of the acts for the statistics (4). Measured
# (bench/postprocess.py's hottest bucket, 14.9M pairs, in-memory): 806 MB peak RSS, against 1,075
# MB for the same bucket sorted by DuckDB at the default 512 MB memory_limit.
BYTES_PER_SORTED_PAIR = 32


def held_ranges(paths: list[str], lo: int, hi: int, cfg: PostprocessConfig) -> list[LatentRange] | None:
    """The bucket's latents cut into ascending ranges whose pairs each fit `task_memory_mb`
    (n_pairs * BYTES_PER_SORTED_PAIR), a latent alone over it as a hot range of its own; None
    where the bucket is DuckDB's (float32 acts, bucket_size > 2^16). A bucket that fits is one
    range, known from the parts' metadata; a larger one costs a read of its latent_id column
    (per-latent counts: one bincount per part) and one read per range later, so a bucket 4x the
    budget is read ~5 times from local disk instead of sorted out of core."""
    if not paths or hi - lo > 1 << 16:
        return None
    files = [pq.ParquetFile(p) for p in paths]
    if files[0].schema_arrow.field("act").type != pa.float16():
        return None
    cap = (cfg.task_memory_mb << 20) // BYTES_PER_SORTED_PAIR  # pairs per range
    n_pairs = sum(f.metadata.num_rows for f in files)
    if n_pairs <= cap:
        return [LatentRange(lo, hi, n_pairs)]
    count = np.zeros(hi - lo, np.int64)
    for f in files:
        count += np.bincount(f.read(columns=["latent_id"])["latent_id"].to_numpy() - lo, minlength=hi - lo)
    cuts = budget_cuts(count, cap)
    sums = np.add.reduceat(count, cuts[:-1])
    return [LatentRange(lo + c0, lo + c1, int(n), hot=bool(n > cap)) for c0, c1, n in zip(cuts[:-1], cuts[1:], sums)]


class InMemoryPairs:
    """Pairs of a bucket held in numpy, in token order (held_ranges says when: they fit
    `task_memory_mb`, acts are float16, bucket_size <= 2^16): read once (14 bytes a pair:
    latent_id, act, and where = seq_id << POS_BITS | pos) and used by the statistics, the sort
    and the random examples' window hits."""

    def __init__(self, latent_id: np.ndarray, act: np.ndarray, where: np.ndarray):
        self.latent_id, self.act, self.where = latent_id, act, where

    @classmethod
    def load(cls, paths: list[str], n_pairs: int, keep=None) -> InMemoryPairs:
        """The n_pairs pairs of the spill parts where keep(latent_id, act) (None: all their rows)."""
        latent_id, act, where = np.empty(n_pairs, np.int32), np.empty(n_pairs, np.float16), np.empty(n_pairs, np.int64)
        at = 0
        for p in paths:  # one spill part at a time into the preallocated arrays: no concatenated copy
            t = pq.read_table(p)
            lid, a = t["latent_id"].to_numpy(), t["act"].to_numpy()
            rows = slice(None) if keep is None else np.flatnonzero(keep(lid, a))
            end = at + (t.num_rows if keep is None else len(rows))
            latent_id[at:end], act[at:end] = lid[rows], a[rows]
            np.left_shift(t["seq_id"].to_numpy()[rows], POS_BITS, out=where[at:end])
            where[at:end] |= t["pos"].to_numpy()[rows]
            at = end
            del t, lid, a
        assert at == n_pairs, (at, n_pairs)
        # spill parts keep the latents parts' row order, usually token order (a token's several
        # latents in this bucket share a key: ties are fine, the sort breaks them by latent)
        if not np.all(where[1:] >= where[:-1]):
            order = np.argsort(where, kind="stable")
            latent_id, act, where = latent_id[order], act[order], where[order]
        return cls(latent_id, act, where)

    def for_duckdb(self) -> pa.Table:
        """What the statistics query reads: DuckDB reads no Arrow float16, so the acts as float32 (exact)."""
        return pa.table({"latent_id": self.latent_id, "act": self.act.astype(np.float32)})

    def window_hits(self, seq: np.ndarray, start: np.ndarray, stop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distinct (latent_id, candidate) with the latent active at a position of candidate c's
        window [start, stop) of context seq: DuckDB's range join, as two binary searches."""
        key = seq.astype(np.int64) << POS_BITS
        a = np.searchsorted(self.where, key | start)
        b = np.searchsorted(self.where, key | stop)
        idx = ragged_index(a, b - a)
        n_cand = max(len(a), 1)
        cand = np.repeat(np.arange(len(a), dtype=np.int64), b - a)
        pair = np.unique(self.latent_id[idx].astype(np.int64) * n_cand + cand)
        return pair // n_cand, pair % n_cand

    def sorted_batches(self, lo: int) -> Iterator[pa.RecordBatch]:
        """Record batches in (latent_id, act desc, seq_id, pos) order: one sort of a unique uint64
        key per pair, (latent's offset in the bucket) << 48 | (act's bits inverted) << 32 | (index
        in token order): positive float16s order as their bit patterns, and the token index breaks
        ties exactly as DuckDB's ORDER BY does (a latent appears once per position, so the order is
        total). numpy sorts uint64 with a vectorised quicksort (no stability needed: keys are
        unique); latent and act are read back from the sorted key, only seq_id and pos gathered."""
        where, n = self.where, len(self.where)
        assert n < 1 << 32
        key = np.empty(n, np.uint64)
        for c0 in range(0, n, SORTED_BATCH_ROWS):  # a chunk at a time: temporaries stay small
            c1 = min(c0 + SORTED_BATCH_ROWS, n)
            k = key[c0:c1]
            np.subtract(self.latent_id[c0:c1], lo, out=k, dtype=np.uint64, casting="unsafe")
            k <<= np.uint64(48)
            k |= (np.uint16(0xFFFF) - self.act[c0:c1].view(np.uint16)).astype(np.uint64) << np.uint64(32)
            k |= np.arange(c0, c1, dtype=np.uint64)
        self.latent_id = self.act = self.where = None  # the sort consumes the held arrays
        key.sort()
        for b0 in range(0, n, SORTED_BATCH_ROWS):
            k = key[b0:b0 + SORTED_BATCH_ROWS]
            w = where[(k & np.uint64(0xFFFFFFFF)).astype(np.int64)]
            latent = (k >> np.uint64(48)).astype(np.int32) + np.int32(lo)
            act = (np.uint16(0xFFFF) - (k >> np.uint64(32)).astype(np.uint16)).view(np.float16)
            yield pa.RecordBatch.from_arrays([pa.array(latent), pa.array(w >> POS_BITS),
                                              pa.array((w & ((1 << POS_BITS) - 1)).astype(np.int32)), pa.array(act)],
                                             names=["latent_id", "seq_id", "pos", "act"])


def _duckdb_sorted(con) -> Iterator[pa.RecordBatch]:
    yield from con.sql("SELECT latent_id, seq_id, pos, act FROM pairs ORDER BY latent_id, act DESC, seq_id, pos") \
        .to_arrow_reader(SORTED_BATCH_ROWS)


def _stats_table(lo, hi, n, max_act, sum_act, sum_sq, quantiles, hist) -> pa.Table:
    nq = quantiles.shape[1]
    q_off = np.concatenate([[0], np.cumsum(np.where(n > 0, nq, 0))]).astype(np.int32)
    quant = pa.ListArray.from_arrays(pa.array(q_off), pa.array(quantiles[n > 0].ravel(), pa.float32()))
    h_off = (np.arange(len(n) + 1) * hist.shape[1]).astype(np.int32)
    histogram = pa.ListArray.from_arrays(pa.array(h_off), pa.array(hist.ravel(), pa.int64()))
    return pa.table({"latent_id": pa.array(np.arange(lo, hi, dtype=np.int32)), "n_active": pa.array(n.astype(np.int64)),
                     "max_act": pa.array(max_act), "sum_act": pa.array(sum_act), "sum_sq_act": pa.array(sum_sq),
                     "quantiles": quant.cast(pa.list_(pa.float32())), "histogram": histogram.cast(pa.list_(pa.int64()))})


class RandomCandidates(NamedTuple):
    """A bucket's candidate random windows [start, stop) of context seq, from token pos, by hash."""
    seq: np.ndarray
    pos: np.ndarray
    start: np.ndarray
    stop: np.ndarray
    hash: np.ndarray


def random_candidates(store: RunStore, bucket: int, committed: np.ndarray, cfg: PostprocessConfig) -> RandomCandidates | None:
    """The bucket's candidate random windows, or None (module doc)."""
    if not len(committed) or cfg.n_random <= 0:
        return None
    salt = mix64(np.uint64(cfg.seed) ^ np.uint64(bucket))
    pool = np.sort(committed[np.argsort(mix64(salt ^ committed.astype(np.uint64)), kind="stable")[:cfg.random_pool_shards]])
    seqs, poss, lens = [], [], []
    for shard in pool.tolist():  # each pool shard read once (only its row lengths are used)
        ctx = ContextShard.read(store, shard)
        seq, offsets = ctx.seq, ctx.offsets
        ln = np.diff(offsets)
        seqs.append(np.repeat(seq, ln))
        poss.append(np.arange(ln.sum()) - np.repeat(offsets[:-1], ln))
        lens.append(np.repeat(ln, ln))
    seq, pos, ln = np.concatenate(seqs), np.concatenate(poss), np.concatenate(lens)
    if not len(seq):
        return None
    h = mix64(salt ^ ((seq.astype(np.uint64) << np.uint64(POS_BITS)) | pos.astype(np.uint64)))
    take = np.argsort(h, kind="stable")[: 10 * cfg.n_random]
    seq, pos, ln, h = seq[take], pos[take], ln[take], h[take]
    start = window_start(pos, ln, cfg.window)
    _, uniq = np.unique((seq << POS_BITS) | start, return_index=True)  # distinct windows; smallest hash kept
    uniq = np.sort(uniq)
    return RandomCandidates(seq[uniq], pos[uniq], start[uniq], np.minimum(start[uniq] + cfg.window, ln[uniq]), h[uniq])


def random_picks(candidates, latents: np.ndarray, hits, cfg: PostprocessConfig):
    """(latent, rank, seq_id, pos) of random windows where the latent is active nowhere (module
    doc), given the candidates and the window hits (latent, candidate) of the latents' pairs: each
    latent's choice depends only on them, so a bucket reduced in ranges gets the same rows."""
    if candidates is None or not len(latents):
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    seq, pos, h = candidates.seq, candidates.pos, candidates.hash
    hit_lat, hit_cand = hits
    lat_index = np.searchsorted(latents, hit_lat)
    out = ([], [], [], [])
    for c0 in range(0, len(latents), 4096):  # chunks of latents bound the [latents, candidates] matrix
        lat = latents[c0:c0 + 4096]
        key = mix64(h[None, :] ^ lat.astype(np.uint64)[:, None])
        blocked = np.zeros(key.shape, bool)
        sel = (lat_index >= c0) & (lat_index < c0 + len(lat))
        blocked[lat_index[sel] - c0, hit_cand[sel]] = True
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


def write_examples(store: RunStore, key: str, scratch: str, lat, kind, rank, seq, pos, act,
                   cfg: PostprocessConfig) -> None:
    """The examples part, by reference (layout.EXAMPLES_SCHEMA): one row per chosen activation,
    in (latent, kind, rank) order, the window rule in the schema metadata (windows.py cuts the
    windows where they are read). About 25 bytes per example in memory, ~90 per live latent.

    `kind` goes to Parquet as the int8 codes of a dictionary (Parquet stores strings as a
    dictionary anyway), not as a string per row; the file carries no Arrow schema, so readers see
    the plain string column of EXAMPLES_SCHEMA and its metadata as key-value metadata."""
    kinds = pa.DictionaryArray.from_arrays(pa.array(np.asarray(kind, np.int8)), pa.array(list(KIND_CODES)))
    table = pa.Table.from_arrays([
        pa.array(np.asarray(lat, np.int32)), kinds,
        pa.array(np.asarray(rank, np.int32)), pa.array(np.asarray(seq, np.int64)),
        pa.array(np.asarray(pos, np.int32)), pa.array(np.asarray(act, np.float32))], names=EXAMPLES_SCHEMA.names)
    with local_output(store, key, scratch) as path, \
            pq.ParquetWriter(path, table.schema, compression=store.cfg.compression,
                             compression_level=store.cfg.compression_level, store_schema=False) as writer:
        writer.write_table(table, row_group_size=1 << 20)  # dictionaries for all: the fastest and smallest here
        writer.add_key_value_metadata(window_metadata(cfg.window))

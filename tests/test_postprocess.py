"""Post-processing on a synthetic run written through the real sink (RunStore, commit markers,
latents_table): every output is checked against a brute-force pass over the same pairs.
Runs on the shared local Ray instance."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import PostprocessConfig, SinkConfig
from pipeline.outputs.layout import (
    CONTEXTS_SCHEMA,
    EXAMPLES_SCHEMA,
    LATENTS_PARQUET,
    commit_key,
    contexts_key,
    latents_key,
    latents_table,
)
from pipeline.outputs.postprocess import postprocess, window_start
from pipeline.outputs.sink import RunStore
from pipeline.outputs.windows import read_windows

pytestmark = pytest.mark.slow

N_LATENTS, K, SHARD_SIZE, CTX = 50, 4, 3, 40
HOOK = "layers.1"
CFG = PostprocessConfig(bucket_size=16, top_n=3, n_quantiles=2, per_quantile=2, n_random=3, window=8,
                        random_pool_shards=2, seed=1)


def write_shard(store: RunStore, shard: int, rng: np.random.Generator, latent_range=(0, N_LATENTS), commit=True):
    import pyarrow as pa

    seq = np.arange(shard * SHARD_SIZE, (shard + 1) * SHARD_SIZE)
    lengths = [CTX] * (SHARD_SIZE - 1) + [CTX // 2 + shard]  # ragged last context
    tokens = [rng.integers(0, 300, n).astype(np.int32) for n in lengths]
    ctx = pa.Table.from_arrays([pa.array(seq), pa.array([f"doc{shard}"] * SHARD_SIZE),
                                pa.array([0] * SHARD_SIZE, pa.int32()), pa.array(tokens, pa.list_(pa.int32()))],
                               schema=CONTEXTS_SCHEMA)
    files = [store.write_table(contexts_key(shard), ctx)]
    seq_ids = np.concatenate([[s] * n for s, n in zip(seq, lengths)])
    pos = np.concatenate([np.arange(n) for n in lengths]).astype(np.int32)
    ids = np.stack([rng.choice(np.arange(*latent_range), K, replace=False) for _ in seq_ids])
    vals = np.sort(rng.exponential(2.0, (len(seq_ids), K)), axis=1)[:, ::-1].copy()
    vals[rng.random(vals.shape) < 0.1] = 0.0  # ReLU zeros are kept by top-k but are not active
    vals = np.sort(vals, axis=1)[:, ::-1].copy()
    table = latents_table(seq_ids, pos, torch.from_numpy(vals), torch.from_numpy(ids.astype(np.int32)))
    files.append(store.write_table(latents_key(HOOK, shard), table, **LATENTS_PARQUET))
    if commit:
        store.write_json(commit_key(shard), {"shard": shard, "tokens": len(seq_ids),
                                             "files": [f.__dict__ for f in files]})


def make_run(root: Path, run_id: str, n_shards: int = 4) -> RunStore:
    store = RunStore(SinkConfig(root=str(root)), run_id)
    store.write_json("manifest.json", {"run_id": run_id, "hookpoints": [HOOK], "shard_size": SHARD_SIZE,
                                       "ctx_len": CTX, "saes": {HOOK: {"n_latents": N_LATENTS, "k": K}}})
    rng = np.random.default_rng(0)
    for shard in range(n_shards):
        write_shard(store, shard, rng)
    return store


def brute_force(root: Path, shards: list[int]):
    """All active pairs and all contexts of the given committed shards, straight from the parts."""
    lat = pd.concat([pq.read_table(root / latents_key(HOOK, s)).to_pandas() for s in shards])
    ctx = pd.concat([pq.read_table(root / contexts_key(s)).to_pandas() for s in shards])
    pairs = pd.DataFrame({
        "latent_id": np.concatenate(lat.latent_ids.to_numpy()),
        "seq_id": np.repeat(lat.seq_id.to_numpy(), K),
        "pos": np.repeat(lat.pos.to_numpy(), K),
        "act": np.concatenate(lat.acts.to_numpy()).astype(np.float32),
    })
    return pairs[pairs.act > 0], {int(s): np.asarray(t) for s, t in zip(ctx.seq_id, ctx.token_ids)}, len(lat)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def processed(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("post")
    store = make_run(root, "syn")
    # A crashed worker's shard: parts written, no commit marker. It must be invisible.
    write_shard(store, 4, np.random.default_rng(9), commit=False)
    summary = postprocess(store, CFG)
    return store, root / "syn", summary


def test_latent_stats_match_brute_force(processed):
    _, run, summary = processed
    pairs, _, tokens = brute_force(run, [0, 1, 2, 3])
    stats = pq.read_table(run / "latent_stats" / f"hookpoint={HOOK}" / "part-0.parquet").to_pandas()
    assert stats.latent_id.tolist() == list(range(N_LATENTS)) and summary["shards"] == 4
    g = pairs.groupby("latent_id").act
    expect_n = g.size().reindex(range(N_LATENTS), fill_value=0)
    assert stats.n_active.tolist() == expect_n.tolist()
    np.testing.assert_allclose(stats.density, expect_n / tokens)
    np.testing.assert_allclose(stats.sum_act, g.sum().reindex(range(N_LATENTS), fill_value=0), rtol=1e-6)
    np.testing.assert_allclose(stats.sum_sq_act, (pairs.act ** 2).groupby(pairs.latent_id).sum()
                               .reindex(range(N_LATENTS), fill_value=0), rtol=1e-6)
    np.testing.assert_allclose(stats.max_act, g.max().reindex(range(N_LATENTS), fill_value=0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean_act, (g.sum() / g.size()).reindex(range(N_LATENTS), fill_value=0), rtol=1e-5)
    assert stats.is_dead.tolist() == (expect_n == 0).tolist()
    for row in stats.itertuples():
        assert sum(row.histogram) == row.n_active and len(row.histogram) == CFG.hist_bins
        if row.n_active:
            assert len(row.quantiles) == CFG.n_quantiles + 1
            assert row.quantiles[0] == pytest.approx(g.min()[row.latent_id]) and row.quantiles[-1] == row.max_act


def test_by_latent_is_the_sorted_inverted_index(processed):
    _, run, _ = processed
    pairs, _, _ = brute_force(run, [0, 1, 2, 3])
    parts = sorted((run / "by_latent" / f"hookpoint={HOOK}").rglob("part-*.parquet"))
    assert len(parts) == -(-N_LATENTS // CFG.bucket_size)
    got = []
    for p in parts:
        t = pq.read_table(p).to_pandas()
        bucket = int(p.parent.name.split("=")[1])
        assert (t.latent_id // CFG.bucket_size == bucket).all()
        key = list(zip(t.latent_id, -t.act.astype(np.float32)))
        assert key == sorted(key)
        got.append(t)
    got = pd.concat(got).astype({"act": np.float32})
    cols = ["latent_id", "seq_id", "pos", "act"]
    a = got[cols].sort_values(cols).reset_index(drop=True)
    b = pairs[cols].sort_values(cols).reset_index(drop=True).astype(a.dtypes.to_dict())
    pd.testing.assert_frame_equal(a, b)
    assert not (got.seq_id >= 4 * 3).any()  # the uncommitted shard contributed nothing


def test_examples_windows_and_kinds(processed):
    _, run, _ = processed
    pairs, tokens, _ = brute_force(run, [0, 1, 2, 3])
    store = RunStore(SinkConfig(root=str(run.parent)), run.name)
    part = pq.read_table(run / "examples" / f"hookpoint={HOOK}")
    assert part.schema.names == EXAMPLES_SCHEMA.names + ["bucket"]  # by reference (+ the hive partition)
    assert part.schema.metadata[b"window"] == str(CFG.window).encode()
    ex = read_windows(store, HOOK, part).to_pandas()
    active = {(int(r.latent_id), int(r.seq_id), int(r.pos)): r.act for r in pairs.itertuples()}
    assert set(ex.kind) == {"top", "quantile", "random"}
    for latent, grp in pairs.groupby("latent_id"):
        top = ex[(ex.latent_id == latent) & (ex.kind == "top")].sort_values("rank")
        expect = grp.sort_values(["act", "seq_id", "pos"], ascending=[False, True, True]).head(CFG.top_n)
        assert list(zip(top.seq_id, top.pos)) == list(zip(expect.seq_id, expect.pos))
        groups = np.array_split(np.arange(len(grp)), CFG.n_quantiles)
        n_quantile = sum(min(CFG.per_quantile, len(g)) for g in groups)
        assert len(ex[(ex.latent_id == latent) & (ex.kind == "quantile")]) == n_quantile
    for r in ex.itertuples():
        toks = tokens[r.seq_id]
        start = int(window_start(r.pos, len(toks), CFG.window))
        assert list(r.token_ids) == toks[start:start + CFG.window].tolist()
        expect_acts = [active.get((r.latent_id, r.seq_id, start + i), 0.0) for i in range(len(r.token_ids))]
        np.testing.assert_allclose(r.acts, expect_acts, rtol=1e-6)
        assert r.start == start
        if r.kind == "random":
            assert not any(r.acts) and r.act == 0
        else:
            assert r.acts[r.pos - start] > 0 and r.act == r.acts[r.pos - start]
    assert (ex[ex.kind == "random"].groupby("latent_id").size() == CFG.n_random).all()


def test_rerun_skips_and_new_shard_reruns_only_touched_buckets(processed, tmp_path):
    store, run, _ = processed
    before = snapshot(run)
    again = postprocess(store, CFG)
    assert again["scattered"] == 0 and again["buckets_run"] == 0 and snapshot(run) == before

    # A new committed shard whose latents all fall in bucket 1: only bucket 1 is rebuilt.
    write_shard(store, 5, np.random.default_rng(5), latent_range=(16, 32))
    third = postprocess(store, CFG)
    assert third["scattered"] == 1 and third["buckets_run"] == 1
    after = snapshot(run)
    changed = {k for k in after if before.get(k) != after[k]}
    assert any("bucket=000001" in k for k in changed)
    assert not any(b in k for k in changed for b in ("bucket=000000", "bucket=000002", "bucket=000003"))
    assert f"latent_stats/hookpoint={HOOK}/part-0.parquet" in changed  # densities changed
    stats = pq.read_table(run / "latent_stats" / f"hookpoint={HOOK}").to_pandas()
    pairs, _, tokens = brute_force(run, [0, 1, 2, 3, 5])
    assert stats.n_active.tolist() == pairs.groupby("latent_id").size().reindex(range(N_LATENTS), fill_value=0).tolist()
    np.testing.assert_allclose(stats.density, stats.n_active / tokens)
    marker = json.loads((run / "_post" / f"hookpoint={HOOK}" / "bucket=000001.json").read_text())
    assert marker["shards"] == [[0, 3], [5, 5]]


def test_output_is_deterministic(tmp_path, ray_local):
    outs = []
    for name in ("a", "b"):
        store = make_run(tmp_path / name, "syn", n_shards=2)
        postprocess(store, CFG)
        outs.append({p.relative_to(tmp_path / name): pq.read_table(p)
                     for p in sorted((tmp_path / name).rglob("*.parquet")) if "/_post/" not in str(p)})
    assert outs[0].keys() == outs[1].keys()
    for key in outs[0]:
        assert outs[0][key].equals(outs[1][key]), key


def test_buckets_no_shard_touched_get_empty_outputs(tmp_path, ray_local):
    """Latents 16.. never fire (a dead bucket range): their buckets still get empty by_latent and
    examples parts and dead rows in latent_stats (the reduce over no spill part used to fail)."""
    store = RunStore(SinkConfig(root=str(tmp_path)), "dead")
    store.write_json("manifest.json", {"run_id": "dead", "hookpoints": [HOOK], "shard_size": SHARD_SIZE,
                                       "ctx_len": CTX, "saes": {HOOK: {"n_latents": N_LATENTS, "k": K}}})
    rng = np.random.default_rng(3)
    for shard in range(2):
        write_shard(store, shard, rng, latent_range=(0, CFG.bucket_size))
    summary = postprocess(store, CFG)
    assert summary["buckets_run"] == -(-N_LATENTS // CFG.bucket_size)
    run = tmp_path / "dead"
    stats = pq.read_table(run / "latent_stats" / f"hookpoint={HOOK}" / "part-0.parquet").to_pandas()
    assert stats.latent_id.tolist() == list(range(N_LATENTS))
    assert (stats.n_active[CFG.bucket_size:] == 0).all() and stats.is_dead[CFG.bucket_size:].all()
    assert stats.n_active[:CFG.bucket_size].sum() == len(brute_force(run, [0, 1])[0])
    for b in range(1, -(-N_LATENTS // CFG.bucket_size)):
        for kind in ("by_latent", "examples"):
            t = pq.read_table(run / kind / f"hookpoint={HOOK}" / f"bucket={b:06d}" / "part-0.parquet")
            assert t.num_rows == 0, (kind, b)


def test_windows_in_several_passes_are_identical(processed, monkeypatch):
    """The window reader matches window cells against the latents' k-lists CELLS_PER_PASS at a
    time (memory): any pass size gives the same windows."""
    from pipeline.outputs import windows

    store, run, _ = processed
    part = pq.read_table(run / "examples" / f"hookpoint={HOOK}")
    whole = read_windows(store, HOOK, part)
    monkeypatch.setattr(windows, "CELLS_PER_PASS", 7)
    assert part.num_rows * CFG.window > 7 * 3
    assert read_windows(store, HOOK, part).equals(whole)


def test_in_memory_sort_gives_duckdbs_rows(tmp_path, monkeypatch):
    """A bucket that fits task_memory_mb is sorted in numpy (one uint64 key sort), a larger one in
    latent ranges that each fit, a latent alone over the budget in act ranges: the same by_latent,
    examples and statistics as DuckDB's ORDER BY and GROUP BY, also when a spill part's rows are
    not in (seq_id, pos) order (the latents part's row order is the writer's)."""
    from pipeline.outputs import post_engine
    from pipeline.outputs.layout import bucket_marker_key, bucket_stats_key, by_latent_key, examples_key, spill_key
    from pipeline.outputs.postprocess import process_bucket, scatter_shard

    store = make_run(tmp_path, "sorts", n_shards=3)
    for s in range(3):
        scatter_shard(store, HOOK, s, CFG.bucket_size, CFG)
    spills = [str(tmp_path / "sorts" / spill_key(HOOK, 1, s)) for s in range(3)]
    for s, path in enumerate(spills):  # acts rounded to quarters: many ties, the order's hardest case
        t = pq.read_table(path)
        act = np.maximum(np.round(t["act"].to_numpy().astype(np.float32) * 4) / 4, 0.25).astype(np.float16)
        t = t.set_column(t.schema.get_field_index("act"), t.schema.field("act"), pa.array(act))
        if s == 1:  # a part out of token order
            t = t.take(np.random.default_rng(0).permutation(t.num_rows))
        pq.write_table(t, path)
    outs = []
    default = post_engine.BYTES_PER_SORTED_PAIR
    ids = np.concatenate([pq.read_table(p)["latent_id"].to_numpy() for p in spills])
    hottest = int(np.bincount(ids).max())
    budget = CFG.task_memory_mb << 20
    quarter = budget // max(len(ids) // 4, hottest)  # ranges of about a quarter of the pairs
    hot = budget // (hottest // 3)  # the hottest latents over the budget: reduced in act ranges
    lo = 1 * CFG.bucket_size
    for per_pair, check in ((quarter, lambda rs: len(rs) >= 3 and not any(r.hot for r in rs)),
                            (hot, lambda rs: sum(r.hot for r in rs) >= 2)):
        monkeypatch.setattr(post_engine, "BYTES_PER_SORTED_PAIR", per_pair)
        ranges = post_engine.held_ranges(spills, lo, lo + CFG.bucket_size, CFG)
        assert check(ranges) and sum(r.n_pairs for r in ranges) == len(ids), ranges
    planned = post_engine.held_ranges
    # numpy in one range, DuckDB, numpy in batches of 7 rows (needed rows picked across batch
    # edges), numpy in latent ranges, numpy with hot latents in act ranges
    for per_pair, rows, by_duckdb in ((default, 1 << 20, False), (default, 1 << 20, True), (default, 7, False),
                                      (quarter, 7, False), (hot, 7, False)):
        monkeypatch.setattr(post_engine, "BYTES_PER_SORTED_PAIR", per_pair)
        monkeypatch.setattr(post_engine, "SORTED_BATCH_ROWS", rows)
        monkeypatch.setattr(post_engine, "held_ranges", (lambda *a: None) if by_duckdb else planned)
        process_bucket(store, HOOK, 1, [0, 1, 2], N_LATENTS, [0, 1, 2], CFG)
        store.fs.rm(store.path(bucket_marker_key(HOOK, 1)))
        outs.append([pq.read_table(store.path(k)) for k in (by_latent_key(HOOK, 1), examples_key(HOOK, 1),
                                                             bucket_stats_key(HOOK, 1))])
    assert outs[0][0].num_rows > 100
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert a.equals(b)


def test_corrupt_committed_part_is_an_error_naming_the_file(tmp_path, ray_local):
    store = make_run(tmp_path, "bad", n_shards=2)
    part = tmp_path / "bad" / latents_key(HOOK, 1)
    part.write_bytes(part.read_bytes()[:100])
    with pytest.raises(OSError, match=str(part)):
        store.read_committed("latents", HOOK)
    with pytest.raises(OSError, match=str(part)):
        postprocess(store, CFG)
    part.unlink()  # missing part of a committed shard
    with pytest.raises(OSError, match=str(part)):
        store.read_committed("latents", HOOK)


def test_postprocess_tasks_do_not_import_torch():
    """The scatter and bucket tasks run this module in Ray worker processes: importing it must not
    pull in torch (~1 s of CPU per new process), only the logit-effects step (driver) needs it."""
    import subprocess
    import sys

    probe = "import sys, pipeline.outputs.postprocess; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_budget_cuts_keep_each_act_range_within_the_budget():
    """A hot latent's descending acts are cut into ranges of at most the budget's pairs (a single
    act value over it alone): what bounds the memory of a latent with more pairs than the budget."""
    from pipeline.outputs.post_engine import budget_cuts

    rng = np.random.default_rng(0)
    for counts, cap in [(rng.integers(1, 50, 1000), 200), (np.array([5, 500, 5, 5]), 20), (np.ones(7, int), 7),
                        (np.array([3]), 1)]:
        cuts = budget_cuts(counts, cap)
        assert cuts[0] == 0 and cuts[-1] == len(counts) and np.all(np.diff(cuts) > 0)
        sums = np.add.reduceat(counts, cuts[:-1])
        assert np.all((sums <= cap) | (np.diff(cuts) == 1))
        # greedy: no chunk could have taken the next entry too
        assert all(sums[i] + counts[cuts[i + 1]] > cap for i in range(len(sums) - 1))

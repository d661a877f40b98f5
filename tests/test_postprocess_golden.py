"""Post-processing of a REAL tiny run (corpus -> local Ray actors -> Parquet) against an
independent plain numpy/pandas reference computed in this file from the committed parts.

Pinned exactly: latent_stats (every column), by_latent (rows and order) and the top examples.
Quantile examples are pinned to the hash selection spec (pipeline/post_engine.py docstring), which
replaced the seeded-RNG loop: before the rewrite this test checked rank, group membership and
distinctness only (the RNG draw order was a Python loop). Random examples: inactive windows from
committed contexts, distinct, ranked 0..n-1.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from test_pipeline_e2e import HOOKS, make_cfg

from pipeline.config import PostprocessConfig, SinkConfig
from pipeline.outputs.postprocess import postprocess
from pipeline.outputs.sink import RunStore
from pipeline.outputs.windows import read_windows

pytestmark = pytest.mark.slow

CFG = PostprocessConfig(bucket_size=40, top_n=3, n_quantiles=3, per_quantile=2, n_random=4, window=6,
                        random_pool_shards=2, seed=7)
N_LATENTS = 96


@pytest.fixture(scope="module")
def real_run(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path_factory, ray_local):
    from pipeline.runtime.driver import run

    out = tmp_path_factory.mktemp("golden")
    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, out, run_id="g")
    run(cfg)
    store = RunStore(cfg.sink, cfg.run_id)
    summary = postprocess(store, CFG)
    return out / "g", summary


def reference(run, hook):
    """Active pairs, contexts by seq_id and the token count, straight from the committed parts."""
    import json

    shards = sorted(int(p.stem.split("=")[1]) for p in (run / "_commits").glob("shard=*.json"))
    lat, ctx = [], []
    for s in shards:
        files = {f["path"] for f in json.loads((run / "_commits" / f"shard={s:06d}.json").read_text())["files"]}
        lat.append(pq.read_table(run / next(f for f in files if f.startswith(f"latents/hookpoint={hook}/"))).to_pandas())
        ctx.append(pq.read_table(run / next(f for f in files if f.startswith("contexts/"))).to_pandas())
    lat, ctx = pd.concat(lat), pd.concat(ctx)
    k = len(lat.latent_ids.iloc[0])
    pairs = pd.DataFrame({"latent_id": np.concatenate(lat.latent_ids.to_numpy()).astype(np.int64),
                          "seq_id": np.repeat(lat.seq_id.to_numpy(), k), "pos": np.repeat(lat.pos.to_numpy(), k),
                          "act": np.concatenate(lat.acts.to_numpy()).astype(np.float32)})
    pairs = pairs[pairs.act > 0]
    pairs = pairs.sort_values(["latent_id", "act", "seq_id", "pos"], ascending=[True, False, True, True],
                              kind="mergesort").reset_index(drop=True)
    tokens = {int(s): np.asarray(t, np.int64) for s, t in zip(ctx.seq_id, ctx.token_ids)}
    return pairs, tokens, len(lat), shards


def mix64(v: int) -> int:
    """splitmix64's finaliser on Python ints (the selection spec's hash)."""
    v = (v + 0x9E3779B97F4A7C15) & (2**64 - 1)
    v = ((v ^ (v >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    v = ((v ^ (v >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return v ^ (v >> 31)


def window(tokens, seq_id, pos, w):
    toks = tokens[seq_id]
    start = min(max(pos - w // 2, 0), max(len(toks) - w, 0))
    return start, toks[start:start + w]


@pytest.mark.parametrize("hook", HOOKS)
def test_latent_stats_equal_reference(real_run, hook):
    run, summary = real_run
    pairs, _, n_tokens, shards = reference(run, hook)
    got = pq.read_table(run / "latent_stats" / f"hookpoint={hook}" / "part-0.parquet")
    assert got.schema.metadata[b"total_tokens"] == str(n_tokens).encode()
    got = got.to_pandas()
    assert got.latent_id.tolist() == list(range(N_LATENTS)) and summary["shards"] == len(shards)
    g = pairs.groupby("latent_id").act
    idx = range(N_LATENTS)
    n = g.size().reindex(idx, fill_value=0)
    assert got.n_active.tolist() == n.tolist()
    assert got.is_dead.tolist() == (n == 0).tolist()
    np.testing.assert_array_equal(got.density, n.to_numpy() / n_tokens)
    np.testing.assert_array_equal(got.max_act, g.max().reindex(idx, fill_value=0).astype(np.float32))
    # Sums of float16 values: exact up to float64 rounding whatever the summation order.
    s = pairs.act.astype(np.float64).groupby(pairs.latent_id).sum().reindex(idx, fill_value=0)
    sq = (pairs.act.astype(np.float64) ** 2).groupby(pairs.latent_id).sum().reindex(idx, fill_value=0)
    np.testing.assert_allclose(got.sum_act, s, rtol=1e-13)
    np.testing.assert_allclose(got.sum_sq_act, sq, rtol=1e-13)
    np.testing.assert_allclose(got.mean_act, (s / n.where(n > 0, 1)).astype(np.float32), rtol=1e-6)
    edges = 2.0 ** np.linspace(CFG.hist_log2_min, CFG.hist_log2_max, CFG.hist_bins + 1)
    probs = np.linspace(0, 1, CFG.n_quantiles + 1)
    for row in got.itertuples():
        acts = pairs.act[pairs.latent_id == row.latent_id].to_numpy()
        bins = np.clip(np.searchsorted(edges[1:-1], acts, side="right"), 0, CFG.hist_bins - 1)
        assert list(row.histogram) == np.bincount(bins, minlength=CFG.hist_bins).tolist()
        expect_q = np.quantile(acts, probs).astype(np.float32) if len(acts) else np.zeros(0, np.float32)
        np.testing.assert_array_equal(np.asarray(row.quantiles, np.float32), expect_q)


@pytest.mark.parametrize("hook", HOOKS)
def test_by_latent_equals_reference(real_run, hook):
    run, _ = real_run
    pairs, _, _, _ = reference(run, hook)
    parts = sorted((run / "by_latent" / f"hookpoint={hook}").rglob("part-*.parquet"))
    assert [int(p.parent.name.split("=")[1]) for p in parts] == list(range(-(-N_LATENTS // CFG.bucket_size)))
    got = pd.concat([pq.read_table(p).to_pandas() for p in parts]).reset_index(drop=True)
    assert str(got.act.dtype) == "float16"
    got = got.astype({"act": np.float32, "latent_id": np.int64, "pos": np.int64})
    pd.testing.assert_frame_equal(got, pairs.astype({"pos": np.int64}), check_dtype=False)


@pytest.mark.parametrize("hook", HOOKS)
def test_examples_equal_reference(real_run, hook):
    run, _ = real_run
    pairs, tokens, _, shards = reference(run, hook)
    ex = read_windows(RunStore(SinkConfig(root=str(run.parent)), run.name), hook,
                      pq.read_table(run / "examples" / f"hookpoint={hook}")).to_pandas()
    active = {(int(r.latent_id), int(r.seq_id), int(r.pos)): float(r.act) for r in pairs.itertuples()}
    W = CFG.window
    for r in ex.itertuples():  # every window's tokens and this latent's activations in it
        start, toks = window(tokens, r.seq_id, r.pos, W)
        assert list(r.token_ids) == toks.tolist()
        np.testing.assert_array_equal(r.acts, [active.get((r.latent_id, r.seq_id, start + i), 0.0)
                                               for i in range(len(toks))])
    for latent, grp in pairs.groupby("latent_id"):
        mine = ex[ex.latent_id == latent]
        top = mine[mine.kind == "top"].sort_values("rank")
        assert top["rank"].tolist() == list(range(min(CFG.top_n, len(grp))))
        assert list(zip(top.seq_id, top.pos)) == list(zip(grp.seq_id, grp.pos))[:CFG.top_n]
        # Quantile q: the q-th of n_quantiles equal-count groups (np.array_split) of the pairs in
        # descending act order; m = min(per_quantile, size) picks, evenly spaced from a hashed offset.
        quant = mine[mine.kind == "quantile"].sort_values("rank")
        expect = []
        for q, members in enumerate(np.array_split(np.arange(len(grp)), CFG.n_quantiles)):
            size, m = len(members), min(CFG.per_quantile, len(members))
            if size == 0:
                continue
            u = mix64(mix64(CFG.seed) ^ (int(latent) << 16 | q)) % size
            picks = sorted(int(members[0]) + (u + j * size // m) % size for j in range(m))
            expect += [(q * CFG.per_quantile + j, int(grp.seq_id.iloc[i]), int(grp.pos.iloc[i]))
                       for j, i in enumerate(picks)]
        assert list(zip(quant["rank"], quant.seq_id, quant.pos)) == expect
        rand = mine[mine.kind == "random"]
        assert rand["rank"].tolist() == list(range(len(rand))) and len(rand) <= CFG.n_random
        for r in rand.itertuples():
            assert not any(r.acts) and r.seq_id // 3 in shards
    assert set(ex.latent_id) == set(pairs.latent_id)
    assert (ex[ex.kind == "random"].groupby("latent_id").size() > 0).any()


def test_demo_streams_the_run_and_shows_the_in_memory_choice(real_run, tiny_model_dir, tiny_corpus, tiny_sae_dir,
                                                             caplog):
    """The demo reads one committed shard at a time (iter_committed); its latents and top contexts
    equal what the whole run, concatenated in memory, gives."""
    from pipeline.config import DemoConfig
    from pipeline.outputs.demo import show_top_contexts

    run, _ = real_run
    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, run.parent, run_id="g")
    cfg.demo = DemoConfig(show_latents=3, show_contexts=2, window=4)
    with caplog.at_level(logging.INFO, logger="pipeline.outputs.demo"):
        show_top_contexts(cfg, HOOKS[0])
    printed = "\n".join(r.getMessage() for r in caplog.records)
    lat = RunStore(cfg.sink, "g").read_committed("latents", HOOKS[0]).to_pandas()
    lat = lat[lat.pos > 0]
    k = len(lat.latent_ids.iloc[0])
    ids = np.concatenate(lat.latent_ids.to_numpy())
    acts = np.concatenate(lat.acts.to_numpy()).astype(np.float32)
    counts = np.bincount(ids, minlength=N_LATENTS)
    max_act = pd.Series(acts).groupby(ids).max().reindex(range(N_LATENTS), fill_value=0).to_numpy()
    from pipeline.outputs.demo import pick_latents

    chosen = pick_latents(counts, max_act, len(lat), 3)
    shown = [int(line.split()[2].rstrip(":")) for line in printed.splitlines() if line.startswith("=== latent")]
    assert shown == chosen and len(shown) == 3
    for latent in chosen:  # the strongest activation of each latent is the first context line
        block = printed.split(f"=== latent {latent}:")[1].splitlines()
        assert f"max act {acts[ids == latent].max():.2f}" in block[0]
        assert float(block[1].split()[0]) == pytest.approx(acts[ids == latent].max(), abs=5e-3)
    assert k == 8

"""`sae.latent_splits=S` and `sae.fvu_sample=N` through the real pipeline (local Ray, real files).

- S = 2 and 3 write latents byte-identical to the unsplit run; the SAE's encoder rows repeat
  every 16 latents, so every token's top-k has exact ties at the k-th place across part
  boundaries, and only the tie rule (lower id) decides which copies are stored.
- A part killed mid-shard (a real process exit) loses and duplicates nothing, whether Ray
  restarts the part or the harvest worker dies with it and the shard is redone.
- The FVU check in the commit markers, summary and manifest agrees with a dense reference.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from test_faults import assert_exactly_once, data_checksums
from test_pipeline_e2e import HOOKS, make_cfg

from pipeline.config import FaultConfig
from pipeline.sae.sae import SAE

pytestmark = pytest.mark.slow

D, L, PERIOD, K, FVU_SAMPLE = 32, 96, 16, 8, 5  # D: the tiny Llama's hidden size


def tie_sae(seed: int, hookpoint: str) -> SAE:
    """Integer-valued weights; latent j is a copy of latent j % PERIOD (encoder and decoder),
    6 copies each, spread over every part for S = 2 and 3. The top-8 of a token is then the
    6 copies of its best row and 2 of its second: the k-th place ties with 4 unselected copies
    in higher parts."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(-2, 3, (PERIOD, D), generator=g).float()
    dec = torch.randint(-2, 3, (PERIOD, D), generator=g).float()
    idx = torch.arange(L) % PERIOD
    return SAE(W_enc=base[idx].clone(), b_enc=torch.randint(0, 3, (PERIOD,), generator=g).float()[idx].clone(),
               W_dec=dec[idx].clone(), b_dec=torch.randint(-1, 2, (D,), generator=g).float(), k=K,
               hookpoint=hookpoint)


@pytest.fixture(scope="module")
def tie_sae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tie-saes")
    for seed, hook in enumerate(HOOKS):
        tie_sae(seed, hook).save(folder / hook)
    return folder


def split_cfg(tiny_model_dir, tiny_corpus, sae_dir, out, splits: int, **faults):
    cfg = make_cfg(tiny_model_dir, tiny_corpus, sae_dir, out, "same", shard_size=4,
                   cluster={"num_workers": 1, "max_in_flight": 0})
    sae = dataclasses.replace(cfg.sae, latent_splits=splits, split_cpus=0.1, fvu_sample=FVU_SAMPLE)
    return dataclasses.replace(cfg, sae=sae, faults=FaultConfig(**faults))


def latents_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / "latents").rglob("*.parquet"))}


@pytest.fixture(scope="module")
def unsplit_run(tiny_model_dir, tiny_corpus, tie_sae_dir, tmp_path_factory, ray_local):
    from pipeline.runtime.driver import run

    out = tmp_path_factory.mktemp("unsplit")
    cfg = split_cfg(tiny_model_dir, tiny_corpus, tie_sae_dir, out, 1)
    summary = run(cfg)
    assert summary.shards_done >= 4
    return cfg, summary, out / "same"


def split_bundles_seen(ray) -> list[int]:
    """Bundle counts of the placement groups this Ray instance has created (removed ones too)."""
    from ray.util.placement_group import placement_group_table

    return sorted(len(pg["bundles"]) for pg in placement_group_table().values())


@pytest.mark.parametrize("splits", [2, 3])
def test_split_run_writes_latents_identical_to_unsplit(unsplit_run, tiny_model_dir, tiny_corpus, tie_sae_dir,
                                                        tmp_path, ray_local, splits):
    from pipeline.runtime.driver import run

    _, _, reference = unsplit_run
    before = split_bundles_seen(ray_local)
    run(split_cfg(tiny_model_dir, tiny_corpus, tie_sae_dir, tmp_path, splits))
    root = tmp_path / "same"
    # The run really was split: one placement group of `splits` bundles per hookpoint.
    new = split_bundles_seen(ray_local)
    for n in before:
        new.remove(n)
    assert new == [splits] * len(HOOKS)
    expected = latents_files(reference)
    got = latents_files(root)
    assert got.keys() == expected.keys() and len(got) >= 4 * len(HOOKS)
    assert [name for name in got if got[name] != expected[name]] == []
    assert data_checksums(root) == data_checksums(reference)  # contexts and commit markers (with FVU) too
    # The data makes the tie rule matter: the k-th value ties with copies left out in later parts.
    lat = pq.read_table(root / "latents" / f"hookpoint={HOOKS[0]}").to_pandas()
    ids = np.stack(lat.latent_ids.to_numpy())
    acts = np.stack(lat.acts.to_numpy())
    kth_tied = (acts[:, K - 1] == acts[:, K - 2]) & (acts[:, K - 1] > 0)
    assert kth_tied.mean() > 0.5
    # With ties to the lower id, the 2 copies kept of the second-best row are its two lowest
    # copies (rows where the best and second-best rows differ in value).
    second = kth_tied & (acts[:, K - 3] > acts[:, K - 2])
    assert second.mean() > 0.3
    assert np.all(ids[second, K - 1] - ids[second, K - 2] == PERIOD)


@pytest.mark.parametrize("part_restarts", [2, 0], ids=["part-restarted", "worker-dies"])
def test_split_part_killed_mid_shard_loses_and_duplicates_nothing(unsplit_run, tiny_model_dir, tiny_corpus,
                                                                  tie_sae_dir, tmp_path, part_restarts):
    from pipeline.runtime.driver import run

    _, _, reference = unsplit_run
    marker = tmp_path / "part-died-once"
    cfg = split_cfg(tiny_model_dir, tiny_corpus, tie_sae_dir, tmp_path / "out", 2,
                    crash_shard=2, crash_point="split_part", once_marker=str(marker))
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, split_max_restarts=part_restarts))
    run(cfg)
    assert marker.exists(), "no part died: the fault was not exercised"
    # A placement group made by an actor lives as long as the driver: the dead worker's must be
    # removed, or its CPUs/GPUs stay reserved and a later worker may never be scheduled. The live
    # workers the run kept (cluster.reuse_workers) hold theirs until they are ended: end them first.
    from ray.util.placement_group import placement_group_table

    from pipeline.runtime.dispatch import release_kept_workers
    release_kept_workers()
    left = [pg["name"] for pg in placement_group_table().values() if pg["state"] != "REMOVED"]
    assert left == [], f"placement groups outlived their workers: {left}"
    root = tmp_path / "out" / "same"
    assert_exactly_once(root)
    assert data_checksums(root) == data_checksums(reference)


def test_fvu_check_agrees_with_dense_reference(unsplit_run, tiny_model_dir, tie_sae_dir):
    from pipeline.model.harvest import Harvester
    from pipeline.model.loader import load_model
    from pipeline.sae.formats import load_sae

    cfg, summary, root = unsplit_run
    model = load_model(cfg.model, "cpu")
    harvester = Harvester(model, list(HOOKS))
    ctx = pq.read_table(root / "contexts").to_pandas()
    markers = [json.loads(p.read_text()) for p in sorted((root / "_commits").glob("*.json"))]
    for hook in HOOKS:
        sae = load_sae(tie_sae_dir / hook)
        w_enc, b_enc = sae.W_enc.double().numpy(), sae.b_enc.double().numpy()
        w_dec, b_dec = sae.W_dec.double().numpy(), sae.b_dec.double().numpy()
        for marker in markers:
            rows = ctx[(ctx.seq_id >= marker["seq_start"]) & (ctx.seq_id < marker["seq_start"] + marker["contexts"])]
            rows = rows.sort_values("seq_id")
            # The sampled tokens: index floor(i*T/N) of the shard in (seq_id, pos) order.
            x = np.concatenate([harvester(torch.tensor(np.asarray(t, dtype=np.int64))[None])[hook][0].double().numpy()
                                for t in rows.token_ids])
            n = min(FVU_SAMPLE, len(x))
            x = x[(np.arange(n) * len(x)) // n]
            # Dense encode: all L pre-activations, stable descending sort (ties to the lower id), ReLU.
            pre = x @ w_enc.T + b_enc
            top = np.argsort(-pre, axis=1, kind="stable")[:, :K]
            z = np.zeros_like(pre)
            np.put_along_axis(z, top, np.maximum(np.take_along_axis(pre, top, axis=1), 0.0), axis=1)
            x_hat = z @ w_dec + b_dec
            fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(axis=0)) ** 2).sum()
            dead = 1.0 - np.unique(np.nonzero(z)[1]).size / L
            got = marker["fvu"][hook]
            assert got["tokens"] == n
            assert got["fvu"] == pytest.approx(fvu, rel=1e-5)
            assert got["dead_fraction"] == dead
        # Summary and manifest: token-weighted over the shards.
        tokens = sum(m["fvu"][hook]["tokens"] for m in markers)
        weighted = sum(m["fvu"][hook]["fvu"] * m["fvu"][hook]["tokens"] for m in markers) / tokens
        dead = sum(m["fvu"][hook]["dead_fraction"] * m["fvu"][hook]["tokens"] for m in markers) / tokens
        manifest = json.loads((root / "manifest.json").read_text())["fvu"][hook]
        for record in (summary.fvu[hook], manifest):
            assert record["tokens"] == tokens and record["shards"] == len(markers)
            assert record["fvu"] == pytest.approx(weighted, rel=1e-12)
            assert record["dead_fraction"] == pytest.approx(dead, rel=1e-12)


def test_16m_x_4096_preset_splits_the_sae():
    from test_hydra import _compose

    cfg = _compose(["experiment=llama3_8b_16m"])
    assert cfg.sae.latent_splits == 4 and cfg.sae.split_gpus == 1.0
    assert cfg.model.name == "Meta-Llama-3-8B"  # d = 4096

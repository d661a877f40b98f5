"""Activations beyond fp16's range (issue 13): counted and reported (commit marker, run summary,
manifest), stored saturated at +-65504 and never as inf; `output.acts_dtype=float32` stores them
exactly. Real model, real SAE files, the real worker and driver (local Ray)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import (
    ClusterConfig,
    CorpusConfig,
    ModelConfig,
    OutputConfig,
    RunConfig,
    SAEConfig,
    SinkConfig,
)
from pipeline.outputs.layout import FP16_MAX
from pipeline.sae.sae import random_sae

HOOK = "layers.1"


@pytest.fixture(scope="module")
def loud_sae(tmp_path_factory):
    """A 32-wide SAE whose activations reach far beyond 65504 on the tiny Llama: many beyond fp16."""
    sae = random_sae(32, 96, 8, seed=3, hookpoint=HOOK)
    sae.W_enc = sae.W_enc * 1e8  # the tiny random Llama's hidden states are ~1e-2..1e-1
    return sae.save(tmp_path_factory.mktemp("loud") / HOOK)


def _harvest(tiny_model_dir, tiny_corpus, loud_sae, root, run_id, acts_dtype):
    from pipeline.runtime.driver import run

    cfg = RunConfig(
        run_id=run_id,
        model=ModelConfig(name="tiny", path=str(tiny_model_dir), gguf_file=None, dtype="float32", batch_size=4),
        sae=SAEConfig(name="loud", path=str(loud_sae), hookpoints=[HOOK]),
        corpus=CorpusConfig(name="tiny", paths=[str(tiny_corpus)], ctx_len=16, shard_size=4, max_tokens=160,
                            token_cache=None),
        sink=SinkConfig(root=str(root)),
        output=OutputConfig(acts_dtype=acts_dtype),
        cluster=ClusterConfig(num_workers=1, cpus_per_worker=1, torch_threads=1),
    )
    return run(cfg), root / run_id


def _expected(tiny_model_dir, root, loud_sae):
    """The SAE's own fp32 values for every stored token, in stored order."""
    from pipeline.model.harvest import Harvester
    from pipeline.model.loader import load_model
    from pipeline.sae.formats import load_sae

    model = load_model(ModelConfig(path=str(tiny_model_dir), gguf_file=None, dtype="float32"))
    sae = load_sae(loud_sae)
    ctx = pq.read_table(root / "contexts").to_pandas().sort_values("seq_id")
    out = {}
    for row in ctx.itertuples():
        acts = Harvester(model, [HOOK])(torch.tensor([list(row.token_ids)]))[HOOK][0]
        out[row.seq_id] = sae.encode(acts)[0].numpy()
    return out


def test_overflow_is_counted_and_never_inf(tiny_model_dir, tiny_corpus, loud_sae, tmp_path, ray_local):
    summary, root = _harvest(tiny_model_dir, tiny_corpus, loud_sae, tmp_path, "fp16", "float16")
    expected = _expected(tiny_model_dir, root, loud_sae)
    want = sum(int((np.abs(v) > FP16_MAX).sum()) for v in expected.values())
    assert want > 0

    lat = pq.read_table(root / "latents" / f"hookpoint={HOOK}").to_pandas().sort_values(["seq_id", "pos"])
    acts = np.stack(lat.acts.to_numpy())
    assert acts.dtype == np.float16 and np.isfinite(acts).all()
    ref = np.concatenate([expected[s] for s in sorted(expected)])
    # (the reference runs one context at a time, the worker in batches: fp32 rounding may differ)
    np.testing.assert_allclose(acts.astype(np.float32), np.clip(ref, -FP16_MAX, FP16_MAX).astype(np.float16),
                               rtol=1e-3)

    markers = [json.loads(p.read_text()) for p in (root / "_commits").glob("*.json")]
    assert sum(m["acts_overflow"][HOOK] for m in markers) == int((np.abs(acts) == FP16_MAX).sum()) == want
    assert summary.acts_overflow == want and "beyond fp16" in summary.describe()
    from pipeline.runtime.summary import summary_record

    assert summary_record(summary)["acts_overflow"] == want
    assert json.loads((root / "manifest.json").read_text())["acts_overflow"] == want


def test_acts_dtype_float32_stores_them_exactly(tiny_model_dir, tiny_corpus, loud_sae, tmp_path, ray_local):
    summary, root = _harvest(tiny_model_dir, tiny_corpus, loud_sae, tmp_path, "fp32", "float32")
    expected = _expected(tiny_model_dir, root, loud_sae)
    lat = pq.read_table(root / "latents" / f"hookpoint={HOOK}").to_pandas().sort_values(["seq_id", "pos"])
    acts = np.stack(lat.acts.to_numpy())
    assert acts.dtype == np.float32 and acts.max() > FP16_MAX
    np.testing.assert_allclose(acts, np.concatenate([expected[s] for s in sorted(expected)]), rtol=1e-5)
    assert summary.acts_overflow == 0
    assert json.loads((root / "manifest.json").read_text())["acts_overflow"] == 0


def test_float32_run_keeps_exact_acts_through_postprocessing(tiny_model_dir, tiny_corpus, loud_sae, tmp_path,
                                                             ray_local):
    """by_latent and examples of an `output.acts_dtype=float32` run hold the latents' float32
    values bit for bit, those beyond 65504 included (a float16 by_latent would make them inf)."""
    import pandas as pd

    from pipeline.config import PostprocessConfig
    from pipeline.outputs.postprocess import postprocess
    from pipeline.outputs.sink import RunStore

    _, root = _harvest(tiny_model_dir, tiny_corpus, loud_sae, tmp_path, "fp32", "float32")
    postprocess(RunStore(SinkConfig(root=str(tmp_path)), "fp32"),
                PostprocessConfig(bucket_size=32, top_n=3, n_quantiles=2, per_quantile=2, n_random=2, window=4))
    lat = pq.read_table(root / "latents" / f"hookpoint={HOOK}").to_pandas()
    k = len(lat.latent_ids.iloc[0])
    pairs = pd.DataFrame({"seq_id": np.repeat(lat.seq_id.to_numpy(), k), "pos": np.repeat(lat.pos.to_numpy(), k),
                          "latent_id": np.concatenate(lat.latent_ids.to_numpy()),
                          "want": np.concatenate(lat.acts.to_numpy())})
    pairs = pairs[pairs.want > 0]
    by_latent = pq.read_table(root / "by_latent" / f"hookpoint={HOOK}")
    assert by_latent.schema.field("act").type == "float" and by_latent.num_rows == len(pairs)
    got = by_latent.to_pandas().merge(pairs, on=["latent_id", "seq_id", "pos"], validate="one_to_one")
    assert len(got) == len(pairs) and got.act.max() > FP16_MAX
    assert np.array_equal(got.act.to_numpy(), got.want.to_numpy())  # exact, not rounded to fp16
    from pipeline.outputs.windows import read_windows

    ex = read_windows(RunStore(SinkConfig(root=str(tmp_path)), "fp32"), HOOK,
                      pq.read_table(root / "examples" / f"hookpoint={HOOK}")).to_pandas()
    top = ex[(ex.kind == "top") & (ex["rank"] == 0)]
    best = got.groupby("latent_id").act.max()
    assert np.array_equal(np.asarray([max(a) for a in top.acts]), best.loc[top.latent_id].to_numpy())
    assert all(np.isfinite(a).all() for a in ex.acts)
    assert np.array_equal(top.act.to_numpy(), best.loc[top.latent_id].to_numpy())  # the example's own act, exact
    # The delphi export keeps them too (a float16 `activations` tensor would hold inf).
    from safetensors.numpy import load_file

    from pipeline.outputs.delphi_export import export_delphi

    paths = export_delphi(RunStore(SinkConfig(root=str(tmp_path)), "fp32"), tmp_path / "delphi")
    exported = np.concatenate([load_file(str(p))["activations"] for p in paths])
    assert exported.dtype == np.float32 and np.isfinite(exported).all() and exported.max() > FP16_MAX
    assert np.array_equal(np.sort(exported), np.sort(pairs.want.to_numpy().astype(np.float32)))

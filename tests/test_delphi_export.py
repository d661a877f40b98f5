"""The delphi export read back by delphi's own loader (`eai-delphi`, installed --no-deps: its
vllm/faiss/sentence-transformers dependencies would replace this venv's torch).

Only delphi's neighbour-search imports (faiss, sentence_transformers) and blobfile are absent;
they are placeholders in sys.modules so `delphi.latents.loader` imports. The code under test
(TensorBuffer.load / load_data_per_latent, LatentDataset's file discovery and config check)
is delphi's real code."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import numpy as np
import pytest
from conftest import require
from test_postprocess import CFG, HOOK, brute_force, make_run

from pipeline.outputs.delphi_export import export_delphi
from pipeline.outputs.postprocess import postprocess

pytestmark = pytest.mark.slow


def import_delphi_loader(monkeypatch):
    require("eai-delphi", importlib.util.find_spec("delphi") is not None,
            "pip install --no-deps eai-delphi jaxtyping wadler_lindig asyncer sniffio simple-parsing docstring_parser orjson")
    for name in ("faiss", "sentence_transformers", "blobfile"):
        if importlib.util.find_spec(name) is None and name not in sys.modules:
            placeholder = types.ModuleType(name)
            placeholder.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec() must not raise
            placeholder.SentenceTransformer = object
            monkeypatch.setitem(sys.modules, name, placeholder)  # removed again after the test
    from delphi.latents import loader

    return loader


def test_delphi_reads_our_export(tmp_path, ray_local, monkeypatch):
    loader = import_delphi_loader(monkeypatch)
    import torch

    store = make_run(tmp_path / "runs", "dx", n_shards=3)
    postprocess(store, CFG)
    out = tmp_path / "delphi"
    files = export_delphi(store, out)
    assert [f.name for f in files] == ["0_15.safetensors", "16_31.safetensors", "32_47.safetensors", "48_49.safetensors"]

    pairs, tokens, _ = brute_force(tmp_path / "runs" / "dx", [0, 1, 2])
    seq_ids = sorted(tokens)
    got = []
    for f in files:
        buffer = loader.TensorBuffer(str(f), HOOK)
        locations, activations, toks = buffer.load()
        if f == files[0]:  # the token matrix is written once, in the first split
            assert toks.shape == (len(seq_ids), 40)
            for row, s in enumerate(seq_ids):
                assert toks[row, : len(tokens[s])].tolist() == tokens[s].tolist()
                assert (toks[row, len(tokens[s]):] == 0).all()  # padded with eos (0: no tokenizer in this run)
        else:
            assert toks is None
        got.append(np.column_stack([np.asarray(seq_ids)[locations[:, 0].numpy()], locations[:, 1].numpy(),
                                    locations[:, 2].numpy(), activations.float().numpy()]))
        latents, _, _ = buffer.load_data_per_latent()
        start, end = map(int, f.stem.split("_"))
        assert ((latents >= start) & (latents <= end)).all()
    got = np.concatenate(got)
    expect = pairs[["seq_id", "pos", "latent_id", "act"]].to_numpy()
    order_got = np.lexsort(got.T[::-1])
    order_exp = np.lexsort(expect.T[::-1])
    np.testing.assert_allclose(got[order_got], expect[order_exp].astype(np.float64), rtol=1e-3)

    # delphi's dataset discovers the splits and checks config.json the way it does for its own caches.
    from delphi.config import ConstructorConfig, SamplerConfig

    dataset = loader.LatentDataset(out, SamplerConfig(), ConstructorConfig(), tokenizer=object(), modules=[HOOK])
    assert len(dataset.buffers) == 4 and isinstance(dataset.tokens, torch.Tensor)
    assert dataset.tokens.shape == (len(seq_ids), 40)
    config = json.loads((out / HOOK / "config.json").read_text())
    assert config["cache_ctx_len"] == 40 and config["n_splits"] == 4 and "model_name" in config

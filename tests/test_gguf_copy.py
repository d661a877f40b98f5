"""A GGUF model is de-quantized once, then loaded from its kept safetensors copy
(`model.cache_dequantized`, pipeline/model/loader.py): the copy gives the very tensors and config
a de-quantization gives, a damaged copy is replaced, and each dtype has its own.

The GGUF file is written here with gguf-py (the library transformers reads GGUF with), from a tiny
random Llama, its matrices quantized to Q8_0 and its q/k rows permuted as llama.cpp's converter
does: a real GGUF in small (the shipped SmolLM2 one takes 13 s per de-quantization on 2 cores)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.model.loader import dequantized_copy, load_model
from tests.conftest import build_tiny_llama


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py's permute for q/k: rotary halves interleaved (transformers reverses it).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, vocab_size: int = 320, seed: int = 0, tied: bool = False) -> Path:
    """`tied`: no output matrix, as llama.cpp writes a model whose lm_head is its embedding (SmolLM2)."""
    import gguf

    model = build_tiny_llama(path.parent / f"{path.stem}-hf", vocab_size, hidden=32, layers=2, seed=seed)
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_block_count(c.num_hidden_layers)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, t in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        base, suffix = name.rsplit(".", 1)
        data = t.numpy().astype(np.float32)
        if name.endswith("q_proj.weight"):
            data = _llama_cpp_permute(data, c.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _llama_cpp_permute(data, c.num_key_value_heads)
        target = f"{names.get_name(base)}.{suffix}"
        if data.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(target, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            w.add_tensor(target, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(params=["untied", "tied"])
def gguf_model(request, tmp_path, monkeypatch) -> ModelConfig:
    monkeypatch.setenv("SAE_HARVEST_CACHE", str(tmp_path / "cache"))
    gguf = write_tiny_gguf(tmp_path / "m" / "tiny.Q8_0.gguf", tied=request.param == "tied")
    return ModelConfig(name=request.param, path=str(gguf.parent), gguf_file=gguf.name, dtype="float32")


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    # Where it was loaded from, and the "gguf" mark a de-quantized load carries (the copy holds plain tensors).
    name_keys = ("_name_or_path", "_model_name_or_path", "quantization_config")
    config = {k: v for k, v in got.config.to_dict().items() if k not in name_keys}
    assert config == {k: v for k, v in want.config.to_dict().items() if k not in name_keys}
    got_sd, want_sd = got.state_dict(), want.state_dict()
    assert list(got_sd) == list(want_sd)
    for k in want_sd:
        assert got_sd[k].dtype == want_sd[k].dtype and torch.equal(got_sd[k], want_sd[k]), k
    ids = torch.arange(24).reshape(2, 12)
    with torch.no_grad():
        assert torch.equal(got(ids).logits, want(ids).logits)


def test_second_load_reads_the_copy_and_gets_the_same_model(gguf_model):
    dequantized = load_model(dataclasses.replace(gguf_model, cache_dequantized=False))
    gguf = Path(gguf_model.path) / gguf_model.gguf_file
    copy = dequantized_copy(gguf, torch.float32)
    assert not copy.exists()  # cache_dequantized=False keeps nothing

    first = load_model(gguf_model)  # de-quantizes, keeps the copy
    assert (copy / "config.json").is_file() and list(copy.glob("*.safetensors"))
    assert not [p for p in copy.parent.iterdir() if p.name.startswith(".")], "a temporary copy was left"
    assert_same_model(first, dequantized)
    from_copy = load_model(gguf_model)
    assert_same_model(from_copy, dequantized)
    tied = from_copy.lm_head.weight.data_ptr() == from_copy.model.embed_tokens.weight.data_ptr()
    assert tied == dequantized.config.tie_word_embeddings == (gguf_model.name == "tied")

    # The copy really is what a load reads: a value changed in it shows in the model.
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 0.25}))
    assert load_model(gguf_model).config.rms_norm_eps == 0.25


def test_a_damaged_copy_is_de_quantized_again_and_replaced(gguf_model):
    reference = load_model(gguf_model)
    copy = dequantized_copy(Path(gguf_model.path) / gguf_model.gguf_file, torch.float32)
    (weights,) = copy.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short (disk full, killed writer)
    assert_same_model(load_model(gguf_model), reference)
    assert weights.stat().st_size > 100  # replaced by a whole one
    assert_same_model(load_model(gguf_model), reference)


def test_each_dtype_has_its_own_copy(gguf_model):
    fp32 = load_model(gguf_model)
    bf16 = load_model(dataclasses.replace(gguf_model, dtype="bfloat16"))
    gguf = Path(gguf_model.path) / gguf_model.gguf_file
    assert dequantized_copy(gguf, torch.float32) != dequantized_copy(gguf, torch.bfloat16)
    assert (dequantized_copy(gguf, torch.bfloat16) / "config.json").is_file()
    assert next(bf16.parameters()).dtype == torch.bfloat16
    assert torch.equal(load_model(dataclasses.replace(gguf_model, dtype="bfloat16")).lm_head.weight,
                       bf16.lm_head.weight)
    assert next(fp32.parameters()).dtype == torch.float32

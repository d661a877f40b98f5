"""`sae.dtype` at load time (issue 13): the float16 range check, and the cast loader's layout.

A weight beyond float16's largest value (65504) would become inf under `sae.dtype=float16` and
turn every activation it touches into inf/NaN: the load must stop, naming the file, the tensor
and the setting. The check runs block by block while casting (no extra pass over the file):
`weights.BLOCK_BYTES` is lowered here so the big weight lands in a late block.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.sae import weights
from pipeline.sae.formats import load_sae
from pipeline.sae.sae import random_sae

D, L, K = 16, 512, 4


def _own_fp32(tmp_path, row: int, value: float):
    sae = random_sae(D, L, K, hookpoint="layers.0")
    sae.W_enc = sae.W_enc.float().clone()
    sae.W_enc[row, 3] = value
    return sae, sae.save(tmp_path / "own")


@pytest.mark.parametrize("block_rows", [L, 64])
def test_float16_overflow_stops_the_load_naming_file_tensor_and_setting(tmp_path, monkeypatch, block_rows):
    monkeypatch.setattr(weights, "BLOCK_BYTES", block_rows * D * 4)
    _, path = _own_fp32(tmp_path, row=450, value=98304.0)  # exact in bfloat16
    with pytest.raises(ValueError) as err:
        load_sae(path, dtype="float16", with_decoder=False)
    msg = str(err.value)
    assert str(path / "sae.safetensors") in msg and "'W_enc'" in msg and "row 450" in msg
    assert "sae.dtype=float16" in msg and "bfloat16" in msg and "98304" in msg
    # the same file loads under a dtype with float32's range, value kept
    sae = load_sae(path, dtype="bfloat16", with_decoder=False)
    assert float(sae.W_enc[450, 3]) == 98304.0 and not torch.isinf(sae.W_enc).any()


def test_float16_within_range_loads_exactly(tmp_path):
    ref, path = _own_fp32(tmp_path, row=7, value=65504.0)  # the largest float16: not an overflow
    sae = load_sae(path, dtype="float16")
    assert sae.W_enc.dtype == sae.W_dec.dtype == torch.float16
    assert torch.equal(sae.W_enc, ref.W_enc.half()) and torch.equal(sae.W_dec, ref.W_dec.half())
    assert sae.b_enc.dtype == torch.float32  # biases stay fp32 when a compute dtype is set


def test_float16_overflow_in_openai_decoder_is_named(tmp_path):
    g = torch.Generator().manual_seed(0)
    dec = torch.randn(D, L, generator=g)
    dec[2, 300] = -7.0e4
    sd = {"pre_bias": torch.zeros(D), "encoder.weight": torch.randn(L, D, generator=g), "latent_bias": torch.zeros(L),
          "decoder.weight": dec, "activation": "TopK", "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    path = tmp_path / "8.pt"
    torch.save(sd, path)
    load_sae(path, dtype="float16", with_decoder=False)  # the encoder alone is in range
    with pytest.raises(ValueError, match=r"8\.pt: tensor 'decoder.weight'.*70000.*row 300.*sae.dtype=float16"):
        load_sae(path, dtype="float16")


def test_cast_output_is_the_kernel_layout_and_exact(tmp_path, monkeypatch):
    """Several blocks, a pre-faulted output (>= BLOCK_BYTES) and a transposed source: exact values."""
    monkeypatch.setattr(weights, "BLOCK_BYTES", 40 * D * 4)
    src = torch.randn(L, D).to(torch.bfloat16)
    for stored, transpose in ((src, False), (src.T.contiguous(), True)):
        out = weights.kernel_matrix(stored, torch.float32, transpose=transpose)
        assert out.shape == (L, D) and out.is_contiguous() and torch.equal(out, src.float())

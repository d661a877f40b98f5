"""Large synthetic SAE checkpoints written straight with numpy (no torch.randn of the whole
matrix, no SAE object): the project's own format and an OpenAI `.pt` of the same weights.
Used by tests/test_sae_scale.py and bench/sae_scale.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

BLOCK_ROWS = 1 << 20


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest even (as torch's cast)."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_own_sae(folder: Path, n_latents: int, d_in: int, k: int, seed: int = 0,
                  hookpoint: str | None = None) -> Path:
    """cfg.json + sae.safetensors: W_enc = W_dec [L, d] bf16 (random normal), b_enc [L] and b_dec [d] fp32."""
    folder.mkdir(parents=True, exist_ok=True)
    nb = n_latents * d_in * 2
    header = {"W_enc": {"dtype": "BF16", "shape": [n_latents, d_in], "data_offsets": [0, nb]},
              "W_dec": {"dtype": "BF16", "shape": [n_latents, d_in], "data_offsets": [nb, 2 * nb]},
              "b_enc": {"dtype": "F32", "shape": [n_latents], "data_offsets": [2 * nb, 2 * nb + 4 * n_latents]},
              "b_dec": {"dtype": "F32", "shape": [d_in], "data_offsets": [2 * nb + 4 * n_latents, 2 * nb + 4 * n_latents + 4 * d_in]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    path = folder / "sae.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for start in range(0, n_latents, BLOCK_ROWS):
            rows = min(BLOCK_ROWS, n_latents - start)
            f.write(_bf16_bits(rng.standard_normal((rows, d_in), dtype=np.float32)).tobytes())
        f.flush()
        with open(path, "rb") as src:  # W_dec: the same rows (tied), copied from W_enc's bytes
            src.seek(8 + len(raw))
            left = nb
            while left:
                block = src.read(min(left, 64 << 20))
                f.write(block)
                left -= len(block)
        f.write((0.1 * rng.standard_normal(n_latents, dtype=np.float32)).tobytes())
        f.write((0.1 * rng.standard_normal(d_in, dtype=np.float32)).tobytes())
    cfg = {"format": "sae-harvest", "d_in": d_in, "n_latents": n_latents, "k": k, "input_norm": "none",
           "activation": "topk_relu", "hookpoint": hookpoint, "meta": {}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_openai_sae(path: Path, own: Path, k: int) -> Path:
    """An OpenAI `sparse_autoencoder` state_dict with the own-format SAE's weights
    (decoder.weight stored [d, L] as upstream does)."""
    from pipeline.sae.weights import mmap_tensor, safetensors_header

    refs = safetensors_header(own / "sae.safetensors")
    enc = mmap_tensor(refs["W_enc"])
    sd = {"encoder.weight": enc, "decoder.weight": enc.T.contiguous(), "latent_bias": mmap_tensor(refs["b_enc"]),
          "pre_bias": torch.zeros(enc.shape[1]), "activation": "TopK",
          "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return path

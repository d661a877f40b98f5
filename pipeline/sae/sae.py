"""Top-k sparse autoencoders: one in-memory type, several on-disk formats.

Every format is loaded into the same `SAE`, whose `encode` reproduces that format's own
semantics (docs/DESIGN.md, "Encode semantics"):

    x_n   = normalize(x)                      # per `input_norm`
    pre   = (x_n - b_pre) @ W_enc.T + b_enc   # never materialized for large L
    top-k of pre, then ReLU on the kept values     (activation == "topk_relu")
    ReLU of pre, then top-k                        (activation == "relu_topk")
    values <= threshold set to 0  (optional, dictionary_learning BatchTopK crosscoders)
    values *= latent_scale[ids]  (optional, SAELens `rescale_acts_by_decoder_norm`)

The project's own format is a directory with `cfg.json` and `sae.safetensors`
(`W_enc[L,d]`, `b_enc[L]`, `W_dec[L,d]`, `b_dec[d]`, optional `b_pre[d]`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import sae_harvest_kernels
import torch

OWN_FORMAT = "sae-harvest"
INPUT_NORMS = ("none", "openai_layernorm", "constant_norm_rescale")
ACTIVATIONS = ("topk_relu", "relu_topk")
# What a dictionary reads and reconstructs (issue 17):
#   sae         reads `hookpoint`, reconstructs it;
#   transcoder  reads `hookpoint` (e.g. layers.N.mlp_in), reconstructs `output` (layers.N.mlp_out);
#   crosscoder  reads the concatenation of `inputs` (hookpoints, or checkpoint/hookpoint pairs),
#               each block of width d_in / len(inputs) normalized on its own, and reconstructs
#               each input from its own block of W_dec.
KINDS = ("sae", "transcoder", "crosscoder")


@dataclass
class SAE:
    W_enc: torch.Tensor  # [L, d]
    b_enc: torch.Tensor | None  # [L]
    W_dec: torch.Tensor | None  # [L, d]; None when loaded encoder-only (`load_sae(with_decoder=False)`)
    b_dec: torch.Tensor | None  # [d], added on decode
    k: int
    b_pre: torch.Tensor | None = None  # [d], subtracted from the (normalized) input
    input_norm: str = "none"
    activation: str = "topk_relu"
    latent_scale: torch.Tensor | None = None  # [L], multiplies encoded values
    hookpoint: str | None = None
    format: str = OWN_FORMAT
    source: str = ""
    sha256: str = ""
    meta: dict = field(default_factory=dict)  # e.g. the model it was trained on, training report
    backend: str = "auto"  # kernels backend for encode/decode
    kind: str = "sae"  # one of KINDS
    inputs: list[str] = field(default_factory=list)  # crosscoder: its sources, in concatenation order
    output: str | None = None  # transcoder: the hookpoint it reconstructs
    # Values <= threshold are zeroed after the top-k (a global activation threshold, e.g.
    # dictionary_learning's BatchTopKCrossCoder at inference); None: no threshold.
    threshold: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind {self.kind!r} is not one of {KINDS}")
        if self.kind == "crosscoder" and (not self.inputs or self.d_in % len(self.inputs)):
            raise ValueError(f"a crosscoder needs its inputs listed, and d_in={self.d_in} a multiple of their "
                             f"number ({len(self.inputs)})")
        if self.kind == "transcoder" and not self.output:
            raise ValueError("a transcoder needs the hookpoint it reconstructs (output)")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm {self.input_norm!r} is not one of {INPUT_NORMS}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {ACTIVATIONS}")
        if self.W_dec is not None and self.W_enc.shape != self.W_dec.shape:
            raise ValueError(f"W_enc {tuple(self.W_enc.shape)} and W_dec {tuple(self.W_dec.shape)} must both be [L, d]")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"SAE k={self.k} must be between 1 and its latent count {self.n_latents}")

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def n_blocks(self) -> int:
        """How many separately normalized blocks the input has (a crosscoder's sources; else 1)."""
        return len(self.inputs) if self.kind == "crosscoder" else 1

    @property
    def n_latents(self) -> int:
        return self.W_enc.shape[0]

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SAE:
        for name in ("W_enc", "b_enc", "W_dec", "b_dec", "b_pre", "latent_scale"):
            t = getattr(self, name)
            if t is not None and not t.is_meta:  # meta: not loaded (load_sae(with_decoder=False))
                setattr(self, name, t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        return self

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the format's encoder sees it, in fp32 (`input_norm`, per block for a crosscoder)."""
        x = x.float()
        if self.n_blocks > 1:
            x = x.unflatten(-1, (self.n_blocks, -1))
        if self.input_norm == "openai_layernorm":
            # openai/sparse_autoencoder `LN`: mean-centre, divide by (unbiased std + eps).
            x = x - x.mean(dim=-1, keepdim=True)
            x = x / (x.std(dim=-1, keepdim=True) + 1e-5)
        elif self.input_norm == "constant_norm_rescale":
            # SAELens `constant_norm_rescale`: every row (block) rescaled to norm sqrt(its width).
            x = x * ((x.shape[-1] ** 0.5) / x.norm(dim=-1, keepdim=True))
        return x.flatten(-2) if self.n_blocks > 1 else x

    def encoder_input(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """What the top-k sees: the input normalized per `input_norm`, minus `b_pre` (fp32)."""
        if x.shape[-1] != self.d_in:
            raise ValueError(f"input has width {x.shape[-1]} but the SAE expects d_in={self.d_in}")
        if not 1 <= k <= self.n_latents:
            raise ValueError(f"k={k} must be between 1 and the number of latents ({self.n_latents})")
        x_n = self.normalize(x)
        return x_n - self.b_pre.float() if self.b_pre is not None else x_n

    def activate(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The activation applied to the selected pre-activations.

        ReLU is monotone, so "ReLU then top-k" selects the same ids as "top-k then ReLU"; the
        two orders differ only in which ids are reported among entries that are <= 0."""
        values = values.clamp_min(0.0)
        if self.threshold is not None:
            values = torch.where(values > self.threshold, values, torch.zeros_like(values))
        if self.latent_scale is not None:
            values = values * self.latent_scale.float()[ids.long()]
        return values

    def encode(self, x: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, d] -> (values fp32 [N, k] descending, latent ids int32 [N, k])."""
        k = self.k if k is None else k
        x_n = self.encoder_input(x, k)
        values, ids = sae_harvest_kernels.topk_encode(x_n, self.W_enc, self.b_enc, k, backend=self.backend)
        return self.activate(values, ids), ids

    def decode(self, values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Reconstruction in the normalized input space (plus b_dec): [N, d] fp32."""
        if self.W_dec is None:
            raise ValueError(f"SAE {self.source or self.format} was loaded without its decoder; "
                             f"load it with load_sae(..., with_decoder=True) to decode")
        out = sae_harvest_kernels.sparse_decode(values, ids, self.W_dec, backend=self.backend)
        if self.b_dec is not None:
            out = out + self.b_dec.float()
        return out

    def save(self, path: str | os.PathLike) -> Path:
        """Write the project's own format; returns the directory."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "W_dec": self.W_dec}
        for name in ("b_enc", "b_dec", "b_pre", "latent_scale"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, str(path / "sae.safetensors"))
        cfg = {
            "format": OWN_FORMAT,
            "d_in": self.d_in,
            "n_latents": self.n_latents,
            "k": self.k,
            "input_norm": self.input_norm,
            "activation": self.activation,
            "hookpoint": self.hookpoint,
            "kind": self.kind,
            "inputs": self.inputs,
            "output": self.output,
            "threshold": self.threshold,
            "meta": self.meta,
        }
        (path / "cfg.json").write_text(json.dumps(cfg, indent=2) + "\n")
        return path


def random_sae(d_in: int, n_latents: int, k: int, seed: int = 0, hookpoint: str | None = None) -> SAE:
    """An untrained SAE with unit-norm tied rows: for tests and benchmarks (same cost as a trained one)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_latents, d_in, generator=g)
    w = w / w.norm(dim=1, keepdim=True)
    return SAE(W_enc=w.clone(), b_enc=0.01 * torch.randn(n_latents, generator=g), W_dec=w.clone(),
               b_dec=0.01 * torch.randn(d_in, generator=g), k=k, hookpoint=hookpoint)

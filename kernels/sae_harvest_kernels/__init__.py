"""Top-k SAE encode and sparse decode.

`topk_encode(x, weight, bias, k)` returns the k largest entries of `x @ weight.T + bias`
per row, values descending with ties to the lower id, without materializing the N x L
matrix. Backends:
- "torch": streaming chunked matmul + exact top-k merge (`sae_harvest_kernels.streaming`), any device;
- "fused" (alias "triton"): the fused kernel (`sae_harvest_kernels.topk_encode_triton`);
- "binmax": persistent matmul writing per-tile row maxima, then exact rescoring of the
  candidate tiles only (`sae_harvest_kernels.binmax`);
- "gemm_filter": cuBLAS GEMM into fp32 chunks + threshold filter + exact merge
  (`sae_harvest_kernels.gemm_filter`);
- "auto": on CUDA the backend `sae_harvest_kernels.tuning_table` lists for the nearest measured shape
  (see its PROVENANCE), torch otherwise.
Triton backends run on CPU tensors only under TRITON_INTERPRET=1 (tests).

This package imports torch (and triton lazily) only: no Ray, Hydra or I/O. Its import name is
`sae_harvest_kernels`, never `kernels`: that name belongs to Hugging Face's hub-kernels package,
which transformers imports. The folder kernels/ is a source root holding this package
(docs/DESIGN.md, "Import names").
"""
from __future__ import annotations

import os

import torch

from sae_harvest_kernels.reference import sparse_decode_reference, topk_encode_reference
from sae_harvest_kernels.streaming import sparse_decode_torch, topk_encode_streaming

__all__ = [
    "topk_encode",
    "sparse_decode",
    "topk_encode_reference",
    "sparse_decode_reference",
    "resolve_backend",
]

BACKENDS = ("auto", "torch", "triton", "fused", "binmax", "gemm_filter")
TRITON_BACKENDS = ("fused", "binmax", "gemm_filter")


def resolve_backend(backend: str, device: torch.device, shape: tuple[int, int, int] | None = None) -> str:
    """The concrete backend for `backend` on `device`; `shape` = (d, L, k) lets `auto` use the tuning table."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown encode backend {backend!r}; choose one of {BACKENDS}")
    if backend == "triton":
        backend = "fused"
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        if shape is None:
            return "fused"
        from sae_harvest_kernels.tuning import pick_backend

        return pick_backend(*shape)
    if backend in TRITON_BACKENDS and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"backend={backend!r} on CPU tensors needs TRITON_INTERPRET=1 (tests only)")
    return backend


def _check_encode_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int) -> None:
    if x.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"x must be [N, d] and weight [L, d]; got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"x has d={x.shape[1]} but weight has d={weight.shape[1]}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must have shape [{weight.shape[0]}], got {tuple(bias.shape)}")
    if not 1 <= k <= weight.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of latents ({weight.shape[0]})")


def topk_encode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `x @ weight.T + bias`: (values fp32 [N, k] descending, indices int32 [N, k])."""
    _check_encode_args(x, weight, bias, k)
    chosen = resolve_backend(backend, x.device, (x.shape[1], weight.shape[0], k))
    if chosen == "fused":
        from sae_harvest_kernels.topk_encode_triton import topk_encode_triton

        return topk_encode_triton(x, weight, bias, k)
    if chosen == "binmax":
        from sae_harvest_kernels.binmax import topk_encode_binmax

        return topk_encode_binmax(x, weight, bias, k)
    if chosen == "gemm_filter":
        from sae_harvest_kernels.gemm_filter import topk_encode_gemm_filter

        return topk_encode_gemm_filter(x, weight, bias, k)
    return topk_encode_streaming(x, weight, bias, k)


def sparse_decode(
    values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """out[n] = sum_j values[n, j] * w_dec[indices[n, j]] in fp32: [N, d]."""
    if values.shape != indices.shape:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} differ in shape")
    if resolve_backend(backend, values.device) in TRITON_BACKENDS:
        from sae_harvest_kernels.sparse_decode_triton import sparse_decode_triton

        return sparse_decode_triton(values, indices, w_dec)
    return sparse_decode_torch(values, indices, w_dec)

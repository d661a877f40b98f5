"""Streaming top-k encode in plain torch: the CPU path and the fallback beside the Triton kernel.

The latent dimension is walked in chunks. Each chunk's pre-activations [N, chunk] exist only
while that chunk is processed, and a running top-k [N, k] is merged with the chunk's top-k,
so memory is O(N*chunk + N*k) however large L is.

Exact tie rule (values descending, ties to the lower id) without sorting whole chunks:
- per chunk we take `torch.topk` with k+1 values; when the k-th and (k+1)-th are different
  the chunk's top-k *set* is unique, and only rows where they are equal (a tie straddling the
  k-th place, rare on real data) are redone with a stable sort;
- the merge (`kernels.merge.merge_topk`) concatenates [running, chunk] and stable-sorts 2k
  values: every running id is lower than every chunk id and each side is already in
  (value desc, id asc) order, so a stable sort yields the global order, ties to the lower id.
"""
from __future__ import annotations

import torch

from kernels.merge import merge_topk
from kernels.reference import ordered_topk

# Large enough that the matmul dominates the top-k bookkeeping, small enough to stay in cache
# on CPU; on GPU the Triton kernel is used instead.
DEFAULT_CHUNK = 4096


def _chunk_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly ordered top-k of one chunk, ids local to the chunk (int64)."""
    width = pre.shape[1]
    if width <= k:
        values, indices = torch.sort(pre, dim=1, descending=True, stable=True)
        return values, indices
    values, indices = torch.topk(pre, k + 1, dim=1, largest=True, sorted=True)
    straddling = values[:, k - 1] == values[:, k]
    values, indices = values[:, :k], indices[:, :k]
    # Order ties *inside* the top-k by id: sort by id first, then a stable sort by value.
    by_id = torch.argsort(indices, dim=1)
    values, indices = values.gather(1, by_id), indices.gather(1, by_id)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices
    values, indices = values.gather(1, order), indices.gather(1, order)
    if bool(straddling.any()):
        rows = straddling.nonzero().squeeze(1)
        exact_values, exact_indices = ordered_topk(pre[rows], k)
        values[rows], indices[rows] = exact_values, exact_indices.long()
    return values, indices


def topk_encode_streaming(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `x @ weight.T + bias` over latents; returns (values fp32 [N,k], ids int32 [N,k])."""
    n_latents = weight.shape[0]
    if not 1 <= k <= n_latents:
        raise ValueError(f"k={k} must be between 1 and the number of latents ({n_latents})")
    xf = x.float()
    best_values = best_indices = None
    for start in range(0, n_latents, chunk):
        stop = min(start + chunk, n_latents)
        pre = xf @ weight[start:stop].float().T
        if bias is not None:
            pre += bias[start:stop].float()
        values, indices = _chunk_topk(pre, k)
        indices += start
        if best_values is None:
            best_values, best_indices = values, indices
            continue
        width = best_values.shape[1] + values.shape[1]  # below k only while chunks are narrower than k
        best_values, best_indices = merge_topk([(best_values, best_indices), (values, indices)], min(k, width))
    return best_values.contiguous(), best_indices.to(torch.int32).contiguous()


def sparse_decode_torch(values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """out[n] = sum_j values[n,j] * w_dec[indices[n,j]], fp32, without a dense [N, L] matrix."""
    n, k = indices.shape
    d = w_dec.shape[1]
    out = torch.empty(n, d, dtype=torch.float32, device=values.device)
    rows_per_block = max(1, (1 << 22) // max(1, k * d))  # bound the [rows, k, d] gather
    for start in range(0, n, rows_per_block):
        stop = min(start + rows_per_block, n)
        gathered = w_dec[indices[start:stop].long()].float()  # [rows, k, d]
        out[start:stop] = torch.einsum("nk,nkd->nd", values[start:stop].float(), gathered)
    return out

"""Sparse decode in Triton: out[n] = sum_j values[n, j] * w_dec[indices[n, j]], fp32.

One program owns BLOCK_N tokens x BLOCK_D output columns and walks the k active latents:
for each j it gathers the BLOCK_N decoder rows `w_dec[indices[:, j], cols]` (contiguous
BLOCK_D-wide segments, so loads coalesce) and accumulates in fp32 registers. Nothing of
size N x L or N x k x d is ever formed. Row offsets are `index * stride` in int64, so
L * d past 2^31 (16M latents x 4096) is fine. Ids must lie in [0, L): they are not checked
on the device (that would need a host sync); sae_harvest_kernels.reference raises on bad ids instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sparse_decode_kernel(
    val_ptr, idx_ptr, w_ptr, out_ptr,
    N, k, d,
    stride_vn, stride_in, stride_wl, stride_on,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < N
    col_ok = cols < d
    acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for j in range(k):
        latent = tl.load(idx_ptr + rows * stride_in + j, mask=row_ok, other=0).to(tl.int64)
        value = tl.load(val_ptr + rows * stride_vn + j, mask=row_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + latent[:, None] * stride_wl + cols[None, :],
                    mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        acc += value[:, None] * w.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


def sparse_decode_triton(values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """Gather-and-sum decode: [N, k] values and ids, [L, d] decoder -> [N, d] fp32."""
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must be equal [N, k]")
    if w_dec.dim() != 2:
        raise ValueError(f"w_dec must be [L, d], got {tuple(w_dec.shape)}")
    n_rows, k = values.shape
    d = w_dec.shape[1]
    out = torch.empty(n_rows, d, dtype=torch.float32, device=values.device)
    if n_rows == 0 or d == 0:
        return out
    if k == 0:
        return out.zero_()
    # Unit stride along k and d so the kernel can index with a single row stride.
    values, indices, w_dec = values.contiguous(), indices.contiguous(), w_dec.contiguous()

    block_n = 16
    block_d = min(256, triton.next_power_of_2(d))
    grid = (triton.cdiv(n_rows, block_n), triton.cdiv(d, block_d))
    _sparse_decode_kernel[grid](
        values, indices, w_dec, out,
        n_rows, k, d,
        values.stride(0), indices.stride(0), w_dec.stride(0), out.stride(0),
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out

"""Exact top-k encode with selection off the matmul's critical path (TPU-KNN bin maxima, made exact).

Three steps, each a plain kernel:

1. **Mainloop** (`_binmax_kernel`): a persistent GEMM, grid = number of SMs, each program
   walking tiles (row block, latent tile) with stride = grid size, row blocks fastest so the
   ~num_SMs tiles in flight share few weight tiles and each W tile is read from HBM about once
   (x, a few MB, stays in L2). The inner loop over d is a `tl.range(..., flatten=True)` on GPU,
   which the compiler software-pipelines across tile boundaries (Triton tutorial
   09-persistent-matmul), so the TMA pipeline does not drain at every tile when d is small.
   Epilogue, branch-free and warp-local: add the bias, map -0.0 to +0.0, take each row's
   maximum over the tile (a "bin" of BLOCK_L latents) and store it. On Hopper a 128-row tile
   with 8 warps is split along rows only (16 rows per warp), so the row max is a reduction
   inside a warp: no shared memory, no barrier. Output: bin maxima [n_bins, N] fp32, bin-major
   so each tile's store is BLOCK_N contiguous floats.
2. **Candidate bins** (torch, on device): tau_r = the k-th largest bin maximum of row r. Those
   are k distinct latents, so tau_r <= the row's true k-th value, and every latent that can be
   in the top-k (value >= k-th value >= tau_r, ties included) lies in a bin whose maximum is
   >= tau_r. Only those (row, bin) pairs are rescored: about k per row, N*k in all (vs N*L/BLOCK_L
   bins). Rows with more than `max_bins` candidate bins (ties among bin maxima, all-zero rows)
   go to the fallback kernel instead.
3. **Rescoring** (`_rescore_kernel`): a grouped GEMM over the pairs, sorted by bin (so W tiles
   are read once per bin), BLOCK_N pairs of one bin per program, with the same BLOCK_N x
   BLOCK_L x BLOCK_D dot, dtypes and warps as the mainloop, so each value comes out bitwise
   equal to what the mainloop computed. That is checked at run time: each rescored bin's
   maximum must equal its stored maximum, and a row where one does not goes to the fallback
   (`verify=False` turns the check off, for tests). Entries >= tau_r are appended as int64 order
   keys to the row's candidate list (an atomic counter per row gives the slots); rows whose list
   overflows `max_candidates` go to the fallback.

Finally one `torch.topk` over the int64 keys (value desc, id asc: the same keys as the fused
kernel) gives the exact top-k with ties to the lower id. Memory beyond inputs/outputs:
bin maxima N*L/BLOCK_L*4 bytes, pair lists ~N*k*8 bytes, candidate keys N*max_candidates*8
bytes: O(N*(k + L/BLOCK_L)), never N x L.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from sae_harvest_kernels.topk_encode_triton import (
    _EMPTY,
    _INTERPRET,
    MAX_K,
    _install_allocator,
    _pack_keys,
    _tma_possible,
)


@dataclass(frozen=True)
class TileConfig:
    """One dot configuration, shared by the mainloop and the rescoring (bitwise-equal values)."""

    block_n: int = 128
    block_l: int = 256
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3


# Hopper-oriented: 128x256x64 bf16 tiles, 3 TMA stages (3*(128+256)*64*2 = 144 KB of shared
# memory), 8 warps = 2 warpgroups split along rows. fp32 inputs (exact IEEE dot) use smaller
# tiles. The interpreter gets small tiles so CPU tests stay fast.
GPU_CONFIG = TileConfig()
GPU_CONFIG_128 = TileConfig(128, 128, 64, 8, 4)
FP32_CONFIG = TileConfig(64, 128, 32, 4, 3)
INTERPRET_CONFIG = TileConfig(16, 32, 32, 4, 1)


def default_config(dtype: torch.dtype) -> TileConfig:
    if _INTERPRET:
        return INTERPRET_CONFIG
    return GPU_CONFIG if dtype in (torch.bfloat16, torch.float16) else FP32_CONFIG


# ------------------------------------------------------------------ 1. mainloop: bin maxima


@triton.jit
def _binmax_kernel(
    x_ptr, w_ptr, b_ptr, binmax_ptr,
    N, L, d, n_bins,
    stride_xn, stride_wl,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(N, BLOCK_N)
    n_tiles = n_row_blocks * n_bins
    if USE_TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[N, d], strides=[stride_xn, 1],
                                           block_shape=[BLOCK_N, BLOCK_D])
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[L, d], strides=[stride_wl, 1],
                                           block_shape=[BLOCK_L, BLOCK_D])
    cols = tl.arange(0, BLOCK_D)
    for tile in tl.range(pid, n_tiles, NUM_PROGRAMS, flatten=FLATTEN):
        row_block = tile % n_row_blocks  # row blocks fastest: tiles in flight share W tiles
        latent_bin = tile // n_row_blocks
        row0 = row_block * BLOCK_N
        lat0 = latent_bin * BLOCK_L
        rows = (row0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        lats = (lat0 + tl.arange(0, BLOCK_L)).to(tl.int64)
        row_ok = rows < N
        lat_ok = lats < L
        acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
        for d0 in range(0, d, BLOCK_D):
            if USE_TMA:
                xt = x_desc.load([row0, d0])
                wt = w_desc.load([lat0, d0])
            else:
                col_ok = (d0 + cols) < d
                xt = tl.load(x_ptr + (rows * stride_xn)[:, None] + (d0 + cols)[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                wt = tl.load(w_ptr + (lats * stride_wl)[:, None] + (d0 + cols)[None, :],
                             mask=lat_ok[:, None] & col_ok[None, :], other=0.0)
            if DOT_FP32:  # interpreter only: its bf16 dot is wrong
                xt = xt.to(tl.float32)
                wt = wt.to(tl.float32)
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
        # Epilogue: no branch, no cross-warp reduction (each row lives in one warp).
        if HAS_BIAS:
            acc += tl.load(b_ptr + lats, mask=lat_ok, other=0.0).to(tl.float32)[None, :]
        acc = tl.where(acc == 0.0, 0.0, acc)  # -0.0 -> +0.0, as in the keys
        acc = tl.where(lat_ok[None, :], acc, float("-inf"))
        tl.store(binmax_ptr + latent_bin.to(tl.int64) * N + rows, tl.max(acc, axis=1), mask=row_ok)


# ------------------------------------------------------------------ 3. rescoring: grouped GEMM


@triton.jit
def _rescore_kernel(
    x_ptr, w_ptr, b_ptr, binmax_ptr, tau_ptr,
    pair_rows_ptr, chunk_bin_ptr, chunk_start_ptr, chunk_len_ptr,
    cand_ptr, count_ptr, bad_ptr,
    N, L, d, cap,
    stride_xn, stride_wl,
    HAS_BIAS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program: up to BLOCK_N rows that need the same bin; the mainloop's dot, gathered rows."""
    chunk = tl.program_id(0)
    latent_bin = tl.load(chunk_bin_ptr + chunk).to(tl.int64)
    start = tl.load(chunk_start_ptr + chunk).to(tl.int64)
    length = tl.load(chunk_len_ptr + chunk)
    slot = tl.arange(0, BLOCK_N)
    pair_ok = slot < length
    rows = tl.load(pair_rows_ptr + start + slot, mask=pair_ok, other=0).to(tl.int64)
    lat0 = latent_bin * BLOCK_L
    lats = lat0 + tl.arange(0, BLOCK_L).to(tl.int64)
    lat_ok = lats < L
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        col_ok = (d0 + cols) < d
        xt = tl.load(x_ptr + (rows * stride_xn)[:, None] + (d0 + cols)[None, :],
                     mask=pair_ok[:, None] & col_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + (lats * stride_wl)[:, None] + (d0 + cols)[None, :],
                     mask=lat_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            xt = xt.to(tl.float32)
            wt = wt.to(tl.float32)
        acc = tl.dot(xt, tl.trans(wt), acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + lats, mask=lat_ok, other=0.0).to(tl.float32)[None, :]
    acc = tl.where(acc == 0.0, 0.0, acc)
    acc = tl.where(lat_ok[None, :], acc, float("-inf"))

    # Run-time check: the rescored bin maximum must be the mainloop's, bit for bit.
    stored = tl.load(binmax_ptr + latent_bin * N + rows, mask=pair_ok, other=0.0)
    mismatch = pair_ok & (tl.max(acc, axis=1) != stored)
    tl.store(bad_ptr + rows, tl.full((BLOCK_N,), 1, tl.int8), mask=mismatch)

    # Append every entry >= tau_r to row r's candidate keys (slots from an atomic counter).
    tau = tl.load(tau_ptr + rows, mask=pair_ok, other=float("inf"))
    hit = pair_ok[:, None] & lat_ok[None, :] & (acc >= tau[:, None])
    hit_i = hit.to(tl.int32)
    base = tl.atomic_add(count_ptr + rows, tl.sum(hit_i, axis=1), mask=pair_ok)
    pos = (base[:, None] + tl.cumsum(hit_i, axis=1) - 1).to(tl.int64)
    keys = _pack_keys(acc, lats)
    tl.store(cand_ptr + rows[:, None] * cap + pos, keys, mask=hit & (pos < cap))


# ------------------------------------------------------------------ host side


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 3  # interpreter: a few programs, so each walks several tiles


def _dot_flags(dtype: torch.dtype) -> dict:
    return {
        "DOT_FP32": _INTERPRET and dtype != torch.float32,
        "INPUT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else torch.float32


def bin_maxima(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    config: TileConfig | None = None,
    use_tma: bool | None = None,
    num_programs: int | None = None,
) -> torch.Tensor:
    """The mainloop: [n_bins, N] fp32, entry (b, r) = max over latents of bin b of (x @ W.T + bias)[r].

    Also the `--mainloop-only` benchmark: the full matmul with a one-reduction epilogue.
    x and weight must already be in the compute dtype and contiguous.
    """
    n_rows, d = x.shape
    n_latents = weight.shape[0]
    config = config or default_config(weight.dtype)
    n_bins = triton.cdiv(n_latents, config.block_l)
    out = torch.empty(n_bins, n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return out
    if use_tma is None:
        use_tma = _tma_possible(x, weight)
    if use_tma:
        _install_allocator()
    n_prog = num_programs or _num_programs(x.device)
    n_tiles = triton.cdiv(n_rows, config.block_n) * n_bins
    n_prog = max(1, min(n_prog, n_tiles))
    _binmax_kernel[(n_prog,)](
        x, weight, bias if bias is not None else x, out,
        n_rows, n_latents, d, n_bins,
        x.stride(0), weight.stride(0),
        HAS_BIAS=bias is not None,
        USE_TMA=use_tma,
        FLATTEN=not _INTERPRET,
        NUM_PROGRAMS=n_prog,
        BLOCK_N=config.block_n, BLOCK_L=config.block_l, BLOCK_D=config.block_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
        **_dot_flags(weight.dtype),
    )
    return out


def _pair_chunks(mask: torch.Tensor, block_n: int) -> tuple[torch.Tensor, ...]:
    """(row of each pair, bin / first pair / length of each chunk) from the [n_bins, N] mask.

    `nonzero` lists pairs in (bin, row) order, i.e. already sorted by bin; each bin's pairs are
    cut into chunks of at most block_n, one program each. All on device, no Python loop.
    """
    pair_bins, pair_rows = mask.nonzero(as_tuple=True)
    counts = torch.bincount(pair_bins, minlength=mask.shape[0])
    chunks_per_bin = (counts + block_n - 1) // block_n
    n_chunks = int(chunks_per_bin.sum())
    device = mask.device
    chunk_bin = torch.repeat_interleave(torch.arange(mask.shape[0], device=device), chunks_per_bin)
    first_chunk = torch.cumsum(chunks_per_bin, 0) - chunks_per_bin
    bin_start = torch.cumsum(counts, 0) - counts
    within = torch.arange(n_chunks, device=device) - first_chunk[chunk_bin]
    chunk_start = bin_start[chunk_bin] + within * block_n
    chunk_len = torch.clamp(counts[chunk_bin] - within * block_n, max=block_n)
    return pair_rows.to(torch.int32), chunk_bin.to(torch.int32), chunk_start.to(torch.int64), chunk_len.to(torch.int32)


def _decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from sae_harvest_kernels.streaming import decode_keys

    values, ids = decode_keys(keys)
    return values.contiguous(), ids.to(torch.int32).contiguous()


def fallback_encode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int):
    """The rows the fast paths hand back: the fused kernel (k <= MAX_K), else streaming torch."""
    if k <= MAX_K and (x.is_cuda or _INTERPRET):
        from sae_harvest_kernels.topk_encode_triton import topk_encode_triton

        return topk_encode_triton(x, weight, bias, k)
    from sae_harvest_kernels.streaming import topk_encode_streaming

    return topk_encode_streaming(x, weight, bias, k)


def topk_encode_binmax(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    *,
    config: TileConfig | None = None,
    max_bins: int | None = None,
    max_candidates: int | None = None,
    verify: bool = True,
    use_tma: bool | None = None,
    num_programs: int | None = None,
    stats: dict | None = None,
    _after_mainloop=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `x @ weight.T + bias`: (values fp32 [N, k] descending, ids int32 [N, k]), ties to the lower id.

    `max_bins` (default 2k): rows with more candidate bins go to the fallback; `max_candidates`
    (default 4k + 64): rows with more entries >= tau go to the fallback. `stats`, if given, is
    filled with counts (pairs, fallback rows by reason). `_after_mainloop(bin_maxima)` lets a test
    corrupt the stored maxima to prove the run-time check catches it.
    """
    n_rows, d = x.shape
    n_latents = weight.shape[0]
    if not 1 <= k <= n_latents:
        raise ValueError(f"k={k} must be between 1 and the number of latents ({n_latents})")
    if n_latents >= 2**32:
        raise ValueError("latent ids must fit in 32 bits")
    dtype = compute_dtype(weight)
    x = x.to(dtype).contiguous()
    weight = weight.to(dtype).contiguous()
    bias = bias.contiguous() if bias is not None else None
    config = config or default_config(dtype)
    device = x.device
    if n_rows == 0:
        return torch.empty(0, k, dtype=torch.float32, device=device), torch.empty(0, k, dtype=torch.int32, device=device)

    # 1. Mainloop.
    maxima = bin_maxima(x, weight, bias, config, use_tma, num_programs)
    if _after_mainloop is not None:
        _after_mainloop(maxima)
    n_bins = maxima.shape[0]

    # 2. tau_r and the candidate bins (bins with max >= tau_r).
    if n_bins >= k:
        tau = torch.topk(maxima, k, dim=0).values[-1]  # [N]
    else:  # fewer bins than k: no k distinct bin maxima to bound with, every entry is a candidate
        tau = torch.full((n_rows,), float("-inf"), device=device)
    mask = maxima >= tau[None, :]
    bins_per_row = mask.sum(dim=0)
    max_bins = max(2 * k, 1) if max_bins is None else max_bins
    exploded = bins_per_row > max_bins
    mask &= ~exploded[None, :]

    # 3. Rescoring.
    cap = 4 * k + 64 if max_candidates is None else max_candidates
    pair_rows, chunk_bin, chunk_start, chunk_len = _pair_chunks(mask, config.block_n)
    cand = torch.full((n_rows, cap), _EMPTY.value, dtype=torch.int64, device=device)
    count = torch.zeros(n_rows, dtype=torch.int32, device=device)
    bad = torch.zeros(n_rows, dtype=torch.int8, device=device)
    if len(chunk_bin):
        _rescore_kernel[(len(chunk_bin),)](
            x, weight, bias if bias is not None else x, maxima, tau,
            pair_rows, chunk_bin, chunk_start, chunk_len,
            cand, count, bad,
            n_rows, n_latents, d, cap,
            x.stride(0), weight.stride(0),
            HAS_BIAS=bias is not None,
            BLOCK_N=config.block_n, BLOCK_L=config.block_l, BLOCK_D=config.block_d,
            num_warps=config.num_warps, num_stages=config.num_stages,
            **_dot_flags(dtype),
        )
    keys = torch.topk(cand, k, dim=1).values  # unique keys: an exact, tie-free selection
    values, ids = _decode_keys(keys)

    # Rows the fast path cannot vouch for go to the fallback kernel.
    overflow = count > cap
    mismatch = (bad != 0) if verify else torch.zeros_like(exploded)
    redo = (exploded | overflow | mismatch).nonzero().squeeze(1)
    if len(redo):
        values[redo], ids[redo] = fallback_encode(x[redo], weight, bias, k)
    if stats is not None:
        stats.update(
            pairs=len(pair_rows), chunks=len(chunk_bin), bins=n_bins,
            exploded_rows=int(exploded.sum()), overflow_rows=int(overflow.sum()),
            mismatch_rows=int((bad != 0).sum()), fallback_rows=len(redo),
        )
    return values, ids

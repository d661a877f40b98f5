"""FAISS-style exact top-k encode: cuBLAS GEMM into fp32 chunk buffers, a threshold filter, a merge.

L is walked in chunks of `chunk` latents. Per chunk:
- GEMM: `torch.mm(x, W[chunk].T)` with an fp32 output (bf16/fp16 inputs, fp32 accumulation,
  `out_dtype=torch.float32` on CUDA) into one of two reused [N, chunk] buffers. Chunks alternate
  between two CUDA streams, so chunk i+1's GEMM runs while chunk i is filtered and merged.
- Filter (`_filter_kernel`, bandwidth-bound): each entry (+ bias, -0.0 -> +0.0) that beats its
  row's running threshold strictly (the k-th best value so far; a later, higher id loses a tie)
  is appended as an int64 order key to the row's candidate list; an atomic counter per row
  gives the slots, capped at `cap`.
- Merge: one `torch.topk` over the [N, k + cap] keys (unique keys: exact, ties to the lower id)
  gives the new running top-k and threshold.
The first chunk (at least k wide) has no threshold yet and is selected exactly by torch. A row
whose candidates overflow `cap` in some chunk is flagged on device (no host sync per chunk)
and recomputed at the end by the fallback kernel. Cost beyond the GEMM: writing and reading
N*chunk fp32 per chunk, independent of d, so this path nears the matmul roofline at large d.
Memory: 2 * N * chunk * 4 bytes of buffers + O(N * (k + cap)).
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from sae_harvest_kernels.topk_encode_triton import _EMPTY, _pack_keys

CHUNK_BYTES = 512 * 2**20  # one fp32 [N, chunk] buffer
MAX_CHUNK = 1 << 16


@triton.jit
def _filter_kernel(
    s_ptr, b_ptr, thr_ptr, cand_ptr, count_ptr,
    N, width, lat0, stride_s, cap,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < N
    col_ok = cols < width
    ok = row_ok[:, None] & col_ok[None, :]
    v = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=ok, other=0.0)
    lats = lat0 + cols.to(tl.int64)
    if HAS_BIAS:
        v += tl.load(b_ptr + lats, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    v = tl.where(v == 0.0, 0.0, v)  # -0.0 -> +0.0, as in the keys
    thr = tl.load(thr_ptr + rows, mask=row_ok, other=float("inf"))
    hit = ok & (v > thr[:, None])
    hit_i = hit.to(tl.int32)
    base = tl.atomic_add(count_ptr + rows, tl.sum(hit_i, axis=1), mask=row_ok)
    pos = (base[:, None] + tl.cumsum(hit_i, axis=1) - 1).to(tl.int64)
    tl.store(cand_ptr + rows[:, None] * cap + pos, _pack_keys(v, lats), mask=hit & (pos < cap))


_MM_OUT_DTYPE = True  # torch >= 2.8 on CUDA: bf16/fp16 x bf16/fp16 -> fp32 output in cuBLAS


def mm_fp32(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> None:
    """out[N, c] = x @ w.T accumulated and stored in fp32."""
    global _MM_OUT_DTYPE
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE:
        try:
            torch.mm(x, w.T, out_dtype=torch.float32, out=out)
            return
        except (TypeError, RuntimeError):
            _MM_OUT_DTYPE = False  # older torch: upcast instead (slower, same values)
    torch.mm(x.float(), w.float().T, out=out)


def default_chunk(n_rows: int, k: int) -> int:
    fits = CHUNK_BYTES // (4 * max(1, n_rows))
    return max(triton.next_power_of_2(k), min(MAX_CHUNK, 1 << max(10, fits.bit_length() - 1)))


def topk_encode_gemm_filter(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    *,
    chunk: int | None = None,
    cap: int | None = None,
    stats: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `x @ weight.T + bias`: (values fp32 [N, k] descending, ids int32 [N, k]), ties to the lower id."""
    from sae_harvest_kernels.binmax import _decode_keys, compute_dtype, fallback_encode
    from sae_harvest_kernels.streaming import _topk_keys

    n_rows, d = x.shape
    n_latents = weight.shape[0]
    if not 1 <= k <= n_latents:
        raise ValueError(f"k={k} must be between 1 and the number of latents ({n_latents})")
    if n_latents >= 2**32:
        raise ValueError("latent ids must fit in 32 bits")
    device = x.device
    if n_rows == 0:
        return torch.empty(0, k, dtype=torch.float32, device=device), torch.empty(0, k, dtype=torch.int32, device=device)
    dtype = compute_dtype(weight)
    x = x.to(dtype).contiguous()
    weight = weight.to(dtype)
    bias_f = bias.float().contiguous() if bias is not None else None
    chunk = max(k, chunk or default_chunk(n_rows, k))
    cap = cap or 2 * triton.next_power_of_2(k) + 64

    cuda = device.type == "cuda"
    main = torch.cuda.current_stream(device) if cuda else None
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)] if cuda else [None, None]
    for s in streams:
        if s is not None:
            s.wait_stream(main)
    width0 = min(chunk, n_latents)
    # Flat storage: every chunk, the ragged last one too, gets a contiguous [N, width] view
    # (cuBLAS writes `out=` in place only when it is contiguous).
    buffers = [torch.empty(n_rows * width0, dtype=torch.float32, device=device) for _ in range(2)]
    cands = [torch.empty(n_rows, cap, dtype=torch.int64, device=device) for _ in range(2)]
    counts = [torch.empty(n_rows, dtype=torch.int32, device=device) for _ in range(2)]
    overflow = torch.zeros(n_rows, dtype=torch.bool, device=device)
    best, ready = None, None
    for i, start in enumerate(range(0, n_latents, chunk)):
        j = i % 2
        stop = min(start + chunk, n_latents)
        width = stop - start
        stream = streams[j]
        with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
            buf = buffers[j][: n_rows * width].view(n_rows, width)
            mm_fp32(x, weight[start:stop], buf)  # overlaps the other stream's filter + merge
            if ready is not None:
                stream.wait_event(ready)
            if best is None:  # first chunk (>= k wide): no threshold yet, exact torch selection
                pre = buf + bias_f[start:stop] if bias_f is not None else buf
                ids = torch.arange(start, stop, device=device).expand(n_rows, width)
                best = _topk_keys(pre, ids, k)
            else:
                thr = _decode_keys(best[:, k - 1])[0]
                counts[j].zero_()
                cands[j].fill_(_EMPTY.value)
                grid = (triton.cdiv(n_rows, 16), triton.cdiv(width, 256))
                _filter_kernel[grid](
                    buf, bias_f if bias_f is not None else buf, thr, cands[j], counts[j],
                    n_rows, width, start, buf.stride(0), cap,
                    HAS_BIAS=bias_f is not None, BLOCK_R=16, BLOCK_C=256, num_warps=4,
                )
                overflow |= counts[j] > cap
                best = torch.topk(torch.cat([best, cands[j]], dim=1), k, dim=1).values
            if cuda:
                best.record_stream(streams[1 - j])  # read there next; don't let the allocator reuse it early
                ready = torch.cuda.Event()
                ready.record(stream)
    if cuda:
        main.wait_event(ready)
        best.record_stream(main)
        for t in (*buffers, *cands, *counts, overflow):
            for s in streams:
                t.record_stream(s)
    values, ids = _decode_keys(best)
    redo = overflow.nonzero().squeeze(1)
    if len(redo):
        values[redo], ids[redo] = fallback_encode(x[redo], weight, bias, k)
    if stats is not None:
        stats.update(chunks=triton.cdiv(n_latents, chunk), overflow_rows=len(redo), fallback_rows=len(redo))
    return values, ids

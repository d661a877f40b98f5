"""Streaming top-k encode in plain torch: the CPU path and the fallback beside the Triton kernel.

The latent dimension is walked in chunks. Each chunk's pre-activations [N, chunk] exist only
while that chunk is processed, and a running top-k [N, k] is merged with the chunk's top-k,
so memory is O(N*chunk + N*k) however large L is.

Exact tie rule (values descending, ties to the lower id) without sorting anything wide:
candidates are compared through int64 order keys (the fp32 value mapped to an order-preserving
int32 in the high half, the inverted id in the low half), so one `torch.topk` over keys is an
exact, tie-free selection; the running top-k is kept as keys and merged with each chunk's by
one more `torch.topk` over 2k keys. Per chunk, a group-max prefilter (see `_chunk_keys`) keeps
the expensive selection to k*GROUP candidates instead of the chunk's full width.
"""
from __future__ import annotations

import torch

# Chunk width: wide enough that the matmul dominates the selection work (measured by
# bench/cpu.py: 32768 latents per chunk at N=4096 keeps encode within 1.1x of the bare matmul),
# capped so the [N, chunk] fp32 block stays within CHUNK_ELEMENTS (512 MB) whatever N is.
MAX_CHUNK = 32768
MIN_CHUNK = 2048
CHUNK_ELEMENTS = 1 << 27
# Group size of the prefilter below: one `amax` per group of this many latents.
GROUP = 32
_LOW32 = 0xFFFFFFFF


def order_keys(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys whose order is (value descending, id ascending): one `torch.topk` on keys is
    an exact, tie-free top-k. High 32 bits: the fp32 value mapped to an order-preserving int32;
    low 32 bits: ~id. Requires 0 <= id < 2^32."""
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0: equal floats, equal keys
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip magnitude bits so larger is larger
    return (bits.long() << 32) | (_LOW32 - ids.long())


def decode_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ids = _LOW32 - (keys & _LOW32)
    bits = (keys >> 32).to(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), ids


def _topk_keys(values: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Keys of the exact top-min(k, width) of `values` (ids alongside), cheaply.

    A float `torch.topk` with one extra value finds the top-k *set* whenever the k-th and
    (k+1)-th values differ; only rows where they tie (rare on real data) need keys over the
    whole row. Building keys for k entries instead of the whole width saves most of the work.
    """
    width = values.shape[1]
    if width <= k:
        return torch.topk(order_keys(values, ids), width, dim=1).values
    top_values, columns = torch.topk(values, k + 1, dim=1, sorted=True)
    # Equal values inside the top-k come back from torch.topk in no particular id order: sort keys.
    keys = torch.sort(order_keys(top_values[:, :k], ids.gather(1, columns[:, :k])), dim=1, descending=True).values
    tied = (top_values[:, k - 1] == top_values[:, k]).nonzero().squeeze(1)
    if len(tied):
        keys[tied] = torch.topk(order_keys(values[tied], ids[tied]), k, dim=1).values
    return keys


def _chunk_keys(pre: torch.Tensor, start: int, k: int, floor: torch.Tensor | None = None) -> torch.Tensor:
    """Keys of the exact top-min(k, width) of one chunk whose first latent id is `start`.

    `torch.topk` over a wide chunk costs about as much as the matmul that produced it on CPU,
    so the chunk is cut into groups of GROUP latents and only the k groups with the largest
    maxima are searched. Exact: if a latent is in the top-k, every group ranked above its
    group (larger max, or equal max and lower index) holds a distinct latent that beats it, so
    fewer than k groups rank above its group. Rows where the k-th and (k+1)-th group maxima
    tie are searched in full.

    `floor` [N, 1] is the running k-th best value: a chunk's latent must beat it strictly to
    enter (on a tie the earlier, lower id wins), so only groups whose max exceeds it matter, and
    once the running top-k is good most rows have few such groups.
    """
    n, width = pre.shape
    n_groups = width // GROUP
    if width % GROUP or n_groups < 2 * (k + 1):  # ragged, or too few groups to gain anything
        return _topk_keys(pre, torch.arange(start, start + width, device=pre.device).expand(n, width), k)
    grouped = pre.view(n, n_groups, GROUP)
    maxima = grouped.amax(dim=2)
    wanted = k
    if floor is not None:
        # The most groups any row can still use; each row's usable groups are its largest.
        wanted = min(k, int((maxima > floor).sum(dim=1).max()))
        if wanted == 0:
            return torch.empty(n, 0, dtype=torch.int64, device=pre.device)
    if wanted < k:  # every usable group is among each row's top `wanted`: no tie can drop one
        group_ids = torch.topk(maxima, wanted, dim=1, sorted=False).indices
        candidates = grouped.gather(1, group_ids[:, :, None].expand(-1, -1, GROUP)).reshape(n, wanted * GROUP)
        candidate_ids = start + (group_ids[:, :, None] * GROUP + torch.arange(GROUP, device=pre.device)).reshape(n, -1)
        return _topk_keys(candidates, candidate_ids, k)
    group_max, group_ids = torch.topk(maxima, k + 1, dim=1)
    group_ids = group_ids[:, :k]
    candidates = grouped.gather(1, group_ids[:, :, None].expand(-1, -1, GROUP)).reshape(n, k * GROUP)
    candidate_ids = start + (group_ids[:, :, None] * GROUP + torch.arange(GROUP, device=pre.device)).reshape(n, -1)
    keys = _topk_keys(candidates, candidate_ids, k)
    tied = (group_max[:, k - 1] == group_max[:, k]).nonzero().squeeze(1)
    if len(tied):
        ids = torch.arange(start, start + width, device=pre.device).expand(len(tied), width)
        keys[tied] = torch.topk(order_keys(pre[tied], ids), k, dim=1).values
    return keys


def default_chunk(n_rows: int) -> int:
    """Latents per chunk for `n_rows` inputs: MAX_CHUNK, less when N x chunk would pass the budget."""
    fits = CHUNK_ELEMENTS // max(1, n_rows) // GROUP * GROUP
    return max(MIN_CHUNK, min(MAX_CHUNK, fits))


def topk_encode_streaming(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    k: int,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of `x @ weight.T + bias` over latents; returns (values fp32 [N,k], ids int32 [N,k]).

    The running top-k is kept as order keys, so merging a chunk is one `torch.topk` over 2k keys.
    """
    n_latents = weight.shape[0]
    if not 1 <= k <= n_latents:
        raise ValueError(f"k={k} must be between 1 and the number of latents ({n_latents})")
    if n_latents >= 1 << 32:
        raise ValueError(f"{n_latents} latents: ids must fit in 32 bits")
    if chunk is None:
        chunk = default_chunk(x.shape[0])
    xf = x.float()
    best = None
    for start in range(0, n_latents, chunk):
        stop = min(start + chunk, n_latents)
        w = weight[start:stop].float()
        pre = torch.addmm(bias[start:stop].float(), xf, w.T) if bias is not None else xf @ w.T
        floor = decode_keys(best[:, k - 1:k])[0] if best is not None and best.shape[1] == k else None
        keys = _chunk_keys(pre, start, k, floor)
        if best is not None:
            merged = torch.cat([best, keys], dim=1)
            keys = torch.topk(merged, min(k, merged.shape[1]), dim=1).values
        best = keys
    values, ids = decode_keys(best)
    return values.contiguous(), ids.to(torch.int32).contiguous()


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

"""Exact merge of top-k lists computed over disjoint, increasing latent ranges.

Used by the latent-split SAE (`pipeline.sae.latent_split`): each part returns its local top-k
with global ids, merged here in range order.

Why a stable sort is exact: each part is already ordered (values descending, ties to the
lower id) and every id of part i is lower than every id of part i+1. Concatenating in range
order therefore lists tied values in increasing id order, and a stable descending sort keeps
that order: the result is the global top-k with ties to the lower id.
"""
from __future__ import annotations

import torch


def merge_topk(parts: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-range (values[N, k_i], ids[N, k_i]) into (values[N, k], ids int32 [N, k]).

    `parts` must be in increasing latent-range order, each part ordered by the tie rule and
    holding global ids. Parts may be narrower than k (a range with fewer than k latents), but
    together they must hold at least k entries per row.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one part")
    n_rows = parts[0][0].shape[0]
    for values, ids in parts:
        if values.dim() != 2 or values.shape != ids.shape or values.shape[0] != n_rows:
            raise ValueError(
                f"every part must be values/ids of shape [{n_rows}, k_i]; got {tuple(values.shape)} / {tuple(ids.shape)}"
            )
    width = sum(values.shape[1] for values, _ in parts)
    if not 1 <= k <= width:
        raise ValueError(f"k={k} must be between 1 and the merged width {width}")
    values = torch.cat([v for v, _ in parts], dim=1)
    ids = torch.cat([i.long() for _, i in parts], dim=1)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order).contiguous(), ids.gather(1, order).to(torch.int32).contiguous()

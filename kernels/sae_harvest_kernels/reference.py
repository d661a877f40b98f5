"""Plain-torch references: the definitions every other encode path is tested against.

They materialize the full N x L pre-activation matrix, so they are for tests and small
shapes only. Ordering rule shared by every path: values descending, ties to the lower id.
"""
from __future__ import annotations

import torch


def preactivations(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T + bias` in fp32, whatever the input dtype."""
    pre = x.float() @ weight.float().T
    if bias is not None:
        pre = pre + bias.float()
    return pre


def ordered_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, values descending, ties to the lower index.

    A stable descending sort keeps equal values in index order, which is exactly the tie
    rule; `torch.topk` alone may return either of two tied ids at the k-th place.
    """
    values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], indices[..., :k].to(torch.int32)


def topk_encode_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return ordered_topk(preactivations(x, weight, bias), k)


def sparse_decode_reference(values: torch.Tensor, indices: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """Dense scatter then matmul: out[n] = sum_j values[n, j] * w_dec[indices[n, j]] (fp32)."""
    dense = torch.zeros(values.shape[0], w_dec.shape[0], dtype=torch.float32, device=values.device)
    dense.scatter_add_(1, indices.long(), values.float())
    return dense @ w_dec.float()

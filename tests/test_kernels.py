"""The streaming torch encode equals the brute-force reference exactly, ties included."""
from __future__ import annotations

import pytest
import sae_harvest_kernels
import torch
from sae_harvest_kernels.reference import ordered_topk, preactivations, sparse_decode_reference, topk_encode_reference
from sae_harvest_kernels.streaming import sparse_decode_torch, topk_encode_streaming

GRID = [
    # N, d, L, k, chunk
    (1, 8, 16, 1, 4),
    (7, 16, 100, 5, 32),
    (33, 24, 257, 7, 64),  # k and L not powers of two, L not a multiple of chunk
    (64, 32, 1000, 32, 128),
    (16, 8, 300, 96, 64),  # k larger than a chunk
    (5, 8, 40, 40, 16),  # k == L
    # Chunks wide enough for the group-max prefilter (>= 2 (k+1) groups of 32 latents)
    (40, 16, 3000, 3, 1024),
    (17, 8, 9000, 7, 2048),  # last chunk ragged: exact path for it
]


@pytest.mark.parametrize("n,d,L,k,chunk", GRID)
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("ties", [False, True])
def test_streaming_equals_reference(n, d, L, k, chunk, with_bias, ties):
    g = torch.Generator().manual_seed(n * 1000 + L + k)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(L, d, generator=g)
    b = torch.randn(L, generator=g) if with_bias else None
    if ties:  # small integers: many exactly equal pre-activations, ties at the k-th place
        x, w = x.round().clamp(-1, 1), w.round().clamp(-1, 1)
        b = b.round() if b is not None else None
    values, ids = topk_encode_streaming(x, w, b, k, chunk=chunk)
    ref_values, ref_ids = topk_encode_reference(x, w, b, k)
    assert ids.dtype == torch.int32 and values.dtype == torch.float32
    if ties:  # small integers: every sum is exact, so ids and values must match bit for bit
        assert torch.equal(values, ref_values)
        assert torch.equal(ids, ref_ids)
    else:  # chunked and whole matmuls round differently in the last ulp
        assert_same_topk(values, ids, preactivations(x, w, b), k)


def assert_same_topk(values, ids, pre, k, tol=1e-4):
    """Values match the reference; ids match except where reference values tie within `tol`."""
    ref_values, ref_ids = ordered_topk(pre, k)
    torch.testing.assert_close(values, ref_values, rtol=tol, atol=tol)
    torch.testing.assert_close(values, pre.gather(1, ids.long()), rtol=tol, atol=tol)  # ids carry their values
    assert (values[:, :-1] >= values[:, 1:]).all(), "values must be descending"
    kth = ref_values[:, -1:]
    must_have = pre > kth + tol * (1 + kth.abs())
    chosen = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, ids.long(), True)
    assert (chosen | ~must_have).all(), "a latent clearly above the k-th value is missing"
    assert all(len(set(row)) == k for row in ids.tolist()), "ids must be distinct within a row"
    gaps = ref_values[:, :-1] - ref_values[:, 1:]
    exact = gaps.min(dim=1).values > tol if k > 1 else torch.ones(len(pre), dtype=torch.bool)
    clear = exact & ((pre >= kth - tol).sum(1) == k)
    assert torch.equal(ids[clear], ref_ids[clear]), "ids differ on rows without near-ties"


def test_tie_straddling_kth_place_goes_to_lower_id():
    # Latents 3, 5, 9 tie at the 2nd place: a plain torch.topk may return any of them.
    x = torch.ones(1, 1)
    w = torch.zeros(12, 1)
    w[7] = 2.0
    w[[9, 3, 5]] = 1.0
    values, ids = sae_harvest_kernels.topk_encode(x, w, None, 3, backend="torch")
    assert ids.tolist() == [[7, 3, 5]]
    assert values.tolist() == [[2.0, 1.0, 1.0]]


def test_group_prefilter_with_ties_between_group_maxima():
    # Every group has the same maximum: the prefilter must fall back, not drop low ids.
    x = torch.ones(4, 1)
    w = torch.zeros(4096, 1)
    w[::32] = 1.0  # one maximum per group of 32, all equal
    w[4000] = 2.0
    values, ids = topk_encode_streaming(x, w, None, 5, chunk=4096)
    assert ids.tolist() == [[4000, 0, 32, 64, 96]] * 4
    assert values.tolist() == [[2.0, 1.0, 1.0, 1.0, 1.0]] * 4


def test_ties_inside_the_topk_are_ordered_by_id_in_a_single_chunk():
    # No tie at the k-th place, but ties inside the top-k: order must still be by id.
    x = torch.ones(2, 1)
    w = torch.zeros(500, 1)
    w[[400, 7, 250, 3]] = 5.0
    w[100] = 9.0
    values, ids = topk_encode_streaming(x, w, None, 5)
    assert ids.tolist() == [[100, 3, 7, 250, 400]] * 2


def test_ties_across_chunks_keep_lower_id():
    x = torch.ones(3, 2)
    w = torch.ones(50, 2)  # every latent ties
    values, ids = topk_encode_streaming(x, w, None, 6, chunk=7)
    assert ids.tolist() == [list(range(6))] * 3


def test_bf16_inputs_are_accumulated_in_fp32():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 64, generator=g).bfloat16()
    w = torch.randn(500, 64, generator=g).bfloat16()
    values, ids = sae_harvest_kernels.topk_encode(x, w, None, 8)
    assert_same_topk(values, ids, preactivations(x, w, None), 8)


def test_ordered_topk_matches_full_sort():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    values, ids = ordered_topk(scores, 4)
    assert ids.tolist() == [[1, 2, 4, 3]]


@pytest.mark.parametrize("n,k,L,d", [(1, 1, 4, 3), (9, 5, 50, 16), (70, 32, 300, 40)])
def test_sparse_decode_equals_dense(n, k, L, d):
    g = torch.Generator().manual_seed(n + k)
    values = torch.randn(n, k, generator=g)
    ids = torch.stack([torch.randperm(L, generator=g)[:k] for _ in range(n)]).int()
    w = torch.randn(L, d, generator=g)
    dense = torch.zeros(n, L)
    dense.scatter_(1, ids.long(), values)
    torch.testing.assert_close(sparse_decode_torch(values, ids, w), dense @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae_harvest_kernels.sparse_decode(values, ids, w), sparse_decode_reference(values, ids, w))


def test_argument_errors_name_the_problem():
    with pytest.raises(ValueError, match="k=9"):
        sae_harvest_kernels.topk_encode(torch.randn(2, 4), torch.randn(8, 4), None, 9)
    with pytest.raises(ValueError, match="d=5"):
        sae_harvest_kernels.topk_encode(torch.randn(2, 4), torch.randn(8, 5), None, 2)
    with pytest.raises(ValueError, match="unknown encode backend"):
        sae_harvest_kernels.topk_encode(torch.randn(2, 4), torch.randn(8, 4), None, 2, backend="cuda")

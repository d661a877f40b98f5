"""Latent-split SAE: the merge of per-range top-k equals the unsplit SAE exactly."""
from __future__ import annotations

import itertools

import pytest
import torch
from sae_harvest_kernels.merge import merge_topk
from sae_harvest_kernels.reference import ordered_topk, preactivations

from pipeline.sae.formats import load_sae
from pipeline.sae.latent_split import LatentPartActor, LatentSplitSAE, load_slices, split_ranges
from pipeline.sae.sae import SAE
from tests.conftest import random_sae

D, L = 16, 1000
CPUS = 0.1  # logical CPUs per actor: several split SAEs fit in ray_local's 2 CPUs


def int_sae() -> SAE:
    """Weights and biases in {-1, 0, 1}. With inputs in {-1, 0, 1} pre-activations are small
    exact integers, so every row has many ties, across part boundaries and straddling the
    k-th place; with float inputs it is the generic case. b_pre and latent_scale are set so
    every transform SAE.encode applies is exercised (input_norm: see the from_path test)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randint(-1, 2, (L, D), generator=g).float()
    return SAE(W_enc=w, b_enc=torch.randint(-1, 2, (L,), generator=g).float(), W_dec=w.clone(),
               b_dec=torch.randint(-1, 2, (D,), generator=g).float(), k=7,
               b_pre=torch.randint(-1, 2, (D,), generator=g).float(),
               latent_scale=0.5 + torch.rand(L, generator=g))


def inputs(kind: str, n: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(4)
    if kind == "int":
        return torch.randint(-1, 2, (n, D), generator=g).float()
    return torch.randn(n, D, generator=g)


def reference_parts(scores: torch.Tensor, ranges: list[tuple[int, int]], k: int):
    """Per-range ordered top-k with global ids, as each part returns it."""
    parts = []
    for start, stop in ranges:
        values, ids = ordered_topk(scores[:, start:stop], min(k, stop - start))
        parts.append((values, ids + start))
    return parts


# -- pure functions, no Ray ----------------------------------------------------------------


@pytest.mark.parametrize("n_latents,n_parts", [(1000, 1), (1000, 3), (10, 4), (7, 7), (2**24, 8)])
def test_split_ranges_cover_contiguously(n_latents, n_parts):
    ranges = split_ranges(n_latents, n_parts)
    assert len(ranges) == n_parts
    assert ranges[0][0] == 0 and ranges[-1][1] == n_latents
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    sizes = [stop - start for start, stop in ranges]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n_parts", [0, 11])
def test_split_ranges_rejects_bad_counts(n_parts):
    with pytest.raises(ValueError):
        split_ranges(10, n_parts)


def test_merge_topk_ties_go_to_the_lower_id_across_parts():
    low = (torch.tensor([[5.0, 3.0, 3.0]]), torch.tensor([[10, 11, 12]], dtype=torch.int32))
    high = (torch.tensor([[5.0, 3.0]]), torch.tensor([[20, 21]], dtype=torch.int32))
    values, ids = merge_topk([low, high], 4)
    assert values.tolist() == [[5.0, 5.0, 3.0, 3.0]]
    assert ids.tolist() == [[10, 20, 11, 12]]
    assert ids.dtype == torch.int32


@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("cuts", [[0, 40], [0, 3, 40], [0, 9, 10, 25, 40]])
def test_merge_topk_matches_unsharded_reference(k, cuts):
    # Few distinct values -> ties everywhere; some parts are narrower than k.
    scores = torch.randint(0, 4, (50, 40), generator=torch.Generator().manual_seed(k)).float()
    ranges = list(itertools.pairwise(cuts))
    values, ids = merge_topk(reference_parts(scores, ranges, k), k)
    expected_values, expected_ids = ordered_topk(scores, k)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids)


def test_merge_topk_rejects_bad_parts():
    part = (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError):
        merge_topk([part, part], 7)  # only 6 entries per row
    with pytest.raises(ValueError):
        merge_topk([part, (torch.zeros(3, 3), torch.zeros(3, 3, dtype=torch.int32))], 2)
    with pytest.raises(ValueError):
        merge_topk([], 1)


def test_part_actor_returns_global_ids_of_its_range():
    sae = int_sae()
    start, stop = 300, 550
    actor = LatentPartActor(start, stop, tensors={"W_enc": sae.W_enc[start:stop], "b_enc": sae.b_enc[start:stop],
                                                "W_dec": sae.W_dec[start:stop]})
    x = inputs("int")
    values, ids = actor.encode_part(x, 9)
    expected_values, expected_ids = ordered_topk(preactivations(x, sae.W_enc, sae.b_enc)[:, start:stop], 9)
    assert torch.equal(values, expected_values)
    assert torch.equal(ids, expected_ids + start)
    assert torch.equal(actor.decoder_rows(torch.tensor([300, 549])), sae.W_dec[[300, 549]])
    with pytest.raises(ValueError):
        actor.decoder_rows(torch.tensor([550]))


def test_load_slices_reads_only_the_range(tmp_path):
    sae = random_sae(D, L, k=7, seed=1)
    sae.save(tmp_path)
    got = load_slices(tmp_path, 250, 500)
    assert got["W_enc"].shape == (250, D)
    assert torch.equal(got["W_enc"], sae.W_enc[250:500])
    assert torch.equal(got["W_dec"], sae.W_dec[250:500])
    assert torch.equal(got["b_enc"], sae.b_enc[250:500])


# -- on Ray ----------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=[2, 3, 4], ids=lambda n: f"{n}parts")
def split_sae(request, ray_local):
    s = LatentSplitSAE(int_sae(), request.param, num_cpus=CPUS, ready_timeout_s=60)
    try:
        yield s
    finally:
        s.close()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int", "float"])
@pytest.mark.parametrize("k", [7, 32])
def test_split_encode_equals_unsharded(split_sae, kind, k):
    sae, x = int_sae(), inputs(kind)
    expected_values, expected_ids = sae.encode(x, k)
    values, ids = split_sae.encode(x, k)
    assert ids.dtype == torch.int32
    assert torch.equal(ids, expected_ids)
    assert torch.equal(values, expected_values)
    if kind == "int":
        # The data must make the tie rule matter across shards: merging the parts' lists
        # with later ranges first (ties to the higher part) has to give different ids.
        parts = reference_parts(preactivations(x - sae.b_pre, sae.W_enc, sae.b_enc), split_sae.ranges, k)
        assert not torch.equal(merge_topk(parts[::-1], k)[1], expected_ids)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["int", "float"])
def test_split_decode_equals_unsharded(split_sae, kind):
    sae, x = int_sae(), inputs(kind)
    values, ids = sae.encode(x, 32)
    assert torch.equal(split_sae.decode(values, ids), sae.decode(values, ids))


@pytest.mark.slow
def test_split_sae_has_the_sae_interface(split_sae):
    assert (split_sae.d_in, split_sae.n_latents, split_sae.k) == (D, L, 7)
    x = inputs("float")
    split_sae.k = 32  # the harvest overrides k from its config this way
    try:
        assert torch.equal(split_sae.encode(x)[1], int_sae().encode(x, 32)[1])
    finally:
        split_sae.k = 7
    with pytest.raises(ValueError):
        split_sae.encode(torch.zeros(2, D + 1))


@pytest.mark.slow
@pytest.mark.own_workers  # its placement group needs the CPUs kept workers would hold
def test_from_path_gives_each_actor_only_its_slice_and_close_frees_it(tmp_path, ray_local):
    from ray.util.placement_group import placement_group_table

    # Random float weights, the OpenAI input norm, and 40 latents over 3 actors with k=32:
    # every part is narrower than k.
    sae = random_sae(D, 40, k=32, seed=5)
    sae.input_norm = "openai_layernorm"
    sae.b_pre = torch.full((D,), 0.25)
    sae.latent_scale = torch.linspace(0.5, 2.0, 40)
    sae.save(tmp_path)
    loaded = load_sae(tmp_path)
    s = LatentSplitSAE.from_path(tmp_path, 3, num_cpus=CPUS, ready_timeout_s=60)
    pg = s._pg
    try:
        info = s.part_info()
        assert [i["W_enc"] for i in info] == [(14, D), (13, D), (13, D)]
        assert [(i["start"], i["stop"]) for i in info] == [(0, 14), (14, 27), (27, 40)]
        assert s.sae.W_enc.is_meta  # the driver holds no weight matrix either
        assert s.sae.sha256 == loaded.sha256
        x = inputs("float")
        values, ids = s.encode(x)
        expected_values, expected_ids = loaded.encode(x)
        assert torch.equal(ids, expected_ids) and torch.equal(values, expected_values)
        assert torch.equal(s.decode(values, ids), loaded.decode(values, ids))
    finally:
        s.close()
    assert placement_group_table(pg)["state"] == "REMOVED"
    assert s.actors == []


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["own", "openai"])
def test_split_honours_sae_dtype_like_the_unsplit_load(tmp_path, ray_local, fmt):
    """`sae.dtype` through `open_split` (the harvest's entry point): own format (each part reads
    its slice) and OpenAI (loaded once, slices shipped). fp32 weights with bits below bf16's
    mantissa: the split encode equals `load_sae(dtype=...)`'s bit for bit, for bf16 and fp32,
    and the bf16 result differs from the fp32 one (so the dtype really reached the parts)."""
    from pipeline.sae.latent_split import open_split

    g = torch.Generator().manual_seed(11)
    n, k = 300, 16
    if fmt == "own":
        sae = random_sae(D, n, k=k, seed=9)
        sae.W_enc = sae.W_enc + 1e-3 * torch.randn(n, D, generator=g)  # not bf16-representable
        sae.b_enc = 0.1 * torch.randn(n, generator=g)
        path = sae.save(tmp_path / "own")
    else:
        path = tmp_path / "8.pt"
        torch.save({"pre_bias": 0.1 * torch.randn(D, generator=g), "encoder.weight": torch.randn(n, D, generator=g),
                    "latent_bias": 0.1 * torch.randn(n, generator=g), "decoder.weight": torch.randn(D, n, generator=g),
                    "activation": "TopK", "activation_state_dict": {"k": k, "postact_fn": "ReLU"}}, path)
    x = inputs("float", n=64)
    results = {}
    for dtype in ("bfloat16", "float32", "auto"):
        want = load_sae(path, dtype=dtype, with_decoder=False).encode(x)
        split = open_split(str(path), None, 3, with_decoder=False, dtype=dtype, num_cpus=CPUS, ready_timeout_s=60)
        try:
            assert {p["dtype"] for p in split.part_info()} == {"torch.float32" if dtype != "bfloat16" else "torch.bfloat16"}
            got = split.encode(x)
        finally:
            split.close()
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), dtype
        results[dtype] = got
    assert not torch.equal(results["bfloat16"][0], results["float32"][0])

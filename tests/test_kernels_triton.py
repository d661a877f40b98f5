"""Triton kernels (fused top-k encode, sparse decode) against the plain-torch references.

Runs on CPU through the Triton interpreter. `@triton.jit` decides interpreter-or-GPU when a
kernel module is *imported*, so TRITON_INTERPRET=1 is set before anything imports triton or
the kernel modules. If another test module imported them first (so they were built for the
GPU), the in-process tests skip and `test_in_subprocess` reruns this file in a fresh
interpreter-mode process instead. (Conversely, once this module has run in a process, the
kernel modules in sys.modules are interpreter builds: GPU tests belong in their own process.)

Exactness: with small-integer inputs every dot product is exact in fp32 whatever the
summation order, so ids *and* values must equal the reference bit for bit, ties (plentiful
with integers, including ties straddling the k-th place) included. Random inputs are checked
to tolerance, with ids exact wherever the reference values are not near-ties.

The interpreter never runs GPU code generation, so one test compiles the real sm_90 path
(TMA loads, wgmma) in a subprocess with the ptxas that ships with triton; no GPU needed.
"""
from __future__ import annotations

import os

_PREVIOUS_INTERPRET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"  # before triton / kernel modules are imported

import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import sae_harvest_kernels
from sae_harvest_kernels.binmax import _binmax_kernel, _rescore_kernel, bin_maxima, topk_encode_binmax
from sae_harvest_kernels.gemm_filter import _filter_kernel, topk_encode_gemm_filter
from sae_harvest_kernels.reference import preactivations, sparse_decode_reference, topk_encode_reference
from sae_harvest_kernels.sparse_decode_triton import _sparse_decode_kernel, sparse_decode_triton
from sae_harvest_kernels.streaming import topk_encode_streaming
from sae_harvest_kernels.topk_encode_triton import _encode_tiles_kernel, _merge_kernel, topk_encode_triton

# The kernels are built now; don't leak interpreter mode into modules collected after this
# one (the autouse fixture below sets it again while these tests run).
if _PREVIOUS_INTERPRET is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _PREVIOUS_INTERPRET


def _built_for_interpreter() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    kernels_ = (_encode_tiles_kernel.fn, _merge_kernel, _sparse_decode_kernel, _binmax_kernel, _rescore_kernel,
                _filter_kernel)
    return all(isinstance(fn, InterpretedFunction) for fn in kernels_)


IN_PROCESS = _built_for_interpreter()
interpreted = pytest.mark.skipif(not IN_PROCESS, reason="kernels built for GPU earlier; see test_in_subprocess")


@pytest.fixture(autouse=True)
def _one_thread_and_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # sae_harvest_kernels.resolve_backend reads it per call
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(IN_PROCESS, reason="interpreter kernels are active in this process")
def test_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        check=False, env=env, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "test_in_subprocess" not in proc.stdout


# ----------------------------------------------------------------------------- helpers


def _ints(shape, low, high, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, shape, generator=g).to(dtype)


def _has_straddling_tie(x, w, b, k) -> bool:
    ordered = torch.sort(preactivations(x, w, b), dim=1, descending=True).values
    return k < ordered.shape[1] and bool((ordered[:, k - 1] == ordered[:, k]).any())


def _assert_close_ids_exact_off_ties(values, ids, x, w, b, k, tol):
    """Values to tolerance; every returned id really has its value; ids exact off near-ties."""
    pre = preactivations(x, w, b)
    ref_values, ref_ids = topk_encode_reference(x, w, b, k)
    assert values.dtype == torch.float32 and ids.dtype == torch.int32
    assert values.shape == ids.shape == (x.shape[0], k)
    torch.testing.assert_close(values, ref_values, atol=tol, rtol=tol)
    torch.testing.assert_close(pre.gather(1, ids.long()), values, atol=tol, rtol=tol)
    assert all(len(set(row)) == k for row in ids.tolist()), "duplicate ids in a row"
    # An id is unambiguous where its reference value is > tol away from both neighbours
    # (including the best value left out, at place k+1).
    ordered = torch.sort(pre, dim=1, descending=True).values
    padded = torch.cat([ordered[:, :1] + 1e9, ordered[:, : k + 1], ordered[:, -1:] - 1e9], dim=1)
    gap_up = padded[:, : k] - padded[:, 1 : k + 1]
    gap_down = padded[:, 1 : k + 1] - padded[:, 2 : k + 2]
    clear = (gap_up > tol) & (gap_down > tol)
    assert clear.float().mean() > 0.5, "test data has too many near-ties to check ids"
    assert torch.equal(ids[clear], ref_ids[clear])


# ----------------------------------------------------------------------------- encode: exact


EXACT_CASES = [
    # N, d, L, k, bias, split_len, scan_max
    (1, 64, 40, 1, True, None, 8),  # single token, single tile
    (7, 64, 100, 3, False, None, 8),  # L not a multiple of the tile
    (37, 80, 600, 7, True, 256, 8),  # ragged N, d not a multiple of BLOCK_D, 3 splits
    (33, 64, 300, 16, True, 256, 0),  # every merge bitonic
    (33, 64, 300, 16, True, 256, 10**6),  # every merge by insertion
    (12, 64, 200, 100, False, None, 8),  # k not a power of two, large
    (5, 64, 70, 70, True, None, 8),  # k == L
    (9, 96, 300, 256, True, None, 8),  # k = 256
    (20, 130, 513, 33, True, 128, 4),  # ragged everything, 5 splits (split < 256)
    (20, 64, 350, 5, True, 100, 8),  # splits end inside a latent tile
]


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, d, n_latents, k, with_bias, split_len, scan_max", EXACT_CASES)
def test_encode_exact_integer_inputs(n, d, n_latents, k, with_bias, split_len, scan_max, dtype):
    seed = n * 1000 + n_latents + k
    x = _ints((n, d), -3, 4, dtype, seed)
    w = _ints((n_latents, d), -2, 3, dtype, seed + 1)
    b = _ints((n_latents,), -6, 7, dtype, seed + 2) if with_bias else None
    values, ids = topk_encode_triton(x, w, b, k, split_len=split_len, scan_max=scan_max)
    ref_values, ref_ids = topk_encode_reference(x, w, b, k)
    assert values.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(values, ref_values)
    assert torch.equal(ids, ref_ids)


@interpreted
def test_integer_cases_really_have_straddling_ties():
    # Guards the test above: its data must exercise the tie rule at the k-th place.
    n, d, n_latents, k = 37, 80, 600, 7
    x = _ints((n, d), -3, 4, torch.float32, 0)
    w = _ints((n_latents, d), -2, 3, torch.float32, 1)
    assert _has_straddling_tie(x, w, None, k)
    values, ids = topk_encode_triton(x, w, None, k, split_len=256)
    ref_values, ref_ids = topk_encode_reference(x, w, None, k)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tma_and_pointer_loads_agree(dtype):
    # d=64 is TMA-aligned, so the default path uses descriptors; force the pointer path too.
    x = _ints((40, 64), -3, 4, dtype, 31)
    w = _ints((333, 64), -2, 3, dtype, 32)
    b = _ints((333,), -5, 6, dtype, 33)
    ref_values, ref_ids = topk_encode_reference(x, w, b, 12)
    for use_tma in (True, False):
        values, ids = topk_encode_triton(x, w, b, 12, split_len=128, use_tma=use_tma)
        assert torch.equal(values, ref_values), use_tma
        assert torch.equal(ids, ref_ids), use_tma


@interpreted
def test_encode_special_values_order():
    # Bias-only pre-activations covering the float -> int64 key map: infinities, extremes,
    # subnormals, signed zeros, negatives, repeated values (ties across splits).
    specials = torch.tensor(
        [float("-inf"), -3.0e38, -2.5, -1.0e-45, -0.0, 0.0, 1.0e-45, 1.0e-38, 2.5, 3.0e38, float("inf")]
    )
    g = torch.Generator().manual_seed(3)
    n_latents = 300
    bias = specials[torch.randint(0, len(specials), (n_latents,), generator=g)]
    x = torch.zeros(4, 64)
    w = torch.zeros(n_latents, 64)
    for k in (1, 5, 64, 300):
        values, ids = topk_encode_triton(x, w, bias, k, split_len=128)
        ref_values, ref_ids = topk_encode_reference(x, w, bias, k)
        assert torch.equal(values, ref_values), k
        assert torch.equal(ids, ref_ids), k


# ----------------------------------------------------------------------------- encode: random


@interpreted
@pytest.mark.parametrize(
    "n, d, n_latents, k, dtype, tol",
    [
        (19, 64, 400, 8, torch.float32, 1e-5),
        (35, 100, 700, 24, torch.float32, 1e-5),
        (19, 64, 400, 8, torch.bfloat16, 1e-3),
        (10, 96, 300, 64, torch.float16, 1e-3),
    ],
)
def test_encode_random_inputs(n, d, n_latents, k, dtype, tol):
    g = torch.Generator().manual_seed(n + d + k)
    x = torch.randn(n, d, generator=g).to(dtype)
    w = (torch.randn(n_latents, d, generator=g) / d**0.5).to(dtype)
    b = (0.1 * torch.randn(n_latents, generator=g)).to(dtype)
    values, ids = topk_encode_triton(x, w, b, k, split_len=256)
    _assert_close_ids_exact_off_ties(values, ids, x, w, b, k, tol)


@interpreted
def test_encode_non_contiguous_and_mixed_dtypes():
    g = torch.Generator().manual_seed(7)
    big = torch.randint(-3, 4, (30, 150), generator=g).float()
    x = big[::2, 10:74]  # strided rows, offset columns
    w = torch.randint(-2, 3, (64, 200), generator=g).to(torch.bfloat16).T  # [200, 64], non-contiguous
    b = torch.randint(-4, 5, (200,), generator=g).to(torch.float16)
    values, ids = topk_encode_triton(x, w, b, 9)
    ref_values, ref_ids = topk_encode_reference(x, w, b, 9)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


# ----------------------------------------------------------------------------- encode: other paths


@interpreted
@pytest.mark.parametrize("k", [1, 6, 32])
def test_streaming_and_triton_agree(k):
    x = _ints((21, 64), -3, 4, torch.float32, k)
    w = _ints((450, 64), -2, 3, torch.float32, k + 1)
    b = _ints((450,), -5, 6, torch.float32, k + 2)
    stream_values, stream_ids = topk_encode_streaming(x, w, b, k, chunk=100)
    triton_values, triton_ids = topk_encode_triton(x, w, b, k, split_len=256)
    assert torch.equal(stream_values, triton_values)
    assert torch.equal(stream_ids, triton_ids)


@interpreted
def test_public_dispatch_to_triton():
    x = _ints((9, 64), -3, 4, torch.float32, 11)
    w = _ints((130, 64), -2, 3, torch.float32, 12)
    b = _ints((130,), -5, 6, torch.float32, 13)
    triton_values, triton_ids = sae_harvest_kernels.topk_encode(x, w, b, 10, backend="triton")
    torch_values, torch_ids = sae_harvest_kernels.topk_encode(x, w, b, 10, backend="torch")
    assert torch.equal(triton_values, torch_values) and torch.equal(triton_ids, torch_ids)
    values = torch.randn(9, 10)
    out = sae_harvest_kernels.sparse_decode(values, triton_ids, w, backend="triton")
    torch.testing.assert_close(out, sparse_decode_reference(values, triton_ids, w), atol=1e-5, rtol=1e-5)


def test_encode_rejects_bad_arguments():
    x, w = torch.zeros(2, 64), torch.zeros(10, 64)
    with pytest.raises(ValueError):
        topk_encode_triton(x, w, None, 0)
    with pytest.raises(ValueError):
        topk_encode_triton(x, w, None, 11)
    with pytest.raises(ValueError):
        topk_encode_triton(x, torch.zeros(10, 32), None, 2)
    with pytest.raises(ValueError):
        topk_encode_triton(x, w, torch.zeros(9), 2)


@interpreted
def test_encode_large_k_falls_back_exactly_and_empty_input():
    x = _ints((3, 64), -3, 4, torch.float32, 21)
    w = _ints((400, 64), -2, 3, torch.float32, 22)
    values, ids = topk_encode_triton(x, w, None, 300)  # k > MAX_K: streaming path
    ref_values, ref_ids = topk_encode_reference(x, w, None, 300)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)
    values, ids = topk_encode_triton(x[:0], w, None, 4)
    assert values.shape == ids.shape == (0, 4)


# ----------------------------------------------------------------------------- sparse decode


@interpreted
@pytest.mark.parametrize(
    "n, k, n_latents, d, values_dtype, ids_dtype, dec_dtype",
    [
        (1, 1, 10, 64, torch.float32, torch.int32, torch.float32),
        (33, 5, 100, 70, torch.float32, torch.int32, torch.float32),
        (17, 32, 500, 300, torch.float16, torch.int64, torch.bfloat16),
        (8, 7, 50, 513, torch.bfloat16, torch.int32, torch.float16),
    ],
)
def test_sparse_decode_matches_reference(n, k, n_latents, d, values_dtype, ids_dtype, dec_dtype):
    g = torch.Generator().manual_seed(n * k + d)
    values = torch.randn(n, k, generator=g).to(values_dtype)
    ids = torch.randint(0, n_latents, (n, k), generator=g).to(ids_dtype)
    w_dec = torch.randn(n_latents, d, generator=g).to(dec_dtype)
    out = sparse_decode_triton(values, ids, w_dec)
    assert out.dtype == torch.float32 and out.shape == (n, d)
    torch.testing.assert_close(out, sparse_decode_reference(values, ids, w_dec), atol=1e-4, rtol=1e-4)


@interpreted
def test_sparse_decode_repeated_ids_and_non_contiguous():
    g = torch.Generator().manual_seed(5)
    values = torch.randn(6, 8, generator=g).T.contiguous().T  # non-contiguous view
    ids = torch.full((6, 8), 3, dtype=torch.int32)  # same latent k times: must add up
    w_dec = torch.randn(80, 40, generator=g)[:, :20]  # row stride 40
    out = sparse_decode_triton(values, ids, w_dec)
    torch.testing.assert_close(out, sparse_decode_reference(values, ids, w_dec), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- binmax / gemm_filter backends
#
# Both are exact by construction (candidate bounds + int64 order keys); on small-integer inputs
# every dot is exact, so values and ids must equal the float reference bit for bit. Shapes are
# small (interpreter), with tiny bins / chunks so ties straddle bins, chunks and the k-th place.

NEW_BACKENDS = {
    "binmax": topk_encode_binmax,
    "gemm_filter": lambda x, w, b, k, **kw: topk_encode_gemm_filter(x, w, b, k, chunk=kw.pop("chunk", 96), **kw),
}

BACKEND_CASES = [
    # N, d, L, k, bias
    (1, 32, 40, 1, True),  # one row, two bins
    (7, 64, 100, 3, False),  # ragged last bin / chunk
    (37, 80, 600, 7, True),  # ragged N and d, 19 bins
    (20, 48, 513, 16, True),  # ragged everything
    (9, 32, 300, 40, False),  # k > number of bins (10): every entry is a candidate
]


def _stable_sort_reference(x, w, b, k):
    """Float64 stable sort: the independent definition the GPU check uses too."""
    pre = x.double() @ w.double().T
    if b is not None:
        pre = pre + b.double()
    values, ids = torch.sort(pre, dim=1, descending=True, stable=True)
    return values[:, :k].float(), ids[:, :k].to(torch.int32)


@interpreted
@pytest.mark.parametrize("backend", sorted(NEW_BACKENDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, d, n_latents, k, with_bias", BACKEND_CASES)
def test_backend_exact_integer_inputs(backend, n, d, n_latents, k, with_bias, dtype):
    seed = n * 1000 + n_latents + k
    x = _ints((n, d), -3, 4, dtype, seed)
    w = _ints((n_latents, d), -2, 3, dtype, seed + 1)
    b = _ints((n_latents,), -6, 7, torch.float32, seed + 2) if with_bias else None
    values, ids = NEW_BACKENDS[backend](x, w, b, k)
    ref_values, ref_ids = _stable_sort_reference(x, w, b, k)
    assert values.dtype == torch.float32 and ids.dtype == torch.int32
    assert torch.equal(values, ref_values)
    assert torch.equal(ids, ref_ids)


@interpreted
@pytest.mark.parametrize("backend", sorted(NEW_BACKENDS))
def test_backend_ties_at_kth_place_across_bins(backend):
    # Bias-only pre-activations from a few values: the k-th value repeats in many bins and
    # chunks, and the lower ids must win. Also the special floats of the key map.
    specials = torch.tensor([float("-inf"), -3.0e38, -2.5, -1.0e-45, -0.0, 0.0, 1.0e-45, 2.5, 3.0e38, float("inf")])
    g = torch.Generator().manual_seed(9)
    n_latents = 320
    bias = specials[torch.randint(0, len(specials), (n_latents,), generator=g)]
    x, w = torch.zeros(3, 32), torch.zeros(n_latents, 32)
    for k in (1, 5, 33, 64):
        ref_values, ref_ids = topk_encode_reference(x, w, bias, k)
        assert _has_straddling_tie(x, w, bias, k)
        values, ids = NEW_BACKENDS[backend](x, w, bias, k)
        assert torch.equal(values, ref_values), k
        assert torch.equal(ids, ref_ids), k


@interpreted
@pytest.mark.parametrize("use_tma", [True, False])
@pytest.mark.parametrize("num_programs", [1, 2, 5])
def test_persistent_mainloop_bin_maxima(use_tma, num_programs):
    # Every program count walks the same tiles (stride = grid size); maxima are per bin of BLOCK_L.
    x = _ints((37, 64), -3, 4, torch.bfloat16, 41)
    w = _ints((300, 64), -2, 3, torch.bfloat16, 42)
    b = _ints((300,), -5, 6, torch.float32, 43)
    maxima = bin_maxima(x, w, b, use_tma=use_tma, num_programs=num_programs)
    pre = preactivations(x, w, b)
    block_l = 32  # sae_harvest_kernels.binmax.INTERPRET_CONFIG
    padded = torch.full((37, maxima.shape[0] * block_l), float("-inf"))
    padded[:, :300] = pre
    assert torch.equal(maxima, padded.view(37, -1, block_l).amax(dim=2).T)


@interpreted
def test_binmax_rows_that_explode_or_overflow_go_to_fallback():
    x = _ints((24, 64), -3, 4, torch.float32, 51)
    x[3] = 0  # all-zero row, no bias: every bin max ties at 0 -> exploded
    w = _ints((640, 64), -2, 3, torch.float32, 52)
    stats = {}
    values, ids = topk_encode_binmax(x, w, None, 6, stats=stats)
    ref_values, ref_ids = topk_encode_reference(x, w, None, 6)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)
    assert stats["exploded_rows"] >= 1 and stats["fallback_rows"] < 24
    stats = {}
    values, ids = topk_encode_binmax(x, w, None, 6, max_candidates=6, stats=stats)  # tiny lists overflow
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)
    assert stats["overflow_rows"] >= 1


def _corrupt_row(row, k):
    """Stored maxima of `row`: the k bins with the lowest true maxima become the top k. The
    rescoring then sees maxima that differ from the stored ones (and no entry >= tau)."""
    def corrupt(maxima):
        lowest = torch.argsort(maxima[:, row], stable=True)[:k]
        maxima[:, row] = -1.0e6
        maxima[lowest, row] = 1.0e6
    return corrupt


@interpreted
def test_binmax_runtime_check_catches_mismatch_and_falls_back():
    x = _ints((10, 64), -3, 4, torch.float32, 61)
    w = _ints((1024, 64), -2, 3, torch.float32, 62)  # 32 bins of 32
    b = _ints((1024,), -5, 6, torch.float32, 63)
    k, row = 4, 6
    ref_values, ref_ids = topk_encode_reference(x, w, b, k)
    stats = {}
    values, ids = topk_encode_binmax(x, w, b, k, stats=stats, _after_mainloop=_corrupt_row(row, k))
    assert stats["mismatch_rows"] == 1 and stats["fallback_rows"] == 1
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)
    # Without the check the corrupted row comes out wrong: the check is what saved it.
    values, ids = topk_encode_binmax(x, w, b, k, verify=False, _after_mainloop=_corrupt_row(row, k))
    assert not torch.equal(ids[row], ref_ids[row])
    others = torch.arange(10) != row
    assert torch.equal(ids[others], ref_ids[others])


@interpreted
def test_gemm_filter_overflow_rows_fall_back():
    x = _ints((30, 64), -3, 4, torch.float32, 71)
    w = _ints((900, 64), -2, 3, torch.float32, 72)
    b = _ints((900,), -5, 6, torch.float32, 73)
    ref_values, ref_ids = topk_encode_reference(x, w, b, 10)
    stats = {}
    values, ids = topk_encode_gemm_filter(x, w, b, 10, chunk=128, cap=4, stats=stats)
    assert stats["overflow_rows"] >= 1
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


@interpreted
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "fused", "binmax", "gemm_filter"])
def test_public_dispatch_every_backend(backend):
    x = _ints((9, 64), -3, 4, torch.bfloat16, 81)
    w = _ints((400, 64), -2, 3, torch.bfloat16, 82)
    b = _ints((400,), -5, 6, torch.float32, 83)
    values, ids = sae_harvest_kernels.topk_encode(x, w, b, 12, backend=backend)
    ref_values, ref_ids = _stable_sort_reference(x, w, b, 12)
    assert torch.equal(values, ref_values) and torch.equal(ids, ref_ids)


def test_auto_backend_table():
    from sae_harvest_kernels import tuning, tuning_table

    assert "unmeasured" in tuning_table.PROVENANCE and not tuning_table.ENTRIES
    assert sae_harvest_kernels.resolve_backend("auto", torch.device("cpu"), (768, 2**20, 32)) == "torch"
    assert tuning.pick_backend(768, 2**24, 32) == tuning_table.DEFAULT
    # A rendered table is valid Python and its nearest measured shape wins.
    text = tuning.render_table([(768, 2**20, 32, "binmax", 1e5), (4096, 2**22, 64, "gemm_filter", 2e4)],
                               "NVIDIA H100", "measured: test")
    namespace: dict = {}
    exec(text, namespace)
    assert namespace["CARD"] == "NVIDIA H100" and len(namespace["ENTRIES"]) == 2
    original = tuning_table.ENTRIES
    try:
        tuning_table.ENTRIES = namespace["ENTRIES"]
        assert tuning.pick_backend(768, 2**21, 64) == "binmax"
        assert tuning.pick_backend(2048, 2**22, 64) == "gemm_filter"
    finally:
        tuning_table.ENTRIES = original
    with pytest.raises(ValueError):
        sae_harvest_kernels.resolve_backend("cutlass", torch.device("cpu"))


@pytest.mark.parametrize("script", ["bench/encode_gpu.py", "bench/worker_gpu.py"])
def test_gpu_benches_help_and_skip_without_cuda(script):
    # They must import with torch/triton/transformers/pyarrow only, and exit 0 without a GPU.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = root
    for args in (["--help"], []):
        proc = subprocess.run([sys.executable, script, *args], cwd=root, env=env, capture_output=True, text=True,
                              timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("usage" in proc.stdout) if args else ("skipped" in proc.stdout)



# ----------------------------------------------------------------------------- GPU codegen, no GPU

_SM90_COMPILE = r"""
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import sae_harvest_kernels.binmax as bm
import sae_harvest_kernels.gemm_filter as gf
import sae_harvest_kernels.sparse_decode_triton as dec
import sae_harvest_kernels.topk_encode_triton as enc

target = GPUTarget("cuda", 90, 32)


def build(fn, types, constants, **options):
    signature = {name: types.get(name, "constexpr" if name in constants else "i32") for name in fn.arg_names}
    return triton.compile(ASTSource(fn, signature, constants), target=target, options=options)


encode_types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "cand_ptr": "*i64", "tile_ptr": "*fp32",
                "thr_ptr": "*i64"}
for use_tma in (True, False):
    kernel = build(enc._encode_tiles_kernel.fn, encode_types,
                   dict(HAS_BIAS=True, K_PAD=32, SCAN_MAX=8, DOT_FP32=False, INPUT_PRECISION="tf32",
                        MERGE_ROWS=16, USE_TMA=use_tma, BLOCK_N=128, BLOCK_L=128, BLOCK_D=64),
                   num_warps=8, num_stages=3)
    assert "warp_group_dot" in kernel.asm["ttgir"], "encode matmul is not on Hopper tensor cores"
# The persistent bin-max mainloop (flattened loop, TMA): wgmma with warps split along rows
# only, so the epilogue's row max never crosses warps. Then the rescoring and the filter.
for use_tma in (True, False):
    cfg = bm.GPU_CONFIG
    kernel = build(bm._binmax_kernel, {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "binmax_ptr": "*fp32"},
                   dict(HAS_BIAS=True, DOT_FP32=False, INPUT_PRECISION="tf32", USE_TMA=use_tma, FLATTEN=True,
                        NUM_PROGRAMS=132, BLOCK_N=cfg.block_n, BLOCK_L=cfg.block_l, BLOCK_D=cfg.block_d),
                   num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ttgir = kernel.asm["ttgir"]
    assert "warp_group_dot" in ttgir, "mainloop is not on Hopper tensor cores"
    assert "warpsPerCTA = [8, 1]" in ttgir, "mainloop tile is split across warps along latents"
    if use_tma:
        assert "async_tma_copy_global_to_local" in ttgir
rescore_types = {"x_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*fp32", "binmax_ptr": "*fp32", "tau_ptr": "*fp32",
                 "pair_rows_ptr": "*i32", "chunk_bin_ptr": "*i32", "chunk_start_ptr": "*i64", "chunk_len_ptr": "*i32",
                 "cand_ptr": "*i64", "count_ptr": "*i32", "bad_ptr": "*i8"}
kernel = build(bm._rescore_kernel, rescore_types,
               dict(HAS_BIAS=True, DOT_FP32=False, INPUT_PRECISION="tf32", BLOCK_N=cfg.block_n,
                    BLOCK_L=cfg.block_l, BLOCK_D=cfg.block_d), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
assert "warp_group_dot" in kernel.asm["ttgir"], "rescoring does not use the mainloop's dot"
build(gf._filter_kernel, {"s_ptr": "*fp32", "b_ptr": "*fp32", "thr_ptr": "*fp32", "cand_ptr": "*i64",
                          "count_ptr": "*i32"}, dict(HAS_BIAS=True, BLOCK_R=16, BLOCK_C=256), num_warps=4)
build(enc._merge_kernel, {"cand_ptr": "*i64", "val_ptr": "*fp32", "idx_ptr": "*i32"},
      dict(K_PAD=256, BLOCK_N=8), num_warps=8)
build(dec._sparse_decode_kernel, {"val_ptr": "*fp32", "idx_ptr": "*i32", "w_ptr": "*bf16", "out_ptr": "*fp32"},
      dict(BLOCK_N=16, BLOCK_D=256), num_warps=4)
print("compiled")
"""


def test_gpu_path_compiles_for_sm90():
    """The interpreter never sees GPU codegen: compile the real path for sm_90 (ptxas ships with triton)."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _SM90_COMPILE],
        check=False, cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-4000:]

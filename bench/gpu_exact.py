"""GPU exactness check: every encode backend against a float64 stable sort, at L >= 2^20.

    python3 bench/gpu_exact.py

Integer-valued bf16 inputs make every dot product exact in fp32 whatever the summation order,
so values and ids must equal the float64 reference bit for bit, ties at the k-th place
(plentiful with integers) included. One random-float case checks values to tolerance and
prints the binmax run-time check's counters: `mismatch_rows` > 0 would mean the rescoring's
dot did not reproduce the mainloop's bits on this GPU (results stay exact through the
fallback, but the fast path is then wasted). Exits 1 on any mismatch; 0 and one line without CUDA.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", p) for p in ("kernels", ".")]  # sae_harvest_kernels, no install

BACKENDS = ("fused", "binmax", "gemm_filter", "torch")
# N, d, L, k, bias
INTEGER_CASES = [
    (512, 128, 2**20 + 37, 7, True),
    (256, 768, 2**20, 32, False),
    (300, 64, 2**20 + 5, 64, True),
    (128, 256, 2**20, 256, True),
]


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, k: int, rows: int = 64):
    """Float64 stable sort, a few rows at a time (an N x L float64 block would not fit)."""
    wd = w.double()
    values, ids = [], []
    for start in range(0, x.shape[0], rows):
        pre = x[start:start + rows].double() @ wd.T
        if b is not None:
            pre += b.double()
        v, i = torch.sort(pre, dim=1, descending=True, stable=True)
        values.append(v[:, :k].float())
        ids.append(i[:, :k].int())
    return torch.cat(values), torch.cat(ids)


def run_backend(name: str, x, w, b, k, stats: dict):
    import sae_harvest_kernels
    from sae_harvest_kernels.binmax import topk_encode_binmax
    from sae_harvest_kernels.gemm_filter import topk_encode_gemm_filter

    if name == "binmax":
        return topk_encode_binmax(x, w, b, k, stats=stats)
    if name == "gemm_filter":
        return topk_encode_gemm_filter(x, w, b, k, stats=stats)
    return sae_harvest_kernels.topk_encode(x, w, b, k, backend=name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU exactness check skipped")
        return 0
    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}")
    failures = 0
    for n, d, n_latents, k, with_bias in INTEGER_CASES:
        g = torch.Generator(device=dev).manual_seed(n + d + k)
        x = torch.randint(-3, 4, (n, d), device=dev, generator=g).to(torch.bfloat16)
        w = torch.randint(-2, 3, (n_latents, d), device=dev, generator=g).to(torch.bfloat16)
        b = torch.randint(-6, 7, (n_latents,), device=dev, generator=g).float() if with_bias else None
        ref_v, ref_i = reference(x, w, b, k + 1)
        ties = int((ref_v[:, k - 1] == ref_v[:, k]).sum())  # the k-th place is a tie the lower id must win
        ref_v, ref_i = ref_v[:, :k].contiguous(), ref_i[:, :k].contiguous()
        for name in args.backends.split(","):
            stats: dict = {}
            t0 = time.perf_counter()
            v, i = run_backend(name, x, w, b, k, stats)
            torch.cuda.synchronize()
            ok = torch.equal(v, ref_v) and torch.equal(i, ref_i)
            failures += not ok
            print(f"integer N={n} d={d} L={n_latents} k={k} bias={with_bias} {name:>11}: "
                  f"{'exact' if ok else 'MISMATCH'} ({time.perf_counter() - t0:.1f} s incl. compile) {stats or ''}",
                  flush=True)
        print(f"  (rows whose k-th and (k+1)-th values tie: {ties} of {n})")
        del x, w, b
    # Random floats: values to tolerance vs float64; the binmax check counters are the point.
    n, d, n_latents, k = 1024, 768, 2**20, 64
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(n, d, device=dev, generator=g).to(torch.bfloat16)
    w = (torch.randn(n_latents, d, device=dev, generator=g) / d**0.5).to(torch.bfloat16)
    b = 0.1 * torch.randn(n_latents, device=dev, generator=g)
    ref_v, _ = reference(x, w, b, k)
    for name in args.backends.split(","):
        stats = {}
        v, _ = run_backend(name, x, w, b, k, stats)
        ok = torch.allclose(v, ref_v, rtol=1e-3, atol=1e-3)
        failures += not ok
        print(f"random N={n} d={d} L={n_latents} k={k} {name:>11}: values {'ok' if ok else 'MISMATCH'} {stats or ''}",
              flush=True)
    print("EXACTNESS: " + ("all backends exact" if failures == 0 else f"{failures} FAILURES"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

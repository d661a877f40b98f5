"""GPU encode benchmark: every top-k backend vs the bare cuBLAS matmul vs a chunked torch loop.

    python3 bench/encode_gpu.py --quick                 # the issue-12 target shapes, N=4096
    python3 bench/encode_gpu.py                         # a wider grid (skips shapes that don't fit)
    python3 bench/encode_gpu.py --mainloop-only         # gate: persistent mainloop vs cuBLAS
    python3 bench/encode_gpu.py --quick --write-table kernels/sae_harvest_kernels/tuning_table.py

For every (d, L, k, N) it times, on the same bf16 x [N, d], weight [L, d] and fp32 bias:
- fused / binmax / gemm_filter: the exact top-k backends of `sae_harvest_kernels` (no N x L matrix);
- matmul:  torch.mm over the same N x L in latent chunks into a reused bf16 buffer, matmul
           only (the ceiling: every backend does this work plus the selection);
- chunked: the usual torch loop, addmm + torch.topk per chunk, then a top-k merge.
It prints the card, tokens/s, each backend's ratio to matmul and to chunked, and peak GPU
memory above the resident inputs. Targets (docs/DESIGN.md, issue 12) are marked on their rows.
`--mainloop-only` times `sae_harvest_kernels.binmax.bin_maxima` (the persistent GEMM with a row-max
epilogue, i.e. the mainloop with a trivial epilogue) against cuBLAS; gate >= 0.9x at
N=4096, d=768, L=2^20. Without a CUDA device it prints one line ("skipped") and exits 0.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys

import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", p) for p in ("kernels", ".")]  # sae_harvest_kernels, no install

CHUNK_BYTES = 2 * 2**30  # N x chunk bf16 buffer for the matmul / chunked baselines
BACKENDS = ("fused", "binmax", "gemm_filter")
GATE = 0.9
# (d, L, k) -> minimum backend/matmul ratio, from issue 12 (N=4096)
TARGETS = {(768, 2**24, 32): 0.85, (768, 2**24, 256): 0.75, (2048, 2**22, 64): 0.9, (4096, 2**22, 64): 0.9}
QUICK_SHAPES = [(768, 2**20, 32), (768, 2**24, 32), (768, 2**24, 256), (2048, 2**22, 64), (4096, 2**22, 64)]


def _chunk_len(n_rows: int, n_latents: int) -> int:
    return max(1024, min(n_latents, CHUNK_BYTES // (2 * n_rows)))


def matmul_only(x: torch.Tensor, w: torch.Tensor) -> None:
    chunk = _chunk_len(x.shape[0], w.shape[0])
    buf = torch.empty(x.shape[0], chunk, dtype=x.dtype, device=x.device)
    for start in range(0, w.shape[0], chunk):
        stop = min(start + chunk, w.shape[0])
        torch.mm(x, w[start:stop].T, out=buf[:, : stop - start])


def chunked_topk(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = _chunk_len(x.shape[0], w.shape[0])
    best_v = best_i = None
    for start in range(0, w.shape[0], chunk):
        stop = min(start + chunk, w.shape[0])
        pre = torch.addmm(b[start:stop].to(x.dtype), x, w[start:stop].T)
        v, i = torch.topk(pre, min(k, stop - start), dim=1)
        v, i = v.float(), i + start
        if best_v is not None:
            v, i = torch.cat([best_v, v], 1), torch.cat([best_i, i], 1)
            v, order = torch.topk(v, k, dim=1)
            i = i.gather(1, order)
        best_v, best_i = v, i
    return best_v, best_i.int()


def backend_fn(name: str, x, w, b, k):
    if name == "fused":
        from sae_harvest_kernels.topk_encode_triton import topk_encode_triton

        return functools.partial(topk_encode_triton, x, w, b, k)
    if name == "binmax":
        from sae_harvest_kernels.binmax import topk_encode_binmax

        return functools.partial(topk_encode_binmax, x, w, b, k)
    from sae_harvest_kernels.gemm_filter import topk_encode_gemm_filter

    return functools.partial(topk_encode_gemm_filter, x, w, b, k)


def measure(fn, dev, rep: int) -> tuple[float, float]:
    """(ms per call, peak MB allocated above what was allocated before the call)."""
    import triton.testing

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    return triton.testing.do_bench(fn, warmup=25, rep=rep), peak


def inputs(dev, n_rows: int, d: int, n_latents: int, seed: int = 0):
    g = torch.Generator(device=dev).manual_seed(seed)
    w = torch.empty(n_latents, d, dtype=torch.bfloat16, device=dev)
    for start in range(0, n_latents, 2**20):  # fill in slices: no fp32 copy of a 16M x d weight
        stop = min(start + 2**20, n_latents)
        w[start:stop] = (torch.randn(stop - start, d, device=dev, generator=g) / d**0.5).to(torch.bfloat16)
    b = 0.1 * torch.randn(n_latents, device=dev, generator=g)
    x = torch.randn(n_rows, d, device=dev, generator=g).to(torch.bfloat16)
    return x, w, b


def fits(dev, d: int, n_latents: int) -> bool:
    free, _ = torch.cuda.mem_get_info(dev)
    need = n_latents * d * 2 + n_latents * 4 + 3 * CHUNK_BYTES
    if need > 0.9 * free:
        print(f"d={d} L=2^{n_latents.bit_length() - 1} skipped: needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
        return False
    return True


def mainloop_gate(args, dev) -> int:
    from sae_harvest_kernels.binmax import GPU_CONFIG, GPU_CONFIG_128, bin_maxima

    n_rows, d, n_latents = args.n, args.d, args.L
    x, w, _ = inputs(dev, n_rows, d, n_latents)
    flops = 2.0 * n_rows * n_latents * d
    ms_mm, _ = measure(functools.partial(matmul_only, x, w), dev, args.rep)
    print(f"device: {torch.cuda.get_device_name(dev)}; N={n_rows} d={d} L=2^{n_latents.bit_length() - 1}")
    print(f"cuBLAS matmul-only: {ms_mm:.2f} ms ({flops / ms_mm / 1e9:.0f} TFLOP/s)")
    best = 0.0
    for config in (GPU_CONFIG, GPU_CONFIG_128):
        for use_tma in (True, False):
            fn = functools.partial(bin_maxima, x, w, None, config, use_tma)
            ms, peak = measure(fn, dev, args.rep)
            ratio = ms_mm / ms
            best = max(best, ratio)
            print(f"mainloop {config.block_n}x{config.block_l}x{config.block_d} w{config.num_warps} "
                  f"s{config.num_stages} tma={use_tma}: {ms:.2f} ms ({flops / ms / 1e9:.0f} TFLOP/s), "
                  f"{ratio:.3f}x cuBLAS, peak extra {peak:.0f} MB", flush=True)
    print(f"MAINLOOP GATE (>= {GATE}x cuBLAS): best {best:.3f}x -> {'PASS' if best >= GATE else 'FAIL'}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the issue-12 target shapes at N=4096")
    parser.add_argument("--mainloop-only", action="store_true", help="persistent mainloop vs cuBLAS (the gate)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated subset of " + ",".join(BACKENDS))
    parser.add_argument("--rep", type=int, default=100, help="ms of timed repetitions per measurement")
    parser.add_argument("--n", type=int, default=4096, help="tokens (mainloop gate)")
    parser.add_argument("--d", type=int, default=768, help="model dim (mainloop gate)")
    parser.add_argument("--L", type=int, default=2**20, help="latents (mainloop gate)")
    parser.add_argument("--write-table", metavar="PATH", help="write the fastest backend per shape as kernels/sae_harvest_kernels/tuning_table.py")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: GPU encode benchmark skipped (run it on an H100-class GPU)")
        return 0
    dev = torch.device("cuda")
    if args.mainloop_only:
        return mainloop_gate(args, dev)

    if args.quick:
        shapes, ns = QUICK_SHAPES, [4096]
    else:
        shapes = [(d, n, k) for d in (576, 768, 2048, 4096) for n in (2**20, 2**22, 2**24) for k in (32, 64, 256)]
        ns = [1024, 4096]
    names = args.backends.split(",")
    card = torch.cuda.get_device_name(dev)
    print(f"device: {card}")
    header = (f"{'d':>5} {'L':>5} {'k':>4} {'N':>5} | {'backend':>11} {'tok/s':>9} {'x matmul':>8} {'x chunked':>9} "
              f"{'peak MB':>8} | check")
    winners = []
    by_shape: dict = {}
    for d, n_latents, k in shapes:
        by_shape.setdefault((d, n_latents), []).append(k)
    for (d, n_latents), ks in by_shape.items():
        if not fits(dev, d, n_latents):
            continue
        for n_rows in ns:
            x, w, b = inputs(dev, n_rows, d, n_latents)
            ms_mm, peak_mm = measure(functools.partial(matmul_only, x, w), dev, args.rep)
            for k in ks:
                print(header)
                ms_chk, peak_chk = measure(functools.partial(chunked_topk, x, w, b, k), dev, args.rep)
                ref_v, _ = chunked_topk(x, w, b, k)
                tag = f"{d:>5} 2^{n_latents.bit_length() - 1:<3} {k:>4} {n_rows:>5} |"
                print(f"{tag} {'matmul':>11} {n_rows / ms_mm * 1e3:>9.4g} {1.0:>8.2f} {ms_chk / ms_mm:>9.2f} {peak_mm:>8.0f} |")
                print(f"{tag} {'chunked':>11} {n_rows / ms_chk * 1e3:>9.4g} {ms_mm / ms_chk:>8.2f} {1.0:>9.2f} {peak_chk:>8.0f} |")
                results = {}
                for name in names:
                    fn = backend_fn(name, x, w, b, k)
                    v, _ = fn()  # compiles (and autotunes, fused) once
                    ok = torch.allclose(v, ref_v, rtol=2e-2, atol=2e-2)
                    ms, peak = measure(fn, dev, args.rep)
                    results[name] = ms if ok else float("inf")
                    ratio = ms_mm / ms
                    line = (f"{tag} {name:>11} {n_rows / ms * 1e3:>9.4g} {ratio:>8.2f} {ms_chk / ms:>9.2f} {peak:>8.0f} | "
                            f"{'ok' if ok else 'MISMATCH'}")
                    target = TARGETS.get((d, n_latents, k)) if n_rows == 4096 else None
                    if target is not None:
                        line += f"  target >= {target}x matmul: {'MET' if ratio >= target else 'MISSED'}"
                    print(line, flush=True)
                best = min(results, key=results.get)
                if results[best] < float("inf"):
                    winners.append((d, n_latents, k, best, n_rows / results[best] * 1e3))
                    if args.write_table:  # after every shape: a stage timeout keeps what was measured
                        write_table(args.write_table, winners, card, args.quick)
            del x, w, b
            torch.cuda.empty_cache()
    if args.write_table:
        print(f"wrote {args.write_table} ({len(winners)} shapes)")
    return 0


def write_table(path: str, winners: list, card: str, quick: bool) -> None:
    from sae_harvest_kernels.tuning import render_table

    today = datetime.date.today().isoformat()
    provenance = f"measured: bench/encode_gpu.py {'--quick ' if quick else ''}on {card}, {today}"
    with open(path, "w") as f:
        f.write(render_table(winners, card, provenance))


if __name__ == "__main__":
    sys.exit(main())

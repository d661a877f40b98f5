"""GPU encode benchmark: fused Triton top-k vs bare bf16 matmul vs chunked mm + topk loop.

    python bench/encode_gpu.py            # full grid (skips shapes whose weights don't fit)
    python bench/encode_gpu.py --quick    # d=768, L in {2^20, 2^24}, k in {32, 256}, N=4096

For every (d, L, k, N) it times, on the same bf16 x [N, d] and weight [L, d]:
- fused:   kernels.topk_encode_triton.topk_encode_triton (matmul + bias + exact top-k, no N x L);
- matmul:  torch.mm over the same N x L in latent chunks into a reused buffer, matmul only
           (the ceiling: the fused kernel does this work plus the selection);
- chunked: the usual torch loop, addmm + torch.topk per chunk, then a top-k merge.
It prints tokens/s, fused/matmul and fused/chunked ratios, and peak memory above the
resident weights. Targets (docs/DESIGN.md) are printed next to d=768, L=2^24 rows:
fused >= 0.85x matmul and >= 3.5x chunked. Without a CUDA device it prints one line and exits 0.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

TARGET_MATMUL = 0.85
TARGET_CHUNKED = 3.5
CHUNK_BYTES = 2 * 2**30  # N x chunk bf16 buffer for the matmul / chunked baselines


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small subset including the target shape")
    parser.add_argument("--rep", type=int, default=200, help="ms of timed repetitions per measurement")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        print("no CUDA device: GPU encode benchmark skipped (run it on an H100-class GPU)")
        return 0

    import triton.testing

    from kernels.topk_encode_triton import topk_encode_triton

    if args.quick:
        ds, ls, ks, ns = [768], [2**20, 2**24], [32, 256], [4096]
    else:
        ds, ls, ks, ns = [576, 768, 2048, 4096], [2**17, 2**20, 2**24], [32, 128, 256], [1024, 4096]

    dev = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name(dev)}; targets at d=768, L=2^24: "
          f"fused >= {TARGET_MATMUL}x matmul, >= {TARGET_CHUNKED}x chunked")
    header = (f"{'d':>5} {'L':>6} {'k':>4} {'N':>5} | {'fused tok/s':>12} {'matmul tok/s':>12} "
              f"{'chunked tok/s':>13} | {'f/mm':>5} {'f/chk':>6} | {'peak MB f/mm/chk':>20} | check")
    print(header)
    print("-" * len(header))
    for d in ds:
        for n_latents in ls:
            free, _ = torch.cuda.mem_get_info(dev)
            need = n_latents * d * 2 + n_latents * 4 + 3 * CHUNK_BYTES
            if need > 0.9 * free:
                print(f"{d:>5} 2^{n_latents.bit_length() - 1:<4} skipped: weights need {need / 2**30:.0f} GiB, "
                      f"{free / 2**30:.0f} GiB free")
                continue
            g = torch.Generator(device=dev).manual_seed(0)
            w = (torch.randn(n_latents, d, device=dev, generator=g) / d**0.5).to(torch.bfloat16)
            b = 0.1 * torch.randn(n_latents, device=dev, generator=g)
            for n_rows in ns:
                x = torch.randn(n_rows, d, device=dev, generator=g).to(torch.bfloat16)
                for k in ks:
                    runs = {
                        "fused": functools.partial(topk_encode_triton, x, w, b, k),
                        "matmul": functools.partial(matmul_only, x, w),
                        "chunked": functools.partial(chunked_topk, x, w, b, k),
                    }
                    fused_v, _ = runs["fused"]()  # autotunes once per (d, L, k)
                    chunk_v, _ = runs["chunked"]()
                    ok = torch.allclose(fused_v, chunk_v, rtol=2e-2, atol=2e-2)
                    ms, peak = {}, {}
                    for name, fn in runs.items():
                        torch.cuda.synchronize()
                        base = torch.cuda.memory_allocated(dev)
                        torch.cuda.reset_peak_memory_stats(dev)
                        fn()
                        torch.cuda.synchronize()
                        peak[name] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
                        ms[name] = triton.testing.do_bench(fn, warmup=25, rep=args.rep)
                    tps = {name: n_rows / (t / 1e3) for name, t in ms.items()}
                    r_mm, r_chk = ms["matmul"] / ms["fused"], ms["chunked"] / ms["fused"]
                    line = (f"{d:>5} 2^{n_latents.bit_length() - 1:<4} {k:>4} {n_rows:>5} | {tps['fused']:>12.3g} "
                            f"{tps['matmul']:>12.3g} {tps['chunked']:>13.3g} | {r_mm:>5.2f} {r_chk:>6.2f} | "
                            f"{peak['fused']:>6.0f}/{peak['matmul']:>6.0f}/{peak['chunked']:>6.0f} | "
                            f"{'ok' if ok else 'MISMATCH'}")
                    if d == 768 and n_latents == 2**24:
                        hit = r_mm >= TARGET_MATMUL and r_chk >= TARGET_CHUNKED
                        line += (f"  target >={TARGET_MATMUL}x mm, >={TARGET_CHUNKED}x chk: "
                                 f"{'MET' if hit else 'MISSED'}")
                    print(line, flush=True)
                del x
            del w, b
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())

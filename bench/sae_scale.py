"""SAE scale benchmark (issue 13): L = 2^16 ... 2^24 latents at a fixed small width, on CPU.

    python bench/sae_scale.py [--d 8] [--max-log2 24]

Per L, each measurement in a fresh process (peak RSS = VmHWM minus the same process's peak
after its imports, so Python/torch are not counted):
- driver: `sae_info` as the driver's preflight runs it (metadata + digest) -- must not grow with L;
- worker: `load_sae(with_decoder=False)` then one encode (which touches every weight), for the
  file's dtype (bf16: the memory-mapped file) and for float32 (`sae.dtype=auto` on CPU: cast
  block by block), against the encoder's bytes as loaded (W_enc in that dtype + b_enc in fp32;
  target <= 1.3x);
- load: `load_sae` (+ for the mapped bf16 file, one byte of every page touched so it is all
  mapped in), against reading the bytes the load needs (W_enc and b_enc) from the file once with
  plain buffered reads (target <= 1.5x; page cache warm for both);
- hash: `sha256_of_files` with a warm stat-keyed cache against a full hash (target < 1%).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import remote  # noqa: E402
from pipeline.sae.weights import safetensors_header  # noqa: E402
from tests.sae_files import write_own_sae  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys, time
import torch
torch.set_num_threads(1)
from pipeline.sae.formats import load_sae, sae_info
def hwm():
    return [int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")][0] * 1024
path, what = sys.argv[1], sys.argv[2]
x = torch.randn(4, int(sys.argv[3]))
base = hwm()
t = time.perf_counter()
if what == "driver":
    info = sae_info(path)
elif what == "none":
    pass
else:
    sae = load_sae(path, dtype=what, with_decoder=False)
    if sae.W_enc.dtype != torch.float32:  # the mapped file: fault every 4 KiB page in (one byte each)
        sae.W_enc.view(-1).view(torch.uint8)[::4096].sum()
    load_s = time.perf_counter() - t
    sae.encode(x)
print(json.dumps({"peak": hwm() - base, "seconds": load_s if what not in ("driver", "none") else time.perf_counter() - t}))
"""


def child(path: Path, what: str, d: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CHILD, str(path), what, str(d)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def read_once(*refs) -> float:
    t = time.perf_counter()
    with open(refs[0].file, "rb") as f:
        for ref in refs:
            f.seek(ref.offset)
            left = ref.nbytes
            while left:
                left -= len(f.read(min(left, 64 << 20)))
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--min-log2", type=int, default=16)
    ap.add_argument("--max-log2", type=int, default=24)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sae-scale-"))
    os.environ["SAE_HARVEST_CACHE"] = str(tmp / "cache")
    print("$ python bench/sae_scale.py " + " ".join(sys.argv[1:]))
    print(f"d={args.d}, k={args.k}; own format, bf16 file; peak RSS above the process's own after imports; "
          f"bf16 = the mapped file, fp32 = cast block by block; read = W_enc + b_enc read once")
    print(f"{'L':>9} {'file MB':>8} {'driver MB':>9} | {'bf16 MB':>8} {'x enc':>6} {'fp32 MB':>8} {'x enc':>6} | "
          f"{'read s':>7} {'bf16 ld':>7} {'x':>5} {'fp32 ld':>7} {'x':>5} | {'hash s':>7} {'hit ms':>7} {'hit %':>6}")
    for log2 in range(args.min_log2, args.max_log2 + 1, 2):
        n = 1 << log2
        folder = write_own_sae(tmp / f"sae{log2}", n, args.d, args.k)
        file = folder / "sae.safetensors"
        refs = safetensors_header(file)
        enc, needed = refs["W_enc"], (refs["W_enc"], refs["b_enc"])
        time.sleep(remote.RACY_NS / 1e9 + 0.1)  # past the racy window, as a checkpoint on disk is
        read_once(*needed)  # warm the page cache for every timing below
        read_s = min(read_once(*needed) for _ in range(3))
        driver = child(folder, "driver", args.d)  # also fills the hash cache
        # best of three fresh processes each: the box is shared, a single timing is noisy
        bf16 = min((child(folder, "bfloat16", args.d) for _ in range(3)), key=lambda r: r["seconds"])
        fp32 = min((child(folder, "float32", args.d) for _ in range(3)), key=lambda r: r["seconds"])
        files = [folder / "cfg.json", file]
        t = time.perf_counter()
        remote.sha256_of_files(files, cache=False)
        full_s = time.perf_counter() - t
        t = time.perf_counter()
        remote.sha256_of_files(files)
        hit_s = time.perf_counter() - t
        eb, bias = enc.nbytes, refs["b_enc"].nbytes  # the encoder as loaded: W_enc (bf16 or fp32) + b_enc (fp32)
        print(f"{n:>9} {file.stat().st_size / 2**20:>8.1f} {driver['peak'] / 2**20:>9.1f} | "
              f"{bf16['peak'] / 2**20:>8.1f} {bf16['peak'] / (eb + bias):>6.2f} {fp32['peak'] / 2**20:>8.1f} "
              f"{fp32['peak'] / (2 * eb + bias):>6.2f} | "
              f"{read_s:>7.3f} {bf16['seconds']:>7.3f} {bf16['seconds'] / read_s:>5.2f} {fp32['seconds']:>7.3f} "
              f"{fp32['seconds'] / read_s:>5.2f} | {full_s:>7.3f} {hit_s * 1e3:>7.3f} {100 * hit_s / full_s:>6.3f}", flush=True)
        file.unlink()


if __name__ == "__main__":
    main()

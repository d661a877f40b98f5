"""Which CUDA backend `sae_harvest_kernels.topk_encode(..., backend="auto")` picks, per shape.

Generated data: `python3 bench/encode_gpu.py --quick --write-table kernels/sae_harvest_kernels/tuning_table.py`
rewrites this file from a GPU run (the fastest exact backend per measured shape).
`sae_harvest_kernels.tuning.pick_backend` uses the measured shape nearest in log2(d, L, k).
"""

# Where these entries come from. Nothing here has been measured yet: no GPU run of the
# binmax / gemm_filter backends exists, so `auto` keeps the fused kernel, the only Triton
# path measured on a GPU so far (exact on an H200, 2026-11-27, but ~0.3x the matmul).
PROVENANCE = "unmeasured default (no GPU run yet): auto = fused everywhere"
CARD = None
DEFAULT = "fused"
# (d, L, k, fastest backend, its tokens/s); empty until measured.
ENTRIES: list[tuple[int, int, int, str, float]] = []

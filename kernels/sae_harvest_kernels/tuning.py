"""`auto` backend choice on CUDA from the committed table `sae_harvest_kernels.tuning_table`."""
from __future__ import annotations

import math

from sae_harvest_kernels import tuning_table


def pick_backend(d: int, n_latents: int, k: int) -> str:
    """The measured winner at the nearest measured shape (log2 distance), else the table's default."""
    if not tuning_table.ENTRIES:
        return tuning_table.DEFAULT

    def distance(entry) -> float:
        ed, el, ek = entry[:3]
        return (math.log2(ed / d)) ** 2 + (math.log2(el / n_latents)) ** 2 + (math.log2(ek / k)) ** 2

    return min(tuning_table.ENTRIES, key=distance)[3]


def render_table(entries: list[tuple[int, int, int, str, float]], card: str, provenance: str) -> str:
    """Source text of kernels/sae_harvest_kernels/tuning_table.py for measured `entries` (bench/encode_gpu.py --write-table)."""
    rows = "".join(f"    ({d}, {n}, {k}, {backend!r}, {tps:.6g}),\n" for d, n, k, backend, tps in entries)
    return (
        '"""Which CUDA backend `sae_harvest_kernels.topk_encode(..., backend="auto")` picks, per shape.\n\n'
        "Generated data: `python3 bench/encode_gpu.py --quick --write-table kernels/sae_harvest_kernels/tuning_table.py`\n"
        "rewrites this file from a GPU run (the fastest exact backend per measured shape).\n"
        "`sae_harvest_kernels.tuning.pick_backend` uses the measured shape nearest in log2(d, L, k).\n"
        '"""\n\n'
        f"PROVENANCE = {provenance!r}\n"
        f"CARD = {card!r}\n"
        'DEFAULT = "fused"\n'
        "# (d, L, k, fastest backend, its tokens/s)\n"
        f"ENTRIES: list[tuple[int, int, int, str, float]] = [\n{rows}]\n"
    )

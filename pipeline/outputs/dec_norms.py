"""Per-latent decoder-norm fractions of a crosscoder, per input (checkpoint or layer), for latent_stats.

For latent l of a crosscoder over inputs 1..m (W_dec [L, m*d], block i = columns [i*d, (i+1)*d)):

    dec_norm_frac[l, i] = ||W_dec[l, block_i]|| / sum_j ||W_dec[l, block_j]||      (0 for a zero row)

A latent whose share moves from early to late checkpoints is a feature being born; the reverse,
one dying. Read bucket by bucket: the project's own format maps only the rows of one bucket at a
time (a fresh memory map per bucket, dropped with it), so a 16M-latent decoder is never in memory;
other formats go through their reader (`load_sae`, which memory-maps where the file allows).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.outputs.layout import DEC_NORM_FRAC


class DecNormFractions:
    """`DecNormFractions.for_dictionary(manifest, dict_id)` -> None unless it is a crosscoder."""

    def __init__(self, path: str, inputs: list[str]):
        from pipeline.sae.formats import OWN_FORMAT, _local
        from pipeline.sae.weights import safetensors_header

        self.inputs = list(inputs)
        _, local, fmt = _local(path, None, None)
        self._ref = safetensors_header(local / "sae.safetensors")["W_dec"] if fmt == OWN_FORMAT else None
        self._w_dec = None
        if self._ref is None:
            from pipeline.sae.formats import load_sae

            self._w_dec = load_sae(path).W_dec

    @classmethod
    def for_dictionary(cls, manifest: dict, dict_id: str) -> DecNormFractions | None:
        info = (manifest.get("dictionaries") or {}).get(dict_id) or {}
        if info.get("kind") != "crosscoder":
            return None
        return cls(manifest["saes"][dict_id]["path"], info["inputs"])

    def rows(self, latent_ids: np.ndarray) -> np.ndarray:
        """[n, m] float32 fractions for `latent_ids` (sorted, one bucket's)."""
        import torch  # here, not at the top: post-processing tasks of an SAE never need torch

        if len(latent_ids) == 0:
            return np.zeros((0, len(self.inputs)), np.float32)
        lo, hi = int(latent_ids[0]), int(latent_ids[-1]) + 1
        if self._ref is not None:
            from pipeline.sae.weights import mmap_tensor

            block = mmap_tensor(self._ref)[lo:hi]  # only this bucket's rows are read
        else:
            block = self._w_dec[lo:hi]
        block = block[torch.from_numpy(np.asarray(latent_ids, np.int64) - lo)].float()
        norms = block.unflatten(1, (len(self.inputs), -1)).norm(dim=-1).double()
        total = norms.sum(dim=1, keepdim=True)
        frac = torch.where(total > 0, norms / total.clamp_min(1e-300), torch.zeros_like(norms))
        return frac.float().numpy()

    def column(self, latent_ids: np.ndarray) -> pa.Array:
        """The `dec_norm_frac` column (list<float32>[m]) for one bucket of latent_stats."""
        frac = self.rows(latent_ids)
        m = len(self.inputs)
        return pa.ListArray.from_arrays(pa.array(np.arange(len(frac) + 1, dtype=np.int32) * m),
                                        pa.array(frac.reshape(-1), type=pa.float32()))

    @property
    def name(self) -> str:
        return DEC_NORM_FRAC

"""Online FVU check (`sae.fvu_sample=N`): is this SAE wired right, before paying for a full run?

Per shard and hookpoint the worker decodes N of the shard's tokens from the latents it is
about to store and records (commit marker, run summary, manifest):

    fvu            sum_t ||x_t - x̂_t||² / sum_t ||x_t - mean_t(x)||²   over the N sampled tokens,
                   x = the SAE's input as its encoder sees it (`SAE.normalize`, e.g. OpenAI's LN),
                   x̂ = `SAE.decode` of the stored top-k (values after ReLU and latent_scale)
    dead_fraction  fraction of the SAE's latents never active (activation > 0) in those N tokens
    tokens         N (fewer when the shard is shorter)

The sample is the tokens at indices floor(i·T/N), i < N, of the shard in (seq_id, pos) order
(T tokens): spread over contexts and positions, and the same on every attempt at the shard,
so a redone shard writes the same marker. At most N·k latents can be active in a sample, so
`dead_fraction` is at least 1 - N·k/L: a wiring signal (a wrong hookpoint or normalization
makes FVU near or above 1 and leaves most latents dead), not a substitute for latent_stats'
`is_dead`, which counts over the whole run. Summary and manifest aggregate over shards,
weighted by sampled tokens (`merge`).
"""
from __future__ import annotations

import numpy as np
import torch


def sample_indices(n_tokens: int, n_sample: int) -> np.ndarray:
    """Indices floor(i * T / n), i < n = min(n_sample, T): increasing, distinct, spread over [0, T)."""
    n = min(n_sample, n_tokens)
    return (np.arange(n, dtype=np.int64) * n_tokens) // max(n, 1)


def fvu_stats(sae, x: torch.Tensor, values: torch.Tensor, ids: torch.Tensor) -> dict:
    """FVU and dead fraction of `sae` on the raw activations `x` [N, d] with their top-k (values, ids)."""
    x_n = sae.normalize(x.cpu()).double()
    x_hat = sae.decode(values, ids).cpu().double()
    residual = float(((x_n - x_hat) ** 2).sum())
    total = float(((x_n - x_n.mean(dim=0, keepdim=True)) ** 2).sum())
    active = torch.unique(ids.cpu().long()[values.cpu() > 0]).numel()
    return {
        "tokens": int(x.shape[0]),
        "fvu": residual / total if total > 0 else float("nan"),
        "dead_fraction": 1.0 - active / sae.n_latents,
    }


def merge(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Token-weighted aggregate of per-hookpoint {tokens, fvu, dead_fraction, shards} records."""
    out = {h: dict(v) for h, v in a.items()}
    for hook, s in b.items():
        prev = out.get(hook)
        if prev is None or not prev.get("tokens"):
            out[hook] = {"shards": s.get("shards", 1), "tokens": s["tokens"], "fvu": s["fvu"],
                         "dead_fraction": s["dead_fraction"]}
            continue
        n = prev["tokens"] + s["tokens"]
        out[hook] = {
            "shards": prev.get("shards", 1) + s.get("shards", 1),
            "tokens": n,
            "fvu": (prev["fvu"] * prev["tokens"] + s["fvu"] * s["tokens"]) / n if n else float("nan"),
            "dead_fraction": (prev["dead_fraction"] * prev["tokens"] + s["dead_fraction"] * s["tokens"]) / n if n else 1.0,
        }
    return out

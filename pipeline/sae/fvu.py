"""Online FVU check (`sae.fvu_sample=N`): is this SAE wired right, before paying for a full run?

Per shard and hookpoint the worker decodes N of the shard's tokens from the latents it is
about to store and records (commit marker, run summary, manifest):

    fvu            sum_t ||x_t - x̂_t||² / sum_t ||x_t - mean_t(x)||²   over the N sampled tokens,
                   x = the SAE's input as its encoder sees it (`SAE.normalize`, e.g. OpenAI's LN;
                   per input block for a crosscoder, with each block's FVU under `inputs`),
                   or, for a transcoder, its output hookpoint's activations,
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


def fvu_stats(sae, x: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, target: torch.Tensor | None = None) -> dict:
    """FVU and dead fraction of `sae` on the raw activations `x` [N, d] with their top-k (values, ids).

    Transcoder: the decode is compared with `target`, its output hookpoint's raw activations
    (the input's normalization is the encoder's business; the decode predicts the output).
    Crosscoder: per input block against that input, normalized per block as the encoder sees it;
    `fvu` pools the blocks, `inputs` has each block's own FVU (in `sae.inputs` order)."""
    x_n = target.cpu().double() if target is not None else sae.normalize(x.cpu()).double()
    x_hat = sae.decode(values, ids).cpu().double()
    m = sae.n_blocks
    blocks_n, blocks_hat = x_n.unflatten(-1, (m, -1)), x_hat.unflatten(-1, (m, -1))  # [N, m, d/m]
    residual = ((blocks_n - blocks_hat) ** 2).sum(dim=(0, 2))
    total = ((blocks_n - blocks_n.mean(dim=0, keepdim=True)) ** 2).sum(dim=(0, 2))
    active = torch.unique(ids.cpu().long()[values.cpu() > 0]).numel()
    out = {
        "tokens": int(x.shape[0]),
        "fvu": _ratio(float(residual.sum()), float(total.sum())),
        "dead_fraction": 1.0 - active / sae.n_latents,
    }
    if sae.kind == "crosscoder":
        out["inputs"] = {name: _ratio(float(r), float(t)) for name, r, t in zip(sae.inputs, residual, total)}
    return out


def _ratio(residual: float, total: float) -> float:
    return residual / total if total > 0 else float("nan")


def merge(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Token-weighted aggregate of per-hookpoint {tokens, fvu, dead_fraction, shards[, inputs]} records."""
    out = {h: dict(v) for h, v in a.items()}
    for hook, s in b.items():
        prev = out.get(hook)
        if prev is None or not prev.get("tokens"):
            out[hook] = {"shards": s.get("shards", 1), "tokens": s["tokens"], "fvu": s["fvu"],
                         "dead_fraction": s["dead_fraction"], **({"inputs": dict(s["inputs"])} if "inputs" in s else {})}
            continue
        wa, wb = prev["tokens"], s["tokens"]
        n = wa + wb

        def mean(p: float, q: float, default: float, wa: int = wa, wb: int = wb) -> float:
            return (p * wa + q * wb) / (wa + wb) if wa + wb else default

        out[hook] = {
            "shards": prev.get("shards", 1) + s.get("shards", 1),
            "tokens": n,
            "fvu": mean(prev["fvu"], s["fvu"], float("nan")),
            "dead_fraction": mean(prev["dead_fraction"], s["dead_fraction"], 1.0),
        }
        if "inputs" in s:  # a crosscoder: each input block's FVU, weighted the same way
            out[hook]["inputs"] = {i: mean(prev.get("inputs", {}).get(i, v), v, float("nan"))
                                   for i, v in s["inputs"].items()}
    return out

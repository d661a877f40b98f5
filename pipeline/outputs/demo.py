"""Print a few latents' top contexts with the activating token marked, so a person can see
that the features mean something. Reads the run's committed output like any downstream job."""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from pipeline.config import RunConfig
from pipeline.model.loader import load_tokenizer
from pipeline.outputs.sink import RunStore

log = logging.getLogger(__name__)


def pick_latents(ids: np.ndarray, acts: np.ndarray, n_tokens: int, how_many: int) -> list[int]:
    """Latents worth looking at: neither rare flukes nor always-on (density 1e-3..2e-2), by max act."""
    counts = np.bincount(ids.reshape(-1), minlength=int(ids.max()) + 1)
    max_act = np.zeros_like(counts, dtype=np.float32)
    np.maximum.at(max_act, ids.reshape(-1), acts.reshape(-1))
    density = counts / max(1, n_tokens)
    candidates = np.nonzero((density >= 1e-3) & (density <= 2e-2) & (max_act > 0))[0]
    if len(candidates) < how_many:
        candidates = np.nonzero(counts > 0)[0]
    # Tokens with massive residual norms (digits, separators) give some latents activations
    # ~100x the typical maximum; they say little about meaning, so leave them out of the show.
    typical = float(np.median(max_act[candidates])) if len(candidates) else 0.0
    if typical > 0:
        candidates = candidates[max_act[candidates] <= 20 * typical]
    # Spread the choice over the candidates ranked by max activation, deterministically.
    ranked = candidates[np.argsort(-max_act[candidates], kind="stable")]
    step = max(1, len(ranked) // how_many)
    return [int(x) for x in ranked[::step][:how_many]]


def show_top_contexts(cfg: RunConfig, hookpoint: str | None = None) -> None:
    hookpoint = hookpoint or cfg.sae.hookpoints[0]
    demo = cfg.demo
    store = RunStore(cfg.sink, cfg.run_id)
    latents = store.read_committed("latents", hookpoint)
    contexts = store.read_committed("contexts")
    tokenizer = load_tokenizer(cfg.model)
    k = latents.schema.field("latent_ids").type.list_size
    ids = latents.column("latent_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
    acts = latents.column("acts").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, k)
    seq = latents.column("seq_id").to_numpy()
    pos = latents.column("pos").to_numpy()
    # Position 0 is the attention sink: its residual norm is ~100x the others', so latents that
    # fire there would crowd the display without saying anything about the text.
    keep = pos > 0
    ids, acts, seq, pos = ids[keep], acts[keep], seq[keep], pos[keep]
    seq_to_row = {int(s): i for i, s in enumerate(contexts.column("seq_id").to_numpy())}
    token_lists = contexts.column("token_ids")

    log.info(f"\nTop contexts for {demo.show_latents} latents at {hookpoint} ({len(seq):,} tokens); "
             f"the activating token is marked [[like this]].")
    for latent in pick_latents(ids, acts, len(seq), demo.show_latents):
        row, col = np.nonzero(ids == latent)
        a = acts[row, col]
        density = len(row) / len(seq)
        log.info(f"\n=== latent {latent}: fires on {density:.2%} of tokens, max act {a.max():.2f}")
        shown, seen = 0, set()
        for i in np.argsort(-a, kind="stable"):
            r = row[i]
            key = (int(seq[r]), int(pos[r]) // demo.window)
            if key in seen:
                continue
            seen.add(key)
            tokens = token_lists[seq_to_row[int(seq[r])]].as_py()
            p = int(pos[r])
            left = tokenizer.decode(tokens[max(0, p - demo.window):p])
            mid = tokenizer.decode(tokens[p:p + 1])
            right = tokenizer.decode(tokens[p + 1:p + 1 + demo.window // 3])
            text = f"{left}[[{mid}]]{right}".replace("\n", "\\n")
            log.info(f"  {a[i]:6.2f}  {text}")
            shown += 1
            if shown == demo.show_contexts:
                break
    python = os.path.relpath(sys.executable)
    log.info(f"\nMore: {python} -m pipeline.outputs.postprocess run_id={cfg.run_id} && "
             f"{python} -m pipeline.outputs.browser run_id={cfg.run_id} out=out/{cfg.run_id}_site  (a page per latent)")

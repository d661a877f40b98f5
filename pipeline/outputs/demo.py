"""Print a few latents' top contexts with the activating token marked, so a person can see
that the features mean something. Reads the run's committed output like any downstream job,
one committed shard at a time (RunStore.iter_committed); the contexts' windows through
pipeline/outputs/windows.py, the reader the browser and the examples use."""
from __future__ import annotations

import logging
import os
import sys

import numpy as np

from pipeline.config import RunConfig
from pipeline.model.loader import load_tokenizer
from pipeline.outputs.layout import MANIFEST_KEY
from pipeline.outputs.sink import RunStore
from pipeline.outputs.windows import cut_windows

log = logging.getLogger(__name__)


def pick_latents(counts: np.ndarray, max_act: np.ndarray, n_tokens: int, how_many: int) -> list[int]:
    """Latents worth looking at: neither rare flukes nor always-on (density 1e-3..2e-2), by max act."""
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


def shard_pairs(latents) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids [rows, k], acts [rows, k], seq, pos) of one latents part, position 0 left out: it is the
    attention sink (residual norm ~100x the others'), whose latents say nothing about the text."""
    k = latents.schema.field("latent_ids").type.list_size
    ids = latents.column("latent_ids").combine_chunks().flatten().to_numpy().reshape(-1, k)
    acts = latents.column("acts").combine_chunks().flatten().to_numpy().astype(np.float32).reshape(-1, k)
    seq, pos = latents.column("seq_id").to_numpy(), latents.column("pos").to_numpy()
    keep = pos > 0
    return ids[keep], acts[keep], seq[keep], pos[keep]


def show_top_contexts(cfg: RunConfig, hookpoint: str | None = None) -> None:
    hookpoint = hookpoint or cfg.sae.hookpoints[0]
    demo = cfg.demo
    store = RunStore(cfg.sink, cfg.run_id)
    tokenizer = load_tokenizer(cfg.model)
    # Pass 1, one committed shard at a time: per-latent counts and max activation.
    counts, max_act, n_tokens = np.zeros(0, np.int64), np.zeros(0, np.float32), 0
    for part in store.iter_committed("latents", hookpoint):
        ids, acts, _, _ = shard_pairs(part)
        size = max(len(counts), int(ids.max(initial=-1)) + 1)
        counts, max_act = np.pad(counts, (0, size - len(counts))), np.pad(max_act, (0, size - len(max_act)))
        counts += np.bincount(ids.reshape(-1), minlength=size)
        np.maximum.at(max_act, ids.reshape(-1), acts.reshape(-1))
        n_tokens += len(ids)
    chosen = pick_latents(counts, max_act, n_tokens, demo.show_latents)
    # Pass 2: each chosen latent's strongest (act, seq, pos), a bounded list per latent.
    keep_n = 8 * demo.show_contexts
    best = {latent: (np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)) for latent in chosen}
    for part in store.iter_committed("latents", hookpoint):
        ids, acts, seq, pos = shard_pairs(part)
        for latent in chosen:
            row, col = np.nonzero(ids == latent)
            a, s, p = (np.concatenate([x, y]) for x, y in zip(best[latent], (acts[row, col], seq[row], pos[row])))
            order = np.lexsort((p, s, -a))[:keep_n]
            best[latent] = (a[order], s[order], p[order])
    # Their windows through the one window reader (pipeline/outputs/windows.py): `window` tokens
    # before the position and window // 3 after it, clipped at the context's edges; each needed
    # contexts shard is read once.
    cand = [(latent, i) for latent in chosen for i in range(len(best[latent][0]))]
    c_seq = np.concatenate([best[latent][1] for latent in chosen] or [np.zeros(0, np.int64)])
    c_pos = np.concatenate([best[latent][2] for latent in chosen] or [np.zeros(0, np.int64)])
    start, offsets, tokens, _ = cut_windows(store, c_seq, c_pos, int(store.read_json(MANIFEST_KEY)["shard_size"]),
                                            before=demo.window, after=demo.window // 3, shift=False)
    windows = {key: (int(start[j]), tokens[offsets[j]:offsets[j + 1]].tolist()) for j, key in enumerate(cand)}

    log.info(f"\nTop contexts for {demo.show_latents} latents at {hookpoint} ({n_tokens:,} tokens); "
             f"the activating token is marked [[like this]].")
    for latent in chosen:
        a, seqs, poss = best[latent]
        log.info(f"\n=== latent {latent}: fires on {counts[latent] / n_tokens:.2%} of tokens, max act {a.max():.2f}")
        shown, seen = 0, set()
        for i in range(len(a)):
            key = (int(seqs[i]), int(poss[i]) // demo.window)
            if key in seen:
                continue
            seen.add(key)
            st, win = windows[(latent, i)]
            at = int(poss[i]) - st
            left, mid, right = tokenizer.decode(win[:at]), tokenizer.decode(win[at:at + 1]), tokenizer.decode(win[at + 1:])
            text = f"{left}[[{mid}]]{right}".replace("\n", "\\n")
            log.info(f"  {a[i]:6.2f}  {text}")
            shown += 1
            if shown == demo.show_contexts:
                break
    python = os.path.relpath(sys.executable)
    log.info(f"\nMore: {python} -m pipeline.outputs.postprocess run_id={cfg.run_id} && "
             f"{python} -m pipeline.outputs.browser run_id={cfg.run_id} out=out/{cfg.run_id}_site  (a page per latent)")

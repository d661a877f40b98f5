"""The embedded default SAE: fitted once on the default model's activations, then cached.

The cache key covers everything that changes the result (model weights' sha256, the dtype the model
runs in, hookpoint, corpus files, ctx_len, SAE shape, training budget, seed), so a cached SAE is reused only
when it would be trained identically.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import CorpusConfig, TrainSAEConfig
from pipeline.data.corpus import CorpusFile
from pipeline.data.packing import plan_shards
from pipeline.model.harvest import Harvester

log = logging.getLogger(__name__)


def cache_path(train: TrainSAEConfig, model_sha: str, model_dtype: str, hookpoint: str, files: list[CorpusFile],
               corpus: CorpusConfig) -> Path:
    key = json.dumps(
        {
            "model": model_sha,
            "model_dtype": model_dtype,  # bf16 and fp32 forwards give different activations
            "hookpoint": hookpoint,
            "files": [(f.url, f.fingerprint) for f in files],
            "ctx_len": corpus.ctx_len,
            "train": {k: v for k, v in vars(train).items() if k != "cache_dir"},
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return Path(train.cache_dir) / f"{hookpoint}-L{train.n_latents}-k{train.k}-{digest}"


def harvest_training_activations(
    model, tokenizer, files, corpus: CorpusConfig, hookpoint: str, tokens: int, batch_size: int
) -> torch.Tensor:
    """The first `tokens` activations of the corpus at `hookpoint` (position 0 of each context
    excluded: attention-sink tokens have outlier norms that an SAE should not be fitted on)."""
    harvester = Harvester(model, [hookpoint])
    plan_cfg = dataclasses.replace(corpus, max_tokens=None)
    full_contexts = (
        ctx.token_ids
        for shard in plan_shards(files, plan_cfg, tokenizer, tokenizer.eos_token_id)
        for ctx in shard.contexts
        if len(ctx.token_ids) == corpus.ctx_len
    )
    rows: list[torch.Tensor] = []
    have = 0
    started = time.perf_counter()
    batch: list[np.ndarray] = []

    def flush() -> None:
        nonlocal have
        ids = torch.from_numpy(np.stack(batch).astype(np.int64))
        acts = harvester(ids)[hookpoint][:, 1:]
        rows.append(acts.reshape(-1, acts.shape[-1]).float())
        have += rows[-1].shape[0]
        batch.clear()

    for token_ids in full_contexts:
        batch.append(token_ids)
        if len(batch) == batch_size:
            flush()
            if have >= tokens:
                break
    if batch and have < tokens:
        flush()
    acts = torch.cat(rows)[:tokens]
    log.info(f"[sae] harvested {acts.shape[0]:,} training activations at {hookpoint} in {time.perf_counter() - started:.1f}s")
    return acts


def ensure_demo_sae(model, tokenizer, files, corpus: CorpusConfig, hookpoint: str, train: TrainSAEConfig,
                    model_sha: str, model_dtype: str, batch_size: int) -> Path:
    from pipeline.sae.formats import load_sae
    from pipeline.sae.train import TrainConfig, train_topk_sae

    path = cache_path(train, model_sha, model_dtype, hookpoint, files, corpus)
    if (path / "cfg.json").exists():
        sae = load_sae(path)
        report = sae.meta.get("train", {})
        log.info(f"[sae] reusing cached demo SAE {path} (FVU {report.get('fvu', float('nan')):.3f}, "
                 f"dead {report.get('dead_fraction', float('nan')):.1%})")
        return path
    log.info(f"[sae] no cached demo SAE for {hookpoint}: fitting one ({train.n_latents} latents, k={train.k}, "
             f"{train.tokens:,} tokens); cached at {path}")
    acts = harvest_training_activations(model, tokenizer, files, corpus, hookpoint, train.tokens, batch_size)
    cfg = TrainConfig(n_latents=train.n_latents, k=train.k, epochs=train.epochs, batch_size=train.batch_size,
                      lr=train.lr, seed=train.seed)
    sae, report = train_topk_sae(acts, cfg, hookpoint=hookpoint, progress=log.info)
    sae.meta["model_sha256"] = model_sha
    log.info(f"[sae] trained: FVU {report.fvu:.3f}, dead latents {report.dead_fraction:.1%}, {report.seconds:.0f}s")
    tmp = path.with_name(path.name + ".tmp")
    sae.save(tmp)
    tmp.rename(path)
    return path

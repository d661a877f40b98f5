"""Export a post-processed run to the latent cache layout EleutherAI's delphi reads.

    python -m pipeline.outputs.delphi_export run_id=demo out=./delphi_cache [sink.root=...] [hookpoints=[layers.6]]

delphi (delphi/latents/cache.py `save_splits`, read by delphi/latents/loader.py `TensorBuffer`):

    {out}/{hookpoint}/{start}_{end}.safetensors   one file per latent range, `end` inclusive
        locations   [n, 3] uint16 (uint32 if a value needs it): (batch row, pos, latent_id - start)
        activations [n] float16
        tokens      [n_rows, ctx_len] the token ids of every context (delphi repeats it per file)
    {out}/{hookpoint}/config.json                 delphi's CacheConfig fields + model_name

Our buckets become delphi's ranges, read from `by_latent/` (committed shards only, already
split by latent range), so export is one bucket in memory at a time. Batch row r is the r-th
committed context in seq_id order (config.json `seq_id_ranges` maps rows back to seq_ids);
contexts shorter than ctx_len are padded with the tokenizer's eos id.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from pipeline.cli import command
from pipeline.config import DelphiExportConfig
from pipeline.outputs.layout import MANIFEST_KEY, bucket_marker_key, by_latent_key, contexts_key
from pipeline.outputs.postprocess import read_json_or_none, to_ranges
from pipeline.outputs.sink import RunStore

log = logging.getLogger(__name__)


def committed_tokens(store: RunStore, ctx_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(seq_ids sorted, tokens [n, ctx_len], unpadded token count) of every committed context."""
    seq_ids, rows, n_real = [], [], 0
    for shard in store.committed_shards():
        t = store.read_committed_part(shard, contexts_key(shard), ["seq_id", "token_ids"])
        seq_ids.append(t["seq_id"].to_numpy())
        for toks in t["token_ids"].to_pylist():
            row = np.full(ctx_len, pad_id, dtype=np.int32)
            row[: len(toks)] = toks
            n_real += len(toks)
            rows.append(row)
    seq = np.concatenate(seq_ids) if seq_ids else np.zeros(0, np.int64)
    tokens = np.stack(rows) if rows else np.zeros((0, ctx_len), np.int32)
    order = np.argsort(seq, kind="stable")
    return seq[order], tokens[order], n_real


def export_delphi(store: RunStore, out: str | Path, hookpoints: list[str] | None = None,
                  save_tokens: bool = True) -> list[Path]:
    manifest = store.read_json(MANIFEST_KEY)
    hooks = hookpoints or manifest["hookpoints"]
    ctx_len = int(manifest["ctx_len"])
    pad_id = int((manifest.get("tokenizer") or {}).get("eos_token_id") or 0)
    seq, tokens, n_real = committed_tokens(store, ctx_len, pad_id)
    written = []
    for hook in hooks:
        folder = Path(out) / hook
        folder.mkdir(parents=True, exist_ok=True)
        n_latents = int(manifest["saes"][hook]["n_latents"])
        bucket = 0
        while True:
            marker = read_json_or_none(store, bucket_marker_key(hook, bucket))
            if marker is None:
                break
            start, end = marker["latents"][0], marker["latents"][1] - 1
            t = store.read_part(by_latent_key(hook, bucket))
            rows = np.searchsorted(seq, t["seq_id"].to_numpy())
            if len(rows) and (rows.max() >= len(seq) or not np.array_equal(seq[rows], t["seq_id"].to_numpy())):
                raise ValueError(f"{store.path(by_latent_key(hook, bucket))} has contexts that are not committed: "
                                 "post-process the run again before exporting")
            locations = np.stack([rows, t["pos"].to_numpy(), t["latent_id"].to_numpy() - start], axis=1)
            small = locations.size == 0 or (locations[:, 0].max() < 2**16 and locations[:, 2].max() < 2**16
                                            and locations[:, 1].max() < 2**16)
            data = {
                "locations": locations.astype(np.uint16 if small else np.uint32),
                "activations": t["act"].to_numpy(zero_copy_only=False).astype(np.float16),
            }
            if save_tokens:
                data["tokens"] = tokens
            path = folder / f"{start}_{end}.safetensors"
            save_file(data, str(path))
            written.append(path)
            bucket += 1
        if bucket == 0:
            raise FileNotFoundError(f"{store.url}: no by_latent buckets for {hook}; run pipeline.outputs.postprocess first")
        config = {
            # delphi's CacheConfig fields, then what it adds (model_name), then ours.
            "dataset_repo": manifest.get("config", {}).get("corpus", {}).get("name", ""),
            "dataset_split": "", "dataset_name": "", "dataset_column": "text",
            "batch_size": int(manifest.get("config", {}).get("model", {}).get("batch_size", 1)),
            "cache_ctx_len": ctx_len, "n_tokens": n_real,
            "n_splits": bucket,
            "model_name": (manifest.get("model") or {}).get("path") or (manifest.get("model") or {}).get("name", ""),
            "sae_harvest": {"run": store.url, "hookpoint": hook, "n_latents": n_latents,
                            "seq_id_ranges": to_ranges(seq.tolist())},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=4))
        log.info(f"[{store.run_id}] delphi cache for {hook}: {bucket} file(s) in {folder}")
    return written


def _main(cfg: DelphiExportConfig) -> None:
    export_delphi(RunStore(cfg.sink, cfg.run_id), cfg.out, cfg.hookpoints, cfg.save_tokens)


main = command("delphi_export", DelphiExportConfig, _main)


if __name__ == "__main__":
    main()

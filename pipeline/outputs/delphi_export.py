"""Export a post-processed run to the latent cache layout EleutherAI's delphi reads.

    python -m pipeline.outputs.delphi_export run_id=demo out=./delphi_cache [sink.root=...] [hookpoints=[layers.6]]

delphi (delphi/latents/cache.py `save_splits`, read by delphi/latents/loader.py `TensorBuffer`):

    {out}/{hookpoint}/{start}_{end}.safetensors   one file per latent range, `end` inclusive
        locations   [n, 3] uint16 (uint32 if a value needs it): (batch row, pos, latent_id - start)
        activations [n] float16 (float32 for an output.acts_dtype=float32 run)
        tokens      [n_rows, ctx_len] the token ids of every context: only in the FIRST split of each
                    hookpoint (delphi writes it per file, but reads it from the first file that has it)
    {out}/{hookpoint}/config.json                 delphi's CacheConfig fields + model_name

Our buckets become delphi's ranges, read from `by_latent/` (committed shards only, already
split by latent range); files are streamed tensor by tensor, so memory is one row group plus
one contexts shard. Batch row r is the r-th
committed context in seq_id order (config.json `seq_id_ranges` maps rows back to seq_ids);
contexts shorter than ctx_len are padded with the tokenizer's eos id.
"""
from __future__ import annotations

import json
import logging
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.cli import command
from pipeline.config import DelphiExportConfig
from pipeline.outputs.layout import MANIFEST_KEY, bucket_marker_key, by_latent_key, dictionary_ids
from pipeline.outputs.postprocess import read_json_or_none, to_ranges
from pipeline.outputs.sink import RunStore
from pipeline.outputs.windows import ContextShard

log = logging.getLogger(__name__)


def committed_seq_ids(store: RunStore) -> np.ndarray:
    """seq_ids of every committed context in order (batch row r = r-th); one shard's column at a time."""
    parts = [t["seq_id"].to_numpy() for t in store.iter_committed("contexts", columns=["seq_id"])]
    seq = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if np.any(seq[1:] <= seq[:-1]):
        raise ValueError(f"{store.url}: committed contexts are not in increasing seq_id order")
    return seq


def committed_tokens(store: RunStore, ctx_len: int, pad_id: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(seq_ids, tokens [rows, ctx_len] padded with pad_id, unpadded count) per committed contexts shard."""
    for shard in store.committed_shards():  # read by the window reader's ContextShard (pipeline/outputs/windows.py)
        ctx = ContextShard.read(store, shard)
        offsets, values = ctx.offsets, ctx.values
        lengths = np.diff(offsets)
        if len(lengths) and lengths.max() > ctx_len:
            raise ValueError(f"{store.url}: a context has {lengths.max()} tokens, more than ctx_len={ctx_len}")
        rows = np.full((len(lengths), ctx_len), pad_id, np.int32)
        mask = np.arange(ctx_len)[None, :] < lengths[:, None]
        rows[mask] = values[offsets[0]:offsets[-1]] if len(lengths) else values[:0]
        yield ctx.seq, rows, int(lengths.sum())


class SafetensorsWriter:
    """Writes one .safetensors file tensor by tensor from chunks, so no tensor is held whole.
    The layout is the format's: u64 header size, JSON header (data_offsets), raw little-endian data."""

    DTYPES = {np.dtype(np.int32): "I32", np.dtype(np.uint16): "U16", np.dtype(np.uint32): "U32",
              np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}

    def __init__(self, path: Path, tensors: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            size = int(np.prod(shape)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": self.DTYPES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.expected, self.written, self.path = offset, 0, path
        self.f = open(path, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, chunk: np.ndarray) -> None:
        data = np.ascontiguousarray(chunk).astype(chunk.dtype.newbyteorder("<"), copy=False).tobytes()
        self.f.write(data)
        self.written += len(data)

    def close(self) -> None:
        self.f.close()
        if self.written != self.expected:
            raise AssertionError(f"{self.path}: wrote {self.written} data bytes, header says {self.expected}")


def export_delphi(store: RunStore, out: str | Path, hookpoints: list[str] | None = None,
                  save_tokens: bool = True) -> list[Path]:
    """One delphi split per bucket, streamed: by_latent row group by row group, the token matrix
    contexts shard by contexts shard, and written ONCE per hookpoint (in its first split).

    delphi's LatentDataset takes `tokens` from the first split that has them (loader._build), and
    TensorBuffer.load treats the key as optional, so one copy serves every split. Caveat, delphi's
    own: with a latent selection (`latents=`), `_build_selected` opens only the selected splits, so
    select at least one latent of the first split or load tokens yourself."""
    manifest = store.read_json(MANIFEST_KEY)
    hooks = hookpoints or dictionary_ids(manifest)
    ctx_len = int(manifest["ctx_len"])
    pad_id = int((manifest.get("tokenizer") or {}).get("eos_token_id") or 0)
    seq = committed_seq_ids(store)
    written, n_real = [], None
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
            key = by_latent_key(hook, bucket)
            with store.fs.open(store.path(key), "rb") as f:
                meta = pq.ParquetFile(f)
                n_pairs = meta.metadata.num_rows
                # the run's act dtype (output.acts_dtype=float32 keeps values beyond float16's range)
                act_dtype = np.dtype(meta.schema_arrow.field("act").type.to_pandas_dtype())
            small = len(seq) < 2**16 and ctx_len <= 2**16 and end - start < 2**16
            loc_type = np.uint16 if small else np.uint32
            tensors = {"locations": (loc_type, (n_pairs, 3)), "activations": (act_dtype, (n_pairs,))}
            with_tokens = save_tokens and bucket == 0
            if with_tokens:
                tensors["tokens"] = (np.int32, (len(seq), ctx_len))
            path = folder / f"{start}_{end}.safetensors"
            writer = SafetensorsWriter(path, tensors)
            try:
                with store.fs.open(store.path(key), "rb") as f:
                    for batch in pq.ParquetFile(f).iter_batches(columns=["latent_id", "seq_id", "pos"]):
                        s = batch.column("seq_id").to_numpy()
                        rows = np.searchsorted(seq, s)
                        if len(rows) and (rows.max() >= len(seq) or not np.array_equal(seq[rows], s)):
                            raise ValueError(f"{store.path(key)} has contexts that are not committed: "
                                             "post-process the run again before exporting")
                        writer.write(np.stack([rows, batch.column("pos").to_numpy(),
                                               batch.column("latent_id").to_numpy() - start], axis=1).astype(loc_type))
                with store.fs.open(store.path(key), "rb") as f:  # second pass: the activations tensor
                    for batch in pq.ParquetFile(f).iter_batches(columns=["act"]):
                        writer.write(batch.column("act").to_numpy(zero_copy_only=False).astype(act_dtype))
                if with_tokens:
                    n_real = 0
                    for _, rows_tok, real in committed_tokens(store, ctx_len, pad_id):
                        writer.write(rows_tok)
                        n_real += real
            finally:
                writer.close()
            written.append(path)
            bucket += 1
        if bucket == 0:
            raise FileNotFoundError(f"{store.url}: no by_latent buckets for {hook}; run pipeline.outputs.postprocess first")
        if n_real is None:  # tokens not saved: count them from the contexts anyway, one shard at a time
            n_real = sum(real for _, _, real in committed_tokens(store, ctx_len, pad_id))
        config = {
            # delphi's CacheConfig fields, then what it adds (model_name), then ours.
            "dataset_repo": manifest.get("config", {}).get("corpus", {}).get("name", ""),
            "dataset_split": "", "dataset_name": "", "dataset_column": "text",
            "batch_size": int(manifest.get("config", {}).get("model", {}).get("batch_size", 1)),
            "cache_ctx_len": ctx_len, "n_tokens": n_real,
            "n_splits": bucket,
            "model_name": (manifest.get("model") or {}).get("path") or (manifest.get("model") or {}).get("name", ""),
            "sae_harvest": {"run": store.url, "hookpoint": hook, "n_latents": n_latents,
                            "seq_id_ranges": to_ranges(seq.tolist()), "tokens_in": written[-bucket].name if save_tokens else None},
        }
        (folder / "config.json").write_text(json.dumps(config, indent=4))
        log.info(f"[{store.run_id}] delphi cache for {hook}: {bucket} file(s) in {folder}")
    return written


def _main(cfg: DelphiExportConfig) -> None:
    export_delphi(RunStore(cfg.sink, cfg.run_id), cfg.out, cfg.hookpoints, cfg.save_tokens)


main = command("delphi_export", DelphiExportConfig, _main)


if __name__ == "__main__":
    main()

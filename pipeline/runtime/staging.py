"""Tokenize tasks: a corpus file -> packed contexts staged on the run's sink; the driver never tokenizes.

`stage_files` runs as a plain Ray task (`pipeline.runtime.dispatch.TokenizePool`), one per corpus
file or group of small consecutive files (`cluster.tokenize_group_mb`), on any node. It loads the tokenizer (once per worker process), reads and packs the file
exactly as `pipeline.data.packing.plan_shards` does (through the per-file token cache of
`pipeline/data/token_cache.py` when `corpus.token_cache` is set, which then lives with the
workers), and writes the contexts to the run's token staging area:

    {run}/_tokens/<key>.parquet   TOKENS_SCHEMA, row group j = local shard j (`shard_size` contexts)
    {run}/_tokens/<key>.json      the metadata below, written after the Parquet file (entry complete)

`<key>` is the token cache's key (file url + fingerprint, reading settings, tokenizer digest,
eos id, ctx_len, shard_size): a resumed run finds the entry and tokenizes nothing. It returns only
that metadata (contexts, tokens, the last context's length, complete, quarantined records with
their position, tokenizer name/vocab/eos/class/digest): shard ids are assigned by the driver, in
file order, from the ledger, and a harvest worker reads its shard's row group itself
(`read_shard`). Tokens never pass through the driver. The driver deletes `_tokens/` when a run
ends with every shard committed (`clear_staging`).

Staged contexts are the file's packing cut after the context that reaches `cap` tokens
(`corpus.max_tokens`; one file never needs more); the driver cuts further at the same context
boundary as plan_shards would, from the counts alone (every context but a file's last is
exactly ctx_len tokens).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ModelConfig, RunConfig
from pipeline.data.corpus import CorpusFile, Quarantined
from pipeline.data.token_cache import cached_file_items, file_key, tokenizer_identity
from pipeline.outputs.layout import TOKENS_DIR, TOKENS_SCHEMA, tokens_key, tokens_meta_key
from pipeline.outputs.sink import RunStore, with_retries

log = logging.getLogger(__name__)

_tokenizers: dict = {}  # per worker process: Ray reuses task workers, so one load per process


def tokenizer_for(cfg: ModelConfig):
    key = (cfg.path, cfg.gguf_file)
    if key not in _tokenizers:
        from pipeline.model.loader import load_tokenizer

        _tokenizers[key] = load_tokenizer(cfg)
    return _tokenizers[key]


def tokenizer_info(tokenizer) -> dict:
    """What the manifest records about the tokenizer (computed where it is loaded: a task)."""
    return {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "class": type(tokenizer).__name__,
            "sha256": tokenizer_identity(tokenizer)}


def usable(meta: dict | None, cap: int | None) -> bool:
    """A staged (or cached) entry serves a plan that needs at most `cap` tokens of the file."""
    return meta is not None and (meta["complete"] or (cap is not None and meta["tokens"] >= cap))


def stage_files(cfg: RunConfig, jobs: list[tuple[CorpusFile, int | None]], storage_options: dict | None) -> list:
    """`stage_file` for each (file, cap) in order, in one task (TokenizePool groups small files):
    each file's metadata, or the error it raised, so a bad file fails when the driver takes its
    result and its neighbours' results stand."""
    out: list = []
    for file, cap in jobs:
        try:
            out.append(stage_file(cfg, file, cap, storage_options))
        except Exception as err:  # noqa: BLE001  raised again by the pool, for this file only
            out.append(_portable(err))
    return out


def _portable(err: Exception) -> Exception:
    """`err` if it survives the trip to the driver (a pickle round trip), else a RuntimeError with
    its type and message: an exception whose __init__ does not take its own args cannot be rebuilt."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(err).__name__}: {err}")


def stage_file(cfg: RunConfig, file: CorpusFile, cap: int | None, storage_options: dict | None) -> dict:
    """Tokenize and pack one corpus file into the staging area (module docstring); returns its metadata."""
    tokenizer = tokenizer_for(cfg.model)
    tok_id = tokenizer_identity(tokenizer)
    eos_id = tokenizer.eos_token_id
    key, inputs = file_key(file, cfg.corpus, tok_id, eos_id)
    store = RunStore(cfg.sink, cfg.run_id)
    try:
        meta = store.read_json(tokens_meta_key(key))
    except FileNotFoundError:
        meta = None
    if usable(meta, cap):
        return {**meta, "cache": "staged"}
    hit, items = cached_file_items(file, cfg.corpus, tokenizer, eos_id, storage_options, cap=cap, tok_id=tok_id)
    quarantined: list[dict] = []
    contexts = tokens = last_len = 0
    size = cfg.corpus.shard_size
    batch: list = []
    with _staged_parquet(store, tokens_key(key)) as writer:
        def flush() -> None:
            writer.write_table(pa.Table.from_arrays(
                [pa.array([c.doc_id for c in batch], type=pa.string()),
                 pa.array([c.doc_offset for c in batch], type=pa.int32()),
                 pa.array([c.token_ids for c in batch], type=pa.list_(pa.int32()))], schema=TOKENS_SCHEMA),
                row_group_size=size)
            batch.clear()

        for item in items:
            if isinstance(item, Quarantined):
                quarantined.append({"before_context": contexts, **dataclasses.asdict(item)})
                continue
            batch.append(item)
            contexts += 1
            last_len = len(item.token_ids)
            tokens += last_len
            if len(batch) == size:
                flush()
        if batch:
            flush()
    complete = cap is None or tokens < cap
    meta = {**inputs, "key": key, "complete": complete, "contexts": contexts, "tokens": tokens,
            "last_len": last_len, "quarantined": quarantined, "tokenizer": tokenizer_info(tokenizer)}
    store.write_json(tokens_meta_key(key), meta)  # last: the entry is complete
    return {**meta, "cache": "hit" if hit else "miss"}


@contextlib.contextmanager
def _staged_parquet(store: RunStore, key: str):
    """A ParquetWriter whose file appears at `key` only when closed without error: written to a
    hidden temp file beside it (local sink: then renamed) or in the temp dir (object store: then
    uploaded, one multipart upload). Memory: one shard of contexts."""
    full = store.path(key)
    if store.is_local:
        folder = os.path.dirname(full)
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(full)}.tmp-", dir=folder)
    else:
        fd, tmp = tempfile.mkstemp(suffix=".parquet")
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, TOKENS_SCHEMA, compression=store.cfg.compression,
                              compression_level=store.cfg.compression_level) as writer:
            yield writer
        if store.is_local:
            os.replace(tmp, full)
        else:
            with_retries(f"upload {key}", lambda: store.fs.put_file(tmp, full), store.cfg.retries)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def read_shard(store: RunStore, file_key: str, local: int, n_contexts: int) -> tuple[list[str], list[int], list[np.ndarray]]:
    """The first `n_contexts` contexts of local shard `local` of a staged file: doc ids, offsets, token ids."""
    path = store.path(tokens_key(file_key))

    def read() -> pa.Table:
        with store.fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(local)

    try:
        table = with_retries(f"read {tokens_key(file_key)}", read, store.cfg.retries)
    except Exception as err:
        raise OSError(f"cannot read local shard {local} of staged tokens {path}: {err}") from err
    if table.num_rows < n_contexts:
        raise OSError(f"{path} row group {local} has {table.num_rows} contexts, the plan needs {n_contexts}")
    table = table.slice(0, n_contexts)
    tok = table.column("token_ids").combine_chunks()
    flat = tok.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    offsets = tok.offsets.to_numpy()
    token_ids = [flat[offsets[i]:offsets[i + 1]] for i in range(n_contexts)]
    return table.column("doc_id").to_pylist(), table.column("doc_offset").to_pylist(), token_ids


def clear_staging(store: RunStore) -> None:
    """Remove the run's token staging area (every staged file's shards are committed)."""
    path = store.path(TOKENS_DIR)
    try:
        with_retries("remove the token staging area", lambda: store.fs.rm(path, recursive=True), store.cfg.retries)
    except FileNotFoundError:
        pass
    except OSError as e:  # left-overs cost storage only; the next clean run end removes them
        log.warning(f"could not remove the token staging area {path} ({e})")
    store.fs.invalidate_cache(path)

"""Tokenize once: a disk cache of each corpus file's packed contexts, replayed in the same order.

`cached_file_items` (what the tokenize tasks read every file through, pipeline/runtime/staging.py)
yields what `pack_documents(read_documents(file))` yields, contexts and quarantined records in
stream order, from the cache when an entry covers it. `cached_plan_shards` has
`pipeline.data.packing.plan_shards`'s signature and yields identical `Shard` objects (tests).
The cache lives with the workers: under `corpus.token_cache` on the node a tokenize task runs
on (default `./.cache/tokens`, made absolute by the driver; null turns it off), so sweep members
on one node share it. The run's own staging area (`_tokens/` on the sink) is what the harvest
workers read; this cache only saves tokenizing.

Why per FILE, not per corpus: packing never crosses files and every file starts a new shard
(pipeline/data/packing.py), so a file's local shards are a pure function of
(file url + fingerprint, reading settings, tokenizer, ctx_len, shard_size). A nightly run that
adds files then re-tokenizes only the new ones, and sweep members that share the corpus,
tokenizer and ctx_len reuse every file. Shard ids are assigned at replay time
(`first shard of the file + local index`), exactly as plan_shards does.

Layout of one entry, `<token_cache>/<key>/`, written to a temp folder and renamed into place
when complete, so a crash or a concurrent sweep member never leaves a half entry:
    meta.json               key inputs, complete flag, n_shards, tokens, quarantined records
    shard=NNNNNN.npz        local shard NNNNNN: tokens (flat int32), lengths, doc_offsets, doc_ids

`corpus.max_tokens` can stop packing inside a file (`cap`). That file's entry is then partial
(`complete: false`, holding the contexts packed so far, which are a prefix of the file's full
packing); a later read reuses it only when the cached tokens reach that read's cap too.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pipeline.config import CorpusConfig
from pipeline.data.corpus import CorpusFile, Quarantined, read_documents
from pipeline.data.packing import Context, Shard, _log_quarantine, cap_tokens, file_shards, pack_documents

FORMAT_VERSION = 1  # bump when the entry layout or the packing rules change

# Counters for this process (tests and logs): entries reused, files tokenized.
stats = {"hits": 0, "misses": 0}


_identities: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_identity(tokenizer) -> str:
    """A digest of everything that decides token ids: the full fast-tokenizer definition.
    Memoized per tokenizer object: a tokenize task's process stages many files, and the
    definition is megabytes."""
    try:
        return _identities[tokenizer]
    except (KeyError, TypeError):
        pass
    digest = _tokenizer_digest(tokenizer)
    try:
        _identities[tokenizer] = digest
    except TypeError:  # not weak-referenceable: just recompute next time
        pass
    return digest


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:  # slow tokenizers: name, vocabulary and special tokens
        body = json.dumps([getattr(tokenizer, "name_or_path", ""), sorted(tokenizer.get_vocab().items())])
    extra = json.dumps([type(tokenizer).__name__, tokenizer.eos_token_id])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def file_key(file: CorpusFile, cfg: CorpusConfig, tok_id: str, eos_id: int | None) -> tuple[str, dict]:
    """The entry name for one file and the inputs it was derived from (kept in meta.json)."""
    inputs = {
        "version": FORMAT_VERSION, "url": file.url, "fingerprint": file.fingerprint, "format": file.format,
        "id_field": file.id_field or cfg.id_field, "text_field": cfg.text_field, "read_chars": cfg.read_chars,
        "tokenizer": tok_id, "eos_id": eos_id, "ctx_len": cfg.ctx_len, "shard_size": cfg.shard_size,
    }
    if file.format == "jsonl":  # which lines are quarantined as too long (only JSONL, so other keys stay)
        inputs["max_doc_bytes"] = cfg.max_doc_bytes
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:32]
    return digest, inputs


def _save_shard(folder: Path, local: int, contexts: list[Context]) -> None:
    lengths = np.array([len(c.token_ids) for c in contexts], dtype=np.int32)
    tokens = np.concatenate([c.token_ids for c in contexts]).astype(np.int32, copy=False)
    np.savez(folder / f"shard={local:06d}.npz", tokens=tokens, lengths=lengths,
             doc_offsets=np.array([c.doc_offset for c in contexts], dtype=np.int64),
             doc_ids=np.array([c.doc_id for c in contexts], dtype=str))  # unicode array: no pickle


def _load_shard(folder: Path, local: int) -> list[Context]:
    with np.load(folder / f"shard={local:06d}.npz", allow_pickle=False) as z:
        tokens, lengths, offsets, doc_ids = z["tokens"], z["lengths"], z["doc_offsets"], z["doc_ids"]
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return [Context(str(doc_ids[i]), int(offsets[i]), tokens[bounds[i]:bounds[i + 1]]) for i in range(len(lengths))]


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _usable(meta: dict | None, budget: int | None) -> bool:
    """Complete entries always; partial ones when they hold at least the tokens this plan needs."""
    if meta is None:
        return False
    return meta["complete"] or (budget is not None and meta["tokens"] >= budget)


def _replay(folder: Path, meta: dict) -> Iterator[Context | Quarantined]:
    """The entry's contexts and quarantined records, in the order packing produced them."""
    pending_q = sorted(meta["quarantined"], key=lambda q: q["before_context"])
    seen = 0  # contexts replayed so far in this file
    for local in range(meta["n_shards"]):
        for ctx in _load_shard(folder, local):
            while pending_q and pending_q[0]["before_context"] <= seen:
                q = pending_q.pop(0)
                yield Quarantined(q["file"], q["location"], q["reason"])
            yield ctx
            seen += 1
    for q in pending_q:  # quarantined after the file's last context
        yield Quarantined(q["file"], q["location"], q["reason"])


def _pack_and_store(root: Path | None, key: str, inputs: dict, file: CorpusFile, cfg: CorpusConfig, tokenizer,
                    eos_id, storage_options, cap: int | None) -> Iterator[Context | Quarantined]:
    """pack_documents over one file, up to `cap` tokens, writing each local shard to a temp
    entry as it goes; the entry is renamed into place once the consumer has read it all."""
    size = cfg.shard_size
    tmp = None
    if root is not None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=root))
    quarantined: list[dict] = []
    local, contexts, seen, complete = 0, [], 0, True
    file_tokens = 0
    packed = pack_documents(read_documents(file, cfg, storage_options), tokenizer, cfg.ctx_len, eos_id)
    try:
        for item in packed:
            if isinstance(item, Quarantined):
                quarantined.append({"before_context": seen, "file": item.file, "location": item.location,
                                    "reason": item.reason})
                yield item
                continue
            contexts.append(item)
            seen += 1
            file_tokens += len(item.token_ids)
            stop = cap is not None and file_tokens >= cap
            if len(contexts) == size or stop:
                if tmp is not None:
                    _save_shard(tmp, local, contexts)
                local, contexts = local + 1, []
            yield item
            if stop:
                complete = False
                packed.close()  # closes the file now, not at garbage collection
                break
        if contexts:
            if tmp is not None:
                _save_shard(tmp, local, contexts)
            local += 1
        if tmp is not None:
            meta = {**inputs, "complete": complete, "n_shards": local, "contexts": seen, "tokens": file_tokens,
                    "quarantined": quarantined}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
            final = root / key
            other = _read_meta(final)
            # Replace only a shorter partial entry; an equal or longer one (a concurrent sweep
            # member's) holds the same contexts and may be being read right now.
            if other is not None and (other["complete"] or other["tokens"] >= file_tokens):
                pass
            else:
                shutil.rmtree(final, ignore_errors=True)
                try:
                    os.replace(tmp, final)
                    tmp = None
                except OSError:
                    pass  # someone else renamed theirs in first; theirs is identical
    finally:
        if tmp is not None:  # not completed (consumer stopped early, error): leave no trace
            shutil.rmtree(tmp, ignore_errors=True)


def cached_file_items(file: CorpusFile, cfg: CorpusConfig, tokenizer, eos_id: int | None,
                      storage_options: dict | None = None, cap: int | None = None,
                      tok_id: str | None = None) -> tuple[bool, Iterator[Context | Quarantined]]:
    """One file's packed contexts and quarantined records in stream order (what
    `pack_documents(read_documents(file))` yields), stopping after the context that reaches
    `cap` tokens; served from the cache when an entry covers it. Returns (cache hit, items).
    The tokenize tasks (pipeline/runtime/staging.py) read every file through this."""
    if cfg.shard_size <= 0:
        raise ValueError(f"corpus.shard_size={cfg.shard_size} must be positive")
    if cfg.ctx_len <= 0:
        raise ValueError(f"ctx_len={cfg.ctx_len} must be positive (corpus.ctx_len)")
    root = Path(cfg.token_cache) if cfg.token_cache else None
    if root is not None and tok_id is None:
        tok_id = tokenizer_identity(tokenizer)
    key, inputs = file_key(file, cfg, tok_id or "", eos_id)
    folder = root / key if root is not None else None
    meta = _read_meta(folder) if folder is not None else None
    if _usable(meta, cap):
        stats["hits"] += 1
        return True, cap_tokens(_replay(folder, meta), cap)
    stats["misses"] += 1
    return False, _pack_and_store(root, key, inputs, file, cfg, tokenizer, eos_id, storage_options, cap)


def cached_plan_shards(files: list[CorpusFile], cfg: CorpusConfig, tokenizer, eos_id: int | None,
                       storage_options: dict | None = None,
                       on_quarantine: Callable[[Quarantined], None] = _log_quarantine,
                       first_shard: int = 0) -> Iterator[Shard]:
    """`pipeline.data.packing.plan_shards` with a per-file token cache (see module docstring)."""
    tok_id = tokenizer_identity(tokenizer) if cfg.token_cache else ""
    next_shard, tokens = first_shard, 0
    for fi, file in enumerate(files):
        budget = None if cfg.max_tokens is None else cfg.max_tokens - tokens
        _, items = cached_file_items(file, cfg, tokenizer, eos_id, storage_options, cap=budget, tok_id=tok_id)
        for shard in file_shards(items, next_shard, cfg.shard_size, fi, file.url, on_quarantine):
            tokens += sum(len(c.token_ids) for c in shard.contexts)
            next_shard = shard.shard_id + 1
            yield shard
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            return

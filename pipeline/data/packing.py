"""Tokenize documents and pack them into fixed-length contexts, grouped into shards.

Packing (per file): each document is tokenized without special tokens, EOS is appended after
its last piece, the file's documents are concatenated into one token stream and the stream is
cut into contexts of exactly `ctx_len` tokens; only the file's last context may be shorter
(ragged, never padded). A context is labelled with the document of its first token and that
token's offset in the document (EOS counts as the document's last token).

Shard plan (identity, see docs/DESIGN.md "Identity and exactly-once"):
- `seq_id` numbers contexts in corpus order and `shard = seq_id // shard_size`, always.
- Each FILE starts a new shard: its first seq_id is the next multiple of `shard_size`, so the
  last shard of a file may be partial and seq_ids have gaps there. The point: a file appended
  by a nightly run only adds new shards; it can never change or renumber an existing one.
  Planning only the new files with `first_shard=<next free shard>` gives the same shards as
  planning the whole corpus again.
- `corpus.max_tokens` stops the plan at the first context boundary at or after that many
  tokens (the plan may exceed it by less than one context, never stops short of it).

Memory: only the current batch of document pieces and the current shard are held. In a run,
this code executes in the tokenize tasks (pipeline/runtime/staging.py, one per corpus file, via
the token cache), never in the driver: the driver assigns the shard ids of this plan from the
tasks' counts (pipeline/runtime/driver.py `plan_run`), with the same results as `plan_shards`
(tests/test_driver_tokenize.py).
"""
from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.config import CorpusConfig
from pipeline.data.corpus import CorpusFile, Quarantined, TextPiece, read_documents

log = logging.getLogger(__name__)

# Pieces are tokenized in batches (one fast-tokenizer call on a list) up to these limits.
BATCH_CHARS = 1 << 20
BATCH_PIECES = 512


@dataclass
class Context:
    doc_id: str
    doc_offset: int  # offset of token_ids[0] within its document's tokens
    token_ids: np.ndarray  # int32, length ctx_len except for a file's last context


@dataclass
class Shard:
    shard_id: int
    seq_start: int  # seq_id of contexts[0]; contexts[i] has seq_id seq_start + i
    file_index: int  # index into the resolved file list
    file_url: str
    contexts: list[Context]


class _Stream:
    """The token stream of one file: segments (doc_id, offset, tokens) not yet in a context."""

    def __init__(self, ctx_len: int):
        self.ctx_len = ctx_len
        self.segs: deque[list] = deque()  # [doc_id, doc_offset, np.ndarray]
        self.n = 0

    def push(self, doc_id: str, offset: int, ids: np.ndarray) -> None:
        if len(ids):
            self.segs.append([doc_id, offset, ids])
            self.n += len(ids)

    def pop(self, final: bool = False) -> Iterator[Context]:
        while self.n >= self.ctx_len or (final and self.n > 0):
            want = min(self.ctx_len, self.n)
            doc_id, offset = self.segs[0][0], self.segs[0][1]
            parts, got = [], 0
            while got < want:
                seg = self.segs[0]
                take = min(want - got, len(seg[2]))
                parts.append(seg[2][:take])
                got += take
                if take == len(seg[2]):
                    self.segs.popleft()
                else:  # the rest of this segment starts the next context
                    seg[1] += take
                    seg[2] = seg[2][take:]
            self.n -= want
            yield Context(doc_id, offset, np.concatenate(parts).astype(np.int32, copy=False))


def _tokenize(tokenizer, texts: list[str]) -> list[list[int]]:
    # verbose=False: long documents are expected; no "longer than model_max_length" warning.
    enc = tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)
    return enc["input_ids"]


def pack_documents(items: Iterable[TextPiece | Quarantined], tokenizer, ctx_len: int,
                   eos_id: int | None) -> Iterator[Context | Quarantined]:
    """Pack one file's document pieces into contexts; Quarantined items pass through in order."""
    if ctx_len <= 0:
        raise ValueError(f"ctx_len={ctx_len} must be positive (corpus.ctx_len)")
    stream = _Stream(ctx_len)
    batch: list[TextPiece] = []
    chars = 0
    doc_pos = 0  # tokens of the current document already pushed

    def flush() -> Iterator[Context]:
        nonlocal doc_pos
        ids_list = _tokenize(tokenizer, [p.text for p in batch]) if batch else []
        for piece, ids in zip(batch, ids_list):
            if piece.first:
                doc_pos = 0
            arr = np.asarray(ids, dtype=np.int32)
            if piece.last and eos_id is not None:
                arr = np.append(arr, np.int32(eos_id))
            stream.push(piece.doc_id, doc_pos, arr)
            doc_pos += len(arr)
        batch.clear()
        yield from stream.pop()

    for item in items:
        if isinstance(item, Quarantined):
            yield from flush()
            yield item
            continue
        batch.append(item)
        chars += len(item.text)
        if chars >= BATCH_CHARS or len(batch) >= BATCH_PIECES:
            yield from flush()
            chars = 0
    yield from flush()
    yield from stream.pop(final=True)


def _log_quarantine(q: Quarantined) -> None:
    log.warning("quarantined %s (%s): %s", q.file, q.location, q.reason)


def plan_shards(files: list[CorpusFile], cfg: CorpusConfig, tokenizer, eos_id: int | None,
                storage_options: dict | None = None,
                on_quarantine: Callable[[Quarantined], None] = _log_quarantine,
                first_shard: int = 0) -> Iterator[Shard]:
    """Stream the shard plan: files in order, each starting a new shard (see module docstring).

    `first_shard` is the shard id the first file starts at (0 for a whole corpus; the next free
    shard when planning only files appended since an earlier run).
    """
    if cfg.shard_size <= 0:
        raise ValueError(f"corpus.shard_size={cfg.shard_size} must be positive")
    next_shard, tokens = first_shard, 0
    for fi, file in enumerate(files):
        budget = None if cfg.max_tokens is None else cfg.max_tokens - tokens
        items = cap_tokens(pack_documents(read_documents(file, cfg, storage_options), tokenizer, cfg.ctx_len, eos_id),
                           budget)
        for shard in file_shards(items, next_shard, cfg.shard_size, fi, file.url, on_quarantine):
            tokens += sum(len(c.token_ids) for c in shard.contexts)
            next_shard = shard.shard_id + 1
            yield shard
        if cfg.max_tokens is not None and tokens >= cfg.max_tokens:
            return


def cap_tokens(items: Iterator[Context | Quarantined], cap: int | None) -> Iterator[Context | Quarantined]:
    """Stop after the context that reaches `cap` tokens (`corpus.max_tokens`'s cut), closing the
    source then (its file now, not at garbage collection)."""
    tokens = 0
    try:
        for item in items:
            yield item
            if isinstance(item, Context):
                tokens += len(item.token_ids)
                if cap is not None and tokens >= cap:
                    return
    finally:
        close = getattr(items, "close", None)
        if close is not None:
            close()


def file_shards(items: Iterable[Context | Quarantined], first_shard: int, size: int, file_index: int, url: str,
                on_quarantine: Callable[[Quarantined], None]) -> Iterator[Shard]:
    """One file's contexts grouped into shards of `size` from `first_shard` on (the last may be
    partial); quarantined items go to `on_quarantine` in stream order."""
    shard_id, contexts = first_shard, []
    for item in items:
        if isinstance(item, Quarantined):
            on_quarantine(item)
            continue
        contexts.append(item)
        if len(contexts) == size:
            yield Shard(shard_id, shard_id * size, file_index, url, contexts)
            shard_id, contexts = shard_id + 1, []
    if contexts:
        yield Shard(shard_id, shard_id * size, file_index, url, contexts)

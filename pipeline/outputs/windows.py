"""Example windows, cut where they are read (issue 23): the one window reader every consumer uses.

The `examples` table stores each example by reference (`latent_id, kind, rank, seq_id, pos, act`);
the contexts are stored once per run (`contexts/`), and a window is a slice of a context row.
The window rule is recorded once, in the examples part's schema metadata (`window_metadata`):

    W = window, before = W // 2, after = W - W // 2 - 1
    start = clamp(pos - before, 0, max(len - W, 0)), tokens [start, min(start + W, len))

i.e. `before` tokens before the example's position and `after` after it, shifted (not cut) at a
context edge so the window keeps W tokens when the context has them. A window's acts are the
example's latent's activations at those positions, from `latents/` (0 where it is not active;
random examples: 0 everywhere, by construction).

`read_windows(store, hook, examples)` returns the examples with `start`, `token_ids` and `acts`
added. Vectorised: the rows are grouped by contexts shard, each needed contexts shard (and, for
the acts, the hookpoint's latents part of that shard) is read once, and the windows are numpy
gathers over the shard's flat `token_ids` values and the latents' k-lists; no Python per example.
Memory: the given rows' windows plus one shard's parts. Examples parts written before issue 23
(with `token_ids` and `acts` columns) are returned as stored.

`cut_windows` is the same cut for any (seq_id, pos) rows and window shape; the demo's printout
uses it with its own before/after (clipped, not shifted).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline.outputs.layout import EXAMPLES_WINDOW_KEYS, contexts_key, latents_key
from pipeline.outputs.sink import RunStore

POS_BITS = 24  # (seq_id, pos) packed into one int64 key: seq_id << POS_BITS | pos
CELLS_PER_PASS = 1 << 20  # window cells matched against the k-lists at once (x k int32 compares)


def window_start(pos, length, window: int):
    """The examples' rule: start = clamp(pos - window // 2, 0, max(length - window, 0))."""
    return np.clip(np.asarray(pos) - window // 2, 0, np.maximum(np.asarray(length) - window, 0))


def window_metadata(window: int) -> dict[bytes, bytes]:
    """What the examples part records once about its windows (schema metadata)."""
    key_w, key_b, key_a, key_rule = EXAMPLES_WINDOW_KEYS
    return {key_w: str(window).encode(), key_b: str(window // 2).encode(), key_a: str(window - window // 2 - 1).encode(),
            key_rule: b"start = clamp(pos - before, 0, max(len - window, 0)); tokens [start, min(start + window, len))"}


def examples_window(schema: pa.Schema) -> int | None:
    """The window length an examples part records (None: no record, e.g. a table built by hand)."""
    raw = (schema.metadata or {}).get(EXAMPLES_WINDOW_KEYS[0])
    return int(raw) if raw is not None else None


def is_by_reference(schema: pa.Schema) -> bool:
    """False for an examples part written before issue 23 (it stores `token_ids` and `acts`)."""
    return "token_ids" not in schema.names


@dataclass
class ContextShard:
    """One committed contexts shard as flat arrays: rows in seq_id order, row r's tokens are
    values[offsets[r]:offsets[r + 1]]."""
    seq: np.ndarray
    offsets: np.ndarray
    values: np.ndarray

    @classmethod
    def read(cls, store: RunStore, shard: int) -> ContextShard:
        t = store.read_committed_part(shard, contexts_key(shard), ["seq_id", "token_ids"])
        tok = t["token_ids"].combine_chunks()
        offsets = tok.offsets.to_numpy().astype(np.int64)
        values = tok.values.to_numpy()[offsets[0]:offsets[-1]] if len(tok) else np.zeros(0, np.int32)
        offsets = offsets - offsets[0]
        seq = t["seq_id"].to_numpy()
        if not np.all(seq[1:] > seq[:-1]):  # rows in seq_id order (the writer's order; checked)
            order = np.argsort(seq, kind="stable")
            lens = np.diff(offsets)[order]
            values = values[ragged_index(offsets[:-1][order], lens)]
            seq, offsets = seq[order], np.concatenate([[0], np.cumsum(lens)])
        return cls(seq, offsets, values)

    def rows(self, seq_ids: np.ndarray, what: str) -> np.ndarray:
        row = np.searchsorted(self.seq, seq_ids)
        if np.any(row >= len(self.seq)) or np.any(self.seq[np.minimum(row, len(self.seq) - 1)] != seq_ids):
            raise OSError(f"{what} lacks a context that the rows read refer to")
        return row


def ragged_index(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """concat(arange(s, s + n) for s, n in zip(starts, lengths)), without a Python loop."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    firsts = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, np.int64) - firsts, lengths) + np.arange(total, dtype=np.int64)


def _latent_acts(store: RunStore, hook: str, shard: int, seq: np.ndarray, start: np.ndarray, wlen: np.ndarray,
                 lat: np.ndarray) -> np.ndarray:
    """float32 acts of latent lat[i] at (seq[i], start[i] + j), j < wlen[i], flat, from the shard's
    latents part (one read; rows found by a sorted (seq_id, pos) key; 0 where not active)."""
    t = store.read_committed_part(shard, latents_key(hook, shard), ["seq_id", "pos", "latent_ids", "acts"])
    ids_col, acts_col = t["latent_ids"].combine_chunks(), t["acts"].combine_chunks()
    k = ids_col.type.list_size
    ids = ids_col.flatten().to_numpy().reshape(-1, k)
    vals = acts_col.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    key = (t["seq_id"].to_numpy().astype(np.int64) << POS_BITS) | t["pos"].to_numpy().astype(np.int64)
    order = None
    if not np.all(key[1:] > key[:-1]):
        order = np.argsort(key, kind="stable")
        key = key[order]
    cell_seq = np.repeat(seq, wlen)
    cell_pos = ragged_index(start, wlen)
    cell_lat = np.repeat(lat, wlen)
    out = np.zeros(len(cell_pos), np.float32)
    for c0 in range(0, len(cell_pos), CELLS_PER_PASS):
        c = slice(c0, c0 + CELLS_PER_PASS)
        want = (cell_seq[c].astype(np.int64) << POS_BITS) | cell_pos[c]
        r = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))
        if not len(key):
            continue
        found = key[r] == want
        if order is not None:
            r = order[r]
        hit = ids[r] == cell_lat[c][:, None]
        col = hit.argmax(axis=1)
        a = vals[r, col]
        a = np.where(found & hit[np.arange(len(r)), col] & (a > 0), a, 0).astype(np.float32)
        twice = np.flatnonzero(hit.sum(axis=1) > 1)  # a latent twice at one position (never from a top-k): the max
        if len(twice):
            v = np.where(hit[twice] & found[twice, None], vals[r[twice]], 0).astype(np.float32)
            a[twice] = np.maximum(v.max(axis=1), 0)
        out[c] = a
    return out


def cut_windows(store: RunStore, seq: np.ndarray, pos: np.ndarray, shard_size: int, before: int, after: int,
                shift: bool = True, hook: str | None = None, latent: np.ndarray | None = None):
    """(start, offsets, tokens, acts) of the windows at (seq[i], pos[i]): `before` tokens before pos,
    `after` after it; at a context edge the window is shifted to keep before + after + 1 tokens
    (shift=True, the examples' rule) or clipped (shift=False). `offsets` [m + 1] int32 delimit each
    window's tokens in `tokens` (int32) and, given `hook` and `latent`, its acts (float32, that
    latent's activations from latents/; else None). One read of each needed contexts shard (and
    latents part), in shard order; the result in the rows' own order."""
    seq, pos = np.asarray(seq, np.int64), np.asarray(pos, np.int64)
    m, W = len(seq), before + after + 1
    with_acts = hook is not None and latent is not None
    start, wlen = np.zeros(m, np.int64), np.zeros(m, np.int64)
    order = np.argsort(seq, kind="stable")
    shards, cuts = np.unique(seq[order] // shard_size, return_index=True)
    tok_parts, act_parts = [], []
    for shard, members in zip(shards.tolist(), np.split(order, cuts[1:]) if m else []):
        ctx = ContextShard.read(store, shard)
        row = ctx.rows(seq[members], store.path(contexts_key(shard)))
        length = ctx.offsets[row + 1] - ctx.offsets[row]
        p = pos[members]
        if shift:
            st = np.clip(p - before, 0, np.maximum(length - W, 0))  # before = W // 2: window_start
            ln = np.minimum(W, length)
        else:
            st = np.maximum(p - before, 0)
            ln = np.maximum(np.minimum(p + after + 1, length) - st, 0)
        start[members], wlen[members] = st, ln
        tok_parts.append(ctx.values[ragged_index(ctx.offsets[row] + st, ln)])
        if with_acts:
            act_parts.append(_latent_acts(store, hook, shard, seq[members], st, ln, np.asarray(latent)[members]))
    # the windows come out in shard (seq-sorted) order: one ragged gather puts them in row order
    sorted_len = wlen[order]
    sorted_off = np.cumsum(sorted_len) - sorted_len
    where = np.empty(m, np.int64)
    where[order] = sorted_off
    back = ragged_index(where, wlen)
    offsets = np.concatenate([[0], np.cumsum(wlen)]).astype(np.int32)
    tokens = np.concatenate(tok_parts)[back] if tok_parts else np.zeros(0, np.int32)
    acts = (np.concatenate(act_parts)[back] if act_parts else np.zeros(0, np.float32)) if with_acts else None
    return start, offsets, tokens.astype(np.int32, copy=False), acts


def read_windows(store: RunStore, hook: str, examples: pa.Table, shard_size: int | None = None,
                 window: int | None = None, acts: bool = True) -> pa.Table:
    """`examples` (rows of an examples part, any subset and order) with `start` int32,
    `token_ids` list<int32> and `acts` list<float32> (the old examples columns) added: the
    window rule recorded in the part's metadata (or `window`), cut by `cut_windows`.
    A part written before issue 23 already has token_ids and acts: returned as stored."""
    if not is_by_reference(examples.schema):
        return examples
    W = window or examples_window(examples.schema)
    if W is None:
        raise ValueError("examples without a recorded window (schema metadata b'window'): pass window=")
    if shard_size is None:
        shard_size = int(store.read_json("manifest.json")["shard_size"])
    start, offsets, tokens, win_acts = cut_windows(
        store, examples["seq_id"].to_numpy(), examples["pos"].to_numpy(), shard_size, W // 2, W - W // 2 - 1,
        hook=hook if acts else None, latent=examples["latent_id"].to_numpy() if acts else None)
    off = pa.array(offsets, pa.int32())
    out = examples.append_column("start", pa.array(start.astype(np.int32)))
    out = out.append_column("token_ids", pa.ListArray.from_arrays(off, pa.array(tokens, pa.int32())))
    if acts:
        out = out.append_column("acts", pa.ListArray.from_arrays(off, pa.array(win_acts, pa.float32())))
    return out

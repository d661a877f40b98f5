"""The harvest worker: owns the model and the SAEs, turns one shard into committed Parquet.

`ShardWorker` is a plain class (usable in-process and in tests); `pipeline.runtime.driver` wraps it as a
Ray actor, one per GPU (or per CPU slot). Per shard:

    contexts -> forward to the deepest hookpoint -> top-k encode per hookpoint
             -> contexts/ and latents/ parts -> commit marker (last)
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import FaultConfig
from pipeline.model.harvest import Harvester
from pipeline.outputs.layout import (
    CONTEXTS_SCHEMA,
    LATENTS_PARQUET,
    acts_overflow,
    commit_key,
    contexts_key,
    latents_key,
    latents_table,
)
from pipeline.outputs.sink import RunStore
from pipeline.sae.sae import SAE

log = logging.getLogger(__name__)


@dataclass
class ShardPayload:
    """What the driver sends: the shard's packed contexts, nothing else."""

    shard_id: int
    seq_start: int
    doc_ids: list[str]
    doc_offsets: list[int]
    token_ids: list[np.ndarray]  # int32, each <= ctx_len long


@dataclass
class ShardResult:
    shard_id: int
    contexts: int
    tokens: int
    pairs: int
    bytes: int
    seconds: float
    skipped: bool = False
    node: str = ""  # the Ray node that did it (set by the actor)
    acts_overflow: int = 0  # activations beyond the stored dtype's range (saturated, not inf)


class ShardWorker:
    def __init__(
        self,
        model: torch.nn.Module,
        saes: dict[str, SAE],
        store: RunStore,
        batch_size: int = 16,
        device: str = "cpu",
        faults: FaultConfig | None = None,
        acts_dtype: str = "float16",
    ):
        self.model = model
        self.acts_dtype = acts_dtype
        self.faults = faults or FaultConfig()
        # Compute is serialized; writing a finished shard is not, so with two calls in flight
        # (a threaded actor) the next shard's forward overlaps this shard's Parquet upload.
        self._compute = threading.Lock()
        self.saes = saes
        self.store = store
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.harvester = Harvester(model, list(saes))

    def _batches(self, payload: ShardPayload):
        """Contexts grouped by length (full ones together, the ragged last one alone): no padding."""
        order = sorted(range(len(payload.token_ids)), key=lambda i: (-len(payload.token_ids[i]), i))
        batch: list[int] = []
        for i in order:
            if batch and (len(batch) == self.batch_size or len(payload.token_ids[batch[0]]) != len(payload.token_ids[i])):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    def encode_shard(self, payload: ShardPayload) -> dict[str, tuple[np.ndarray, np.ndarray, torch.Tensor, torch.Tensor]]:
        """Per hookpoint: (seq_ids, positions, values [T, k], ids [T, k]) in (seq_id, pos) order."""
        parts: dict[str, list] = {h: [] for h in self.saes}
        for batch in self._batches(payload):
            input_ids = torch.from_numpy(np.stack([payload.token_ids[i] for i in batch]).astype(np.int64)).to(self.device)
            acts = self.harvester(input_ids)
            n, t = input_ids.shape
            seq = np.repeat(np.asarray([payload.seq_start + i for i in batch], dtype=np.int64), t)
            pos = np.tile(np.arange(t, dtype=np.int32), n)
            for hook, sae in self.saes.items():
                values, ids = sae.encode(acts[hook].reshape(n * t, -1))
                parts[hook].append((seq, pos, values.cpu(), ids.cpu()))
        out = {}
        for hook, chunks in parts.items():
            seq = np.concatenate([c[0] for c in chunks])
            pos = np.concatenate([c[1] for c in chunks])
            order = np.lexsort((pos, seq))  # batches ran longest-first; store in corpus order
            values = torch.cat([c[2] for c in chunks])[torch.from_numpy(order)]
            ids = torch.cat([c[3] for c in chunks])[torch.from_numpy(order)]
            out[hook] = (seq[order], pos[order], values, ids)
        return out

    def _maybe_crash(self, shard_id: int, point: str) -> None:
        f = self.faults
        if f.crash_shard != shard_id or f.crash_point != point:
            return
        if f.once_marker:
            if os.path.exists(f.once_marker):
                return
            open(f.once_marker, "w").close()
        log.warning(f"[fault] worker pid {os.getpid()} dies at shard {shard_id} ({point})")
        logging.shutdown()  # flush before the hard exit
        os._exit(17)

    def process(self, payload: ShardPayload) -> ShardResult:
        started = time.perf_counter()
        if self.store.exists(commit_key(payload.shard_id)):
            # Already committed (a retried task after the first attempt finished): do nothing.
            return ShardResult(payload.shard_id, 0, 0, 0, 0, 0.0, skipped=True)
        with self._compute:
            encoded = self.encode_shard(payload)
        self._maybe_crash(payload.shard_id, "before_parts")
        n = len(payload.token_ids)
        contexts = pa.Table.from_arrays(
            [
                pa.array(np.arange(payload.seq_start, payload.seq_start + n, dtype=np.int64)),
                pa.array(payload.doc_ids, type=pa.string()),
                pa.array(payload.doc_offsets, type=pa.int32()),
                pa.array([np.asarray(t, dtype=np.int32) for t in payload.token_ids], type=pa.list_(pa.int32())),
            ],
            schema=CONTEXTS_SCHEMA,
        )
        files = [self.store.write_table(contexts_key(payload.shard_id), contexts)]
        pairs = 0
        overflow = {h: acts_overflow(v, self.acts_dtype) for h, (_, _, v, _) in encoded.items()}
        if any(overflow.values()):
            log.warning(f"shard {payload.shard_id}: activations beyond the {self.acts_dtype} range stored "
                        f"saturated: {overflow} (output.acts_dtype=float32 stores them exactly)")
        for hook, (seq, pos, values, ids) in encoded.items():
            table = latents_table(seq, pos, values, ids, self.acts_dtype)
            files.append(self.store.write_table(latents_key(hook, payload.shard_id), table, **LATENTS_PARQUET))
            pairs += ids.numel()
        tokens = int(sum(len(t) for t in payload.token_ids))
        self._maybe_crash(payload.shard_id, "after_parts")
        self.store.write_json(
            commit_key(payload.shard_id),
            {
                "shard": payload.shard_id,
                "seq_start": payload.seq_start,
                "contexts": n,
                "tokens": tokens,
                "files": [f.__dict__ for f in files],
                "acts_overflow": overflow,
            },
        )
        return ShardResult(
            payload.shard_id, n, tokens, pairs, sum(f.bytes for f in files), time.perf_counter() - started,
            acts_overflow=sum(overflow.values()),
        )

"""The harvest worker: owns the model and the SAEs, turns one shard into committed Parquet.

`ShardWorker` is a plain class (usable in-process and in tests); `pipeline.runtime.driver` wraps it as a
Ray actor, one per GPU (or per CPU slot). Per shard:

    contexts -> forward to the deepest hookpoint -> top-k encode per hookpoint
             -> contexts/ and latents/ parts -> commit marker (last)

Dictionaries are keyed by id (a hookpoint, or `crosscoder=NAME`); a crosscoder's input is its
sources' activations side by side (`concat_sources`), from the main model and/or resident
`model.checkpoints`, each model's forward run on the same contexts (runtime/sources.py).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

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
from pipeline.runtime.sources import dictionary_inputs, fvu_targets, needed_hookpoints
from pipeline.sae.fvu import fvu_stats, sample_indices
from pipeline.sae.latent_split import LatentSplitSAE
from pipeline.sae.sae import SAE

log = logging.getLogger(__name__)


@dataclass
class ShardTask:
    """What the driver sends: where the shard's contexts are staged, no tokens (runtime/staging.py).

    Contexts [0, n_contexts) of row group `local` of the staged file `tokens_key`; context i has
    seq_id seq_start + i."""

    shard_id: int
    seq_start: int
    tokens_key: str  # the staged file's key (pipeline.outputs.layout.tokens_key(tokens_key))
    local: int
    n_contexts: int
    source: str = ""  # the corpus file's URL: named when the shard kills its worker


@dataclass
class ShardPayload:
    """A shard's packed contexts, as the worker computes on them (read from the staging area)."""

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
    fvu: dict = field(default_factory=dict)  # hookpoint -> pipeline.sae.fvu record (sae.fvu_sample > 0)
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
        fvu_sample: int = 0,
        acts_dtype: str = "float16",
        checkpoints: dict[str, torch.nn.Module] | None = None,
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
        self.fvu_sample = fvu_sample  # tokens per shard decoded for the FVU check (0: off)
        # `saes` is keyed by dictionary id (a hookpoint, or crosscoder=NAME: outputs/layout.py).
        # What each reads (and, for the FVU check, what its decode is compared with) as
        # (checkpoint, hookpoint) sources; one Harvester per model, each model's forward run on
        # the same contexts. Every checkpoint a crosscoder reads is resident (model.checkpoints).
        self.inputs = {d: dictionary_inputs(d, sae) for d, sae in saes.items()}
        self.targets = {d: fvu_targets(d, sae) for d, sae in saes.items()} if fvu_sample > 0 else {}
        models = {None: model, **(checkpoints or {})}
        wanted = [s for srcs in [*self.inputs.values(), *self.targets.values()] for s in srcs]
        self.harvesters = {ck: Harvester(models[ck], hooks) for ck, hooks in needed_hookpoints(wanted).items()}

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
        """Per hookpoint: (seq_ids, positions, values [T, k], ids [T, k]) in (seq_id, pos) order.

        Sets `self.last_fvu` (hookpoint -> FVU record) when `fvu_sample` > 0. A latent-split SAE
        gets the whole shard's activations at once (one object in Ray's object store, read by
        all its parts), encoded in the same row batches as the unsplit SAE would be."""
        parts: dict[str, list] = {h: [] for h in self.saes}
        split = {h for h, sae in self.saes.items() if isinstance(sae, LatentSplitSAE)}
        pending: dict[str, list[torch.Tensor]] = {h: [] for h in split}
        pending_keys: list[tuple[np.ndarray, np.ndarray]] = []
        # The FVU sample, as (context index -> sampled positions) in the shard's (seq_id, pos) order.
        lengths = np.asarray([len(t) for t in payload.token_ids], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        picked = sample_indices(int(starts[-1]), self.fvu_sample) if self.fvu_sample > 0 else np.empty(0, np.int64)
        picked_ctx = np.searchsorted(starts, picked, side="right") - 1
        sample_x: dict[str, list[tuple[np.ndarray, torch.Tensor]]] = {h: [] for h in self.saes}
        for batch in self._batches(payload):
            input_ids = torch.from_numpy(np.stack([payload.token_ids[i] for i in batch]).astype(np.int64)).to(self.device)
            acts = {(ck, h): a for ck, harvester in self.harvesters.items() for h, a in harvester(input_ids).items()}
            n, t = input_ids.shape
            seq = np.repeat(np.asarray([payload.seq_start + i for i in batch], dtype=np.int64), t)
            pos = np.tile(np.arange(t, dtype=np.int32), n)
            if len(picked):
                # Rows of this batch that are in the sample, and their index in shard order.
                in_batch = np.isin(picked_ctx, batch)
                row_of_ctx = {c: r for r, c in enumerate(batch)}
                rows = np.asarray([row_of_ctx[c] * t for c in picked_ctx[in_batch]], dtype=np.int64)
                rows += picked[in_batch] - starts[picked_ctx[in_batch]]
            for hook, sae in self.saes.items():
                x = concat_sources(acts, self.inputs[hook], n * t)
                if len(picked) and len(rows):
                    r = torch.from_numpy(rows)
                    y = concat_sources(acts, self.targets[hook], n * t)[r].cpu() if self.saes[hook].kind == "transcoder" else None
                    sample_x[hook].append((picked[in_batch], x[r].cpu(), y))
                if hook in split:
                    pending[hook].append(x.cpu())
                    continue
                values, ids = sae.encode(x)
                parts[hook].append((seq, pos, values.cpu(), ids.cpu()))
            if split:
                pending_keys.append((seq, pos))
        # Fault injection: part 0 of a split SAE dies while encoding this shard.
        f = self.faults
        crash = (f.once_marker or "") if (f.crash_point == "split_part" and f.crash_shard == payload.shard_id) else None
        for hook in split:
            if not pending[hook]:
                continue
            x = torch.cat(pending[hook])
            bounds = np.concatenate([[0], np.cumsum([len(c) for c in pending[hook]])]).tolist()
            values, ids = self.saes[hook].encode(x, bounds=bounds, crash_once=crash)
            parts[hook].append((np.concatenate([k[0] for k in pending_keys]),
                                np.concatenate([k[1] for k in pending_keys]), values, ids))
        out = {}
        for hook, chunks in parts.items():
            seq = np.concatenate([c[0] for c in chunks])
            pos = np.concatenate([c[1] for c in chunks])
            order = np.lexsort((pos, seq))  # batches ran longest-first; store in corpus order
            values = torch.cat([c[2] for c in chunks])[torch.from_numpy(order)]
            ids = torch.cat([c[3] for c in chunks])[torch.from_numpy(order)]
            out[hook] = (seq[order], pos[order], values, ids)
        self.last_fvu = {}
        for hook, samples in sample_x.items():
            if not samples:
                continue
            where = np.concatenate([w for w, _, _ in samples])
            order = torch.from_numpy(np.argsort(where, kind="stable"))
            x = torch.cat([x for _, x, _ in samples])[order]
            y = torch.cat([y for _, _, y in samples])[order] if samples[0][2] is not None else None
            sel = torch.from_numpy(np.sort(where))
            self.last_fvu[hook] = fvu_stats(self.saes[hook], x, out[hook][2][sel], out[hook][3][sel], target=y)
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

    def _maybe_hold(self, shard_id: int) -> None:
        f = self.faults
        if f.crash_shard != shard_id or f.crash_point != "hold" or not f.pid_file:
            return
        with open(f.pid_file, "a") as out:
            out.write(f"{os.getpid()}\n")
        log.warning(f"[fault] worker pid {os.getpid()} holds shard {shard_id}, waiting to be killed")
        time.sleep(600)  # a test that forgot to kill it fails on its own timeout, not here

    def process(self, payload: ShardTask | ShardPayload) -> ShardResult:
        started = time.perf_counter()
        if self.store.exists(commit_key(payload.shard_id)):
            # Already committed (a retried task after the first attempt finished): do nothing.
            return ShardResult(payload.shard_id, 0, 0, 0, 0, 0.0, skipped=True)
        if isinstance(payload, ShardTask):
            from pipeline.runtime.staging import read_shard

            doc_ids, offsets, token_ids = read_shard(self.store, payload.tokens_key, payload.local,
                                                     payload.n_contexts)
            payload = ShardPayload(payload.shard_id, payload.seq_start, doc_ids, offsets, token_ids)
        with self._compute:
            self._maybe_hold(payload.shard_id)
            encoded = self.encode_shard(payload)
            fvu = self.last_fvu
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
                **({"fvu": fvu} if fvu else {}),
                "acts_overflow": overflow,
            },
        )
        return ShardResult(
            payload.shard_id, n, tokens, pairs, sum(f.bytes for f in files), time.perf_counter() - started, fvu=fvu,
            acts_overflow=sum(overflow.values()),
        )


def concat_sources(acts: dict, sources: list, rows: int) -> torch.Tensor:
    """A dictionary's input [rows, m*d]: one source's activations as they are (no copy), several
    (a crosscoder) written into column slices of one preallocated buffer: one copy, never a
    concatenation of copies. Each block is normalized on its own later (`SAE.normalize`)."""
    if len(sources) == 1:
        return acts[sources[0]].reshape(rows, -1)
    first = acts[sources[0]]
    d = first.shape[-1]
    x = torch.empty(rows, len(sources) * d, dtype=first.dtype, device=first.device)
    for i, src in enumerate(sources):
        x[:, i * d:(i + 1) * d] = acts[src].reshape(rows, d)
    return x

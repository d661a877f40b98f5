"""The run's ledger: which corpus file owns which shards, kept in `_plan/file=NNNNNN.json`.

Each file gets an ordinal the first time a run sees it, and starts a new shard. Its record
(first and last shard, counts, quarantined documents; the driver knows them all once the file's
tokenize task has reported) is durable *before* any of its shards is submitted: the driver
saves the records of a batch of files in one write (`save_many`, one `_plan/log=NNNNNN.json`),
then submits their shards. Later runs of the same run id therefore:
- skip a finished file whose shards are all committed without reading it again;
- re-plan an unfinished file from the same first shard (deterministic, committed shards skipped);
- give new files the next ordinals and the shards after every known one (nightly incremental),
  whatever their names sort like;
- refuse a known file whose fingerprint changed (`corpus.on_changed_file=error`), or keep its
  earlier output and ignore the change (`skip`).
A shard id, once handed out, is never handed out again: each record also keeps the highest
shard id submitted for it (`reserved_shard`, saved *before* that shard is submitted), so a file
whose driver died mid-planning and which then vanished or changed still owns every id it may
have used; `next_shard` also stays above every committed shard (ledgers written before
`reserved_shard` existed).
A record is rewritten only when its content changes, so a run with nothing to do writes nothing.

Compaction (issue 14: planning reads the ledger in O(1) requests and runs in O(F) time):
- `_plan/ledger-NNNNNN.json` is a snapshot of every record (plus the ordinal/shard high-water
  marks); `_plan/log=NNNNNN.json` objects are the log: each a batch of records written since the
  snapshot (one PUT per batch; planning 100k new files is ~100 writes, not 200k), applied in
  sequence order. `_plan/file=NNNNNN.json` (one record each) is the log of older versions, read
  before the batches.
- Loading = one listing of `_plan/` + one GET of the newest snapshot + one GET per log object.
  A record in the log overrides the snapshot's (it is the same or newer).
- `compact()` (the driver calls it at run end, and only when the log is non-empty) writes the
  next snapshot, then deletes the log records and older snapshots. A crash in between leaves
  log records equal to the snapshot's: harmless, and compacted by the next run.
- Ledgers written before compaction existed (only `file=` records) load as an all-log ledger
  and are compacted by the first run of this version, after which start-up is O(1) requests.
- The running maxima of ordinals and shard ids are kept in memory, so `next_ordinal` and
  `next_shard` are O(1) (O(log F) amortized) and planning F new files is O(F log F) at worst,
  not O(F^2). Shard ids are exactly those the per-record ledger gave.
"""
from __future__ import annotations

import dataclasses
import heapq
import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from pipeline.outputs.layout import (
    LEDGER_LOG_PREFIX,
    LEDGER_SNAPSHOT_PREFIX,
    PLAN_DIR,
    ledger_log_key,
    ledger_snapshot_key,
)
from pipeline.outputs.sink import RunStore, with_retries

log = logging.getLogger(__name__)


@dataclass
class FileRecord:
    ordinal: int
    url: str
    fingerprint: str
    first_shard: int
    last_shard: int | None = None  # None until the file's last shard is known
    reserved_shard: int | None = None  # highest shard id ever submitted for this file
    contexts: int = 0
    tokens: int = 0
    complete: bool = False  # read to its end (not cut short by corpus.max_tokens)
    quarantined: list[dict] = field(default_factory=list)

    @property
    def n_shards(self) -> int:
        return 0 if self.last_shard is None else self.last_shard - self.first_shard + 1


def _highest_shard(r: FileRecord) -> int:
    known = r.last_shard if r.last_shard is not None else r.first_shard
    return max(known, r.reserved_shard if r.reserved_shard is not None else -1)


class Ledger:
    def __init__(self, store: RunStore):
        self.store = store
        self.records: dict[str, FileRecord] = {}
        self._max_ordinal = -1
        self._highest: dict[str, int] = {}
        self._counts: Counter[int] = Counter()
        self._heap: list[int] = []
        self.writes = 0  # durable log writes by this process (bench/driver.py, tests)
        prefix = store.path(PLAN_DIR)
        try:
            store.fs.invalidate_cache(prefix)
            names = [n.rstrip("/").rsplit("/", 1)[-1] for n in store.fs.ls(prefix, detail=False)]
        except FileNotFoundError:
            names = []
        snapshots = sorted((n for n in names if n.startswith(LEDGER_SNAPSHOT_PREFIX) and n.endswith(".json")),
                           key=lambda n: int(n[len(LEDGER_SNAPSHOT_PREFIX):-len(".json")]))
        self._snapshot_names = snapshots
        self._snapshot_seq = int(snapshots[-1][len(LEDGER_SNAPSHOT_PREFIX):-len(".json")]) if snapshots else -1
        if snapshots:
            snap = store.read_json(f"{PLAN_DIR}/{snapshots[-1]}")
            for d in snap["records"]:
                self._add(FileRecord(**d))
        # The log: records written since the snapshot (or the whole ledger of an older run):
        # per-record `file=` objects of older versions first, then the batches in write order.
        legacy = sorted(n for n in names if n.startswith("file=") and n.endswith(".json"))
        batches = sorted((n for n in names if n.startswith(LEDGER_LOG_PREFIX) and n.endswith(".json")),
                         key=lambda n: int(n[len(LEDGER_LOG_PREFIX):-len(".json")]))
        self._log = set(legacy) | set(batches)
        for name in legacy:
            self._add(FileRecord(**store.read_json(f"{PLAN_DIR}/{name}")))
        for name in batches:
            for d in store.read_json(f"{PLAN_DIR}/{name}")["records"]:
                self._add(FileRecord(**d))
        self._log_seq = int(batches[-1][len(LEDGER_LOG_PREFIX):-len(".json")]) if batches else -1
        self._written = {url: dataclasses.asdict(r) for url, r in self.records.items()}

    def _add(self, rec: FileRecord) -> None:
        self.records[rec.url] = rec
        self._max_ordinal = max(self._max_ordinal, rec.ordinal)
        # The highest shard over the records' *current* values (a finished empty file gives its
        # unused first shard back, as before compaction): a multiset + lazy max-heap, O(log F).
        old = self._highest.get(rec.url)
        new = _highest_shard(rec)
        if old == new:
            return
        if old is not None:
            self._counts[old] -= 1
        self._highest[rec.url] = new
        self._counts[new] += 1
        heapq.heappush(self._heap, -new)

    @property
    def _max_shard(self) -> int:
        while self._heap and self._counts[-self._heap[0]] <= 0:
            heapq.heappop(self._heap)
        return -self._heap[0] if self._heap else -1

    def in_order(self) -> list[FileRecord]:
        return sorted(self.records.values(), key=lambda r: r.ordinal)

    def next_ordinal(self) -> int:
        return 1 + self._max_ordinal

    def next_shard(self, committed_max: int = -1) -> int:
        """The first shard id above every id any record may have handed out, and above
        `committed_max` (the highest committed shard id)."""
        return 1 + max(committed_max, self._max_shard)

    def reserve(self, rec: FileRecord, shard_id: int) -> FileRecord:
        """Record durably that `shard_id` belongs to `rec`'s file; call before submitting it."""
        if rec.reserved_shard is not None and rec.reserved_shard >= shard_id:
            return rec
        rec = dataclasses.replace(rec, reserved_shard=shard_id)
        self.save(rec)
        return rec

    def remember(self, rec: FileRecord) -> None:
        """Take `rec` into account for ordinals and shard ids now; `save_many` makes it durable
        (the caller submits none of its shards before that)."""
        self._add(rec)

    def save(self, rec: FileRecord) -> None:
        self.save_many([rec])

    def save_many(self, recs: list[FileRecord]) -> None:
        """Make `recs` durable in one write (one `_plan/log=` object); nothing if none changed.
        The driver saves a batch of files' records before submitting any of their shards."""
        changed = []
        for rec in recs:
            self._add(rec)
            data = dataclasses.asdict(rec)
            if self._written.get(rec.url) != data:
                changed.append(data)
        if not changed:
            return
        self._log_seq += 1
        key = ledger_log_key(self._log_seq)
        self.store.write_bytes(key, json.dumps({"records": changed}, sort_keys=True, separators=(",", ":")).encode())
        for data in changed:
            self._written[data["url"]] = data
        self._log.add(key.rsplit("/", 1)[-1])
        self.writes += 1

    def compact(self) -> bool:
        """Fold the log into a new snapshot; no-op (writes nothing) when the log is empty."""
        if not self._log:
            return False
        self._snapshot_seq += 1
        key = ledger_snapshot_key(self._snapshot_seq)
        snapshot = {"version": 1, "max_ordinal": self._max_ordinal, "max_shard": self._max_shard,
                    "records": [dataclasses.asdict(r) for r in self.in_order()]}
        self.store.write_bytes(key, json.dumps(snapshot, sort_keys=True, separators=(",", ":")).encode())
        stale = [self.store.path(f"{PLAN_DIR}/{n}") for n in sorted(self._log) + self._snapshot_names]
        try:  # batched deletes on object stores; left-overs equal the snapshot and are harmless
            with_retries("compact the ledger", lambda: self.store.fs.rm(stale), self.store.cfg.retries)
        except (OSError, FileNotFoundError) as e:
            log.warning(f"ledger compaction left old records behind ({e}); the next run compacts them")
        self.store.fs.invalidate_cache(self.store.path(PLAN_DIR))
        self._log = set()
        self._snapshot_names = [key.rsplit("/", 1)[-1]]
        return True

    def quarantined(self) -> list[dict]:
        return [q for r in self.in_order() for q in r.quarantined]

    def summary(self) -> list[dict]:
        return [{"ordinal": r.ordinal, "url": r.url, "fingerprint": r.fingerprint, "first_shard": r.first_shard,
                 "last_shard": r.last_shard, "complete": r.complete} for r in self.in_order()]

"""The run's ledger: which corpus file owns which shards, kept in `_plan/file=NNNNNN.json`.

Each file gets an ordinal the first time a run sees it, and starts a new shard. Its record is
written *before* its first shard is submitted (first shard known) and again when the file
has been read to its end (last shard, counts, quarantined documents). Later runs of the same
run id therefore:
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
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from pipeline.outputs.layout import PLAN_DIR, plan_key
from pipeline.outputs.sink import RunStore


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


class Ledger:
    def __init__(self, store: RunStore):
        self.store = store
        self.records: dict[str, FileRecord] = {}
        try:
            names = store.fs.ls(store.path(PLAN_DIR), detail=False)
        except FileNotFoundError:
            names = []
        for name in sorted(names):
            if name.endswith(".json"):
                rec = FileRecord(**store.read_json(f"{PLAN_DIR}/{name.rsplit('/', 1)[-1]}"))
                self.records[rec.url] = rec
        self._written = {url: dataclasses.asdict(r) for url, r in self.records.items()}

    def in_order(self) -> list[FileRecord]:
        return sorted(self.records.values(), key=lambda r: r.ordinal)

    def next_ordinal(self) -> int:
        return 1 + max((r.ordinal for r in self.records.values()), default=-1)

    def next_shard(self, committed_max: int = -1) -> int:
        """The first shard id above every id any record may have handed out, and above
        `committed_max` (the highest committed shard id)."""
        def highest(r: FileRecord) -> int:
            known = r.last_shard if r.last_shard is not None else r.first_shard
            return max(known, r.reserved_shard if r.reserved_shard is not None else -1)
        return 1 + max([committed_max, *(highest(r) for r in self.records.values())])

    def reserve(self, rec: FileRecord, shard_id: int) -> FileRecord:
        """Record durably that `shard_id` belongs to `rec`'s file; call before submitting it."""
        if rec.reserved_shard is not None and rec.reserved_shard >= shard_id:
            return rec
        rec = dataclasses.replace(rec, reserved_shard=shard_id)
        self.save(rec)
        return rec

    def save(self, rec: FileRecord) -> None:
        self.records[rec.url] = rec
        data = dataclasses.asdict(rec)
        if self._written.get(rec.url) != data:
            self.store.write_json(plan_key(rec.ordinal), data)
            self._written[rec.url] = data

    def quarantined(self) -> list[dict]:
        return [q for r in self.in_order() for q in r.quarantined]

    def summary(self) -> list[dict]:
        return [{"ordinal": r.ordinal, "url": r.url, "fingerprint": r.fingerprint, "first_shard": r.first_shard,
                 "last_shard": r.last_shard, "complete": r.complete} for r in self.in_order()]

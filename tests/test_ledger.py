"""Shard ids, once handed out, are never handed out again (issue 15's silent-loss path).

A file whose driver died mid-planning has `last_shard=None`; if it then vanishes from the
corpus (or changes under `on_changed_file=skip`), a new file must not get shard ids that
overlap the shards it committed: `plan_run` would skip them as done and lose the new file."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pyarrow.parquet as pq
import pytest
from test_pipeline_e2e import make_cfg

from pipeline.config import SinkConfig
from pipeline.outputs.layout import plan_key
from pipeline.outputs.sink import RunStore
from pipeline.runtime.ledger import FileRecord, Ledger


def test_next_shard_is_above_every_shard_of_an_unfinished_file(tmp_path):
    store = RunStore(SinkConfig(root=str(tmp_path)), "r")
    ledger = Ledger(store)
    # The driver died while planning a.txt: shards 0, 1, 2 committed, last shard never recorded.
    ledger.save(FileRecord(ordinal=0, url="file:///c/a.txt", fingerprint="x", first_shard=0))
    assert Ledger(store).next_shard(committed_max=2) > 2
    # With the reservation the ledger now keeps, the committed ids are not even needed.
    ledger.reserve(ledger.records["file:///c/a.txt"], 4)
    assert Ledger(store).next_shard() == 5
    assert Ledger(store).next_shard(committed_max=7) == 8


def test_reservation_is_durable_and_monotonic(tmp_path):
    store = RunStore(SinkConfig(root=str(tmp_path)), "r")
    ledger = Ledger(store)
    rec = FileRecord(ordinal=0, url="u", fingerprint="x", first_shard=3)
    ledger.save(rec)
    rec = ledger.reserve(rec, 5)
    rec = ledger.reserve(rec, 4)  # an older id never lowers the mark
    assert Ledger(store).records["u"].reserved_shard == 5  # durable: a fresh load sees it


@pytest.mark.slow
@pytest.mark.parametrize("how", ["removed", "changed"])
def test_new_file_after_a_vanished_unfinished_file_is_fully_extracted(how, tiny_model_dir, tiny_sae_dir, tmp_path,
                                                                       ray_local):
    """End to end: a real run commits a file's shards; the ledger is put in the state a driver
    killed mid-planning leaves (no last shard); the file goes away; a new file arrives."""
    from pipeline.runtime.driver import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"old document {i} " * 6}) + "\n" for i in range(8)))
    cfg = make_cfg(tiny_model_dir, corpus, tiny_sae_dir, tmp_path / "out", run_id="vanish", shard_size=2,
                   on_changed_file="skip")
    first = run(cfg)
    root = tmp_path / "out" / "vanish"
    committed = sorted(int(p.stem.split("=")[1]) for p in (root / "_commits").glob("*.json"))
    assert first.shards_done >= 3 and committed == list(range(len(committed)))
    # Rewrite the (compacted) ledger in the layout of a version before compaction and before
    # `reserved_shard`: per-record files only, no snapshot (old runs must still resume).
    snapshots = sorted((root / "_plan").glob("ledger-*.json"))
    assert len(snapshots) == 1 and not list((root / "_plan").glob("file=*.json"))
    records = json.loads(snapshots[0].read_text())["records"]
    snapshots[0].unlink()
    for rec in records:
        if rec["ordinal"] == 0:
            rec.update(last_shard=None, complete=False, contexts=0, tokens=0, quarantined=[])
        rec.pop("reserved_shard", None)
        (root / plan_key(rec["ordinal"])).write_text(json.dumps(rec))

    if how == "removed":
        (corpus / "a.jsonl").unlink()
    else:
        (corpus / "a.jsonl").write_text(json.dumps({"text": "a.jsonl was rewritten"}) + "\n")
    new_docs = [f"new document number {i} arrives " * 5 for i in range(6)]
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in new_docs))
    second = run(cfg)
    assert second.shards_done >= 1
    ctx = pq.read_table(root / "contexts").to_pandas().sort_values("seq_id")
    mine = ctx[ctx.doc_id.str.contains("b.jsonl")]
    # Every token of b.jsonl is there: its contexts equal those of a run over b.jsonl alone.
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(corpus / "b.jsonl", alone / "b.jsonl")
    ref_cfg = dataclasses.replace(cfg, run_id="alone", corpus=dataclasses.replace(cfg.corpus, paths=[str(alone)]))
    run(ref_cfg)
    ref = pq.read_table(tmp_path / "out" / "alone" / "contexts").to_pandas().sort_values("seq_id")
    assert len(ref) >= 3
    assert [list(t) for t in mine.token_ids] == [list(t) for t in ref.token_ids]
    assert list(mine.doc_offset) == list(ref.doc_offset)
    manifest = json.loads((root / "manifest.json").read_text())
    b = next(f for f in manifest["files"] if f["url"].endswith("b.jsonl"))
    assert b["first_shard"] > max(committed)
    # Nothing of a.jsonl was overwritten: its committed shards still hold only its documents.
    for s in committed:
        part = pq.read_table(root / "contexts" / f"shard={s:06d}").to_pandas()
        assert all("a.jsonl" in d for d in part.doc_id)


class CountingFS:
    """Forwards to a real fsspec filesystem and counts the calls that are requests on a store."""

    def __init__(self, fs):
        self._fs, self.calls = fs, []

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name in ("ls", "open", "cat_file", "info", "exists", "isfile", "glob", "find", "pipe_file", "rm"):
            def counted(*a, **kw):
                self.calls.append(name)
                return attr(*a, **kw)
            return counted
        return attr


def test_planning_reads_the_ledger_in_constant_requests(tmp_path):
    """F files: start-up after compaction = 1 listing + 1 GET, whatever F; the old per-record
    layout still loads (one GET per record) and is compacted on the first run's end."""
    store = RunStore(SinkConfig(root=str(tmp_path)), "r")
    ledger = Ledger(store)
    n = 300
    for i in range(n):  # as the driver does for new files: O(1) next_ordinal/next_shard
        rec = FileRecord(ordinal=ledger.next_ordinal(), url=f"file:///c/{i:04d}.txt", fingerprint="x",
                         first_shard=ledger.next_shard())
        ledger.save(dataclasses.replace(rec, last_shard=rec.first_shard + 1, complete=True))
    assert ledger.next_ordinal() == n and ledger.next_shard() == 2 * n
    before = {r.url: dataclasses.asdict(r) for r in ledger.in_order()}

    # Before compaction (the old layout): every record is its own object.
    store.fs = CountingFS(store.fs)
    old = Ledger(store)
    assert store.fs.calls.count("open") == n
    assert {u: dataclasses.asdict(r) for u, r in old.records.items()} == before
    assert old.compact() is True
    assert sorted(p.name for p in (tmp_path / "r" / "_plan").iterdir()) == ["ledger-000000.json"]

    store.fs.calls.clear()
    loaded = Ledger(store)
    assert store.fs.calls == ["ls", "open"], store.fs.calls
    assert {u: dataclasses.asdict(r) for u, r in loaded.records.items()} == before
    assert loaded.next_ordinal() == n and loaded.next_shard() == 2 * n
    assert loaded.compact() is False  # nothing changed: nothing written

    # A record written after the snapshot (the log) overrides it; the next compaction folds it in.
    changed = dataclasses.replace(loaded.records["file:///c/0007.txt"], reserved_shard=10 * n)
    loaded.save(changed)
    again = Ledger(store)
    assert again.records[changed.url] == changed and again.next_shard() == 10 * n + 1
    assert again.compact() is True
    names = sorted(p.name for p in (tmp_path / "r" / "_plan").iterdir())
    assert names == ["ledger-000001.json"]
    store.fs.calls.clear()
    final = Ledger(store)
    assert store.fs.calls == ["ls", "open"] and final.records[changed.url] == changed


def test_an_empty_file_gives_its_unused_first_shard_back(tmp_path):
    """Same shard ids as the per-record ledger: a file read to its end with no shard
    (last_shard = first_shard - 1, nothing reserved) does not use up an id."""
    ledger = Ledger(RunStore(SinkConfig(root=str(tmp_path)), "r"))
    a = FileRecord(ordinal=0, url="a", fingerprint="x", first_shard=0)
    ledger.save(a)
    ledger.save(dataclasses.replace(a, last_shard=1, reserved_shard=1, complete=True))
    empty = FileRecord(ordinal=1, url="e", fingerprint="x", first_shard=ledger.next_shard())
    ledger.save(empty)
    assert ledger.next_shard() == 3
    ledger.save(dataclasses.replace(empty, last_shard=1, complete=True))
    assert ledger.next_shard() == 2 and Ledger(ledger.store).next_shard() == 2


def test_batched_log_loads_after_older_per_record_files_and_in_write_order(tmp_path):
    """`_plan/file=` records (older versions) come before `_plan/log=` batches, and batches apply
    in write order, so the newest record of a file wins whatever the names sort like."""
    store = RunStore(SinkConfig(root=str(tmp_path)), "r")
    old = FileRecord(ordinal=0, url="u", fingerprint="x", first_shard=0)
    store.write_json(plan_key(0), dataclasses.asdict(old))  # as a pre-batching driver left it
    ledger = Ledger(store)
    v2 = dataclasses.replace(old, last_shard=3, reserved_shard=3, complete=True)
    ledger.save_many([v2, FileRecord(ordinal=1, url="w", fingerprint="y", first_shard=4)])
    for i in range(11):  # eleven more batches: the last one written wins
        ledger.save(dataclasses.replace(v2, tokens=i))
    loaded = Ledger(store)
    assert loaded.records["u"] == dataclasses.replace(v2, tokens=10) and loaded.next_shard() == 5
    assert loaded.compact() is True
    assert sorted(p.name for p in (tmp_path / "r" / "_plan").iterdir()) == ["ledger-000000.json"]
    assert Ledger(store).records == loaded.records

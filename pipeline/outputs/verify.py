"""Check a run's committed shards against their commit markers: what a user (or the nightly job) runs.

    python -m pipeline.verify run_id=X [sink=s3] [hash=false]

Every commit marker `_commits/shard=NNNNNN.json` lists its parts with path, rows, bytes and
sha256 (runtime/worker.py). For every committed shard this reports, one line per problem:

    missing  a part the marker lists (or a manifest hookpoint the marker lacks) is not there
    extra    a file under a committed shard's folder that its marker does not list, or a file
             under contexts/ or latents/ outside any shard folder
    corrupt  size, sha256 or Parquet row count differs from the marker; an unreadable marker

Shard folders without a marker are shards in progress (or a crashed attempt that a rerun redoes):
readers ignore them, so they are listed as information only. Any missing/extra/corrupt part makes
the command exit non-zero.

Memory is bounded: the committed shard ids and each data folder's shard ids are int arrays (like
the driver's), markers are fetched `batch_size` at a time (one concurrent request batch on object
stores), and parts are hashed in 8 MiB blocks, `threads` at a time. Nothing else is kept.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.cli import command
from pipeline.config import VerifyConfig
from pipeline.outputs.layout import (
    COMMITS_DIR,
    CROSSCODER_PREFIX,
    MANIFEST_KEY,
    commit_key,
    contexts_key,
    dictionary_ids,
    latents_key,
    shard_name,
)
from pipeline.outputs.sink import RunStore, with_retries

log = logging.getLogger(__name__)

BLOCK = 8 << 20  # bytes hashed per read
KEEP_PROBLEMS = 1000  # problems kept on the report object (all are logged as found)


@dataclass
class Problem:
    kind: str  # missing | extra | corrupt
    key: str  # relative to the run root
    reason: str = ""

    def line(self) -> str:
        return f"{self.kind.upper():8s} {self.key}" + (f": {self.reason}" if self.reason else "")


@dataclass
class VerifyReport:
    url: str
    shards: int = 0
    files: int = 0
    bytes: int = 0
    rows: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {"missing": 0, "extra": 0, "corrupt": 0})
    problems: list[Problem] = field(default_factory=list)  # the first KEEP_PROBLEMS
    uncommitted: int = 0  # shard ids with a data folder but no commit marker (informational)

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())

    def add(self, problem: Problem) -> None:
        self.counts[problem.kind] += 1
        if len(self.problems) < KEEP_PROBLEMS:
            self.problems.append(problem)
        log.error(problem.line())

    def describe(self) -> str:
        c = self.counts
        return (f"verify {self.url}: {'OK' if self.ok else 'FAILED'}: {self.shards} committed shard(s), "
                f"{self.files} part(s), {self.rows:,} rows, {self.bytes:,} bytes checked; "
                f"{c['missing']} missing, {c['extra']} extra, {c['corrupt']} corrupt; "
                f"{self.uncommitted} uncommitted shard(s) ignored")


def _rel(store: RunStore, name: str) -> str:
    return name.rstrip("/")[len(store.root) + 1:]


def _ls(store: RunStore, key: str) -> list[dict]:
    """One folder's entries (name relative to the run root, size, type); [] if it does not exist."""
    full = store.path(key)
    store.fs.invalidate_cache(full)
    try:
        entries = with_retries(f"list {key}", lambda: store.fs.ls(full, detail=True), store.cfg.retries)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        rel = _rel(store, e["name"])
        if rel and rel != key:  # some filesystems list a folder's own placeholder
            out.append({"key": rel, "size": e.get("size"), "type": e.get("type")})
    return out


def _shard_id(name: str) -> int | None:
    base = name.rsplit("/", 1)[-1]
    if base.startswith("shard=") and base[len("shard="):].isdigit():
        return int(base[len("shard="):])
    return None


def _stray(store: RunStore, entry: dict, report: VerifyReport) -> None:
    """Anything under contexts/ or latents/ outside a shard folder: no marker can reference it."""
    if entry["type"] == "directory":
        for name in with_retries(f"find {entry['key']}", lambda: store.fs.find(store.path(entry["key"])),
                                 store.cfg.retries):
            report.add(Problem("extra", _rel(store, name), "outside any shard folder"))
    else:
        report.add(Problem("extra", entry["key"], "outside any shard folder"))


def data_folders(store: RunStore, report: VerifyReport) -> dict[str, np.ndarray]:
    """{prefix: sorted shard ids with a folder there} for contexts/ and every latents/hookpoint=H/."""
    prefixes = ["contexts"]
    for e in _ls(store, "latents"):
        if e["type"] == "directory" and e["key"].rsplit("/", 1)[-1].startswith(("hookpoint=", CROSSCODER_PREFIX)):
            prefixes.append(e["key"])
        else:
            _stray(store, e, report)
    folders = {}
    for prefix in prefixes:
        ids = []
        for e in _ls(store, prefix):
            sid = _shard_id(e["key"]) if e["type"] == "directory" else None
            if sid is None:
                _stray(store, e, report)
            else:
                ids.append(sid)
        folders[prefix] = np.unique(np.asarray(ids, dtype=np.int64))
    return folders


def _read_markers(store: RunStore, shards: np.ndarray) -> dict[int, dict | Exception]:
    """Commit markers of a batch of shards in one call (concurrent requests on object stores)."""
    paths = [store.path(commit_key(int(s))) for s in shards]
    raw = with_retries(f"read {len(paths)} commit markers", lambda: store.fs.cat(paths, on_error="return"),
                       store.cfg.retries)
    out: dict[int, dict | Exception] = {}
    for s, p in zip(shards.tolist(), paths):
        data = raw.get(p, raw.get(store.fs._strip_protocol(p)))
        if data is None:
            data = FileNotFoundError(p)
        if not isinstance(data, Exception):
            try:
                data = json.loads(data)
                if not isinstance(data.get("files"), list):
                    raise ValueError("no 'files' list")
            except (ValueError, AttributeError) as err:
                data = ValueError(f"not a commit marker: {err}")
        out[s] = data
    return out


def check_part(store: RunStore, key: str, entry: dict, hash_parts: bool) -> tuple[Problem | None, int]:
    """(problem or None, rows) for one present part: sha256 streamed in blocks, then the row count
    from the Parquet footer. Reads are retried (transient I/O); parsing happens after, from bytes,
    so a damaged footer is reported as corruption and never retried as if it were I/O."""
    def read() -> tuple[str | None, bytes]:
        with store.fs.open(store.path(key), "rb") as f:
            digest = None
            if hash_parts:
                h = hashlib.sha256()
                while block := f.read(BLOCK):
                    h.update(block)
                digest = h.hexdigest()
            size = f.seek(0, 2)
            f.seek(max(size - 8, 0))
            tail = f.read(8)
            footer_len = int.from_bytes(tail[:4], "little") if len(tail) == 8 else -1
            if tail[4:] != b"PAR1" or not 0 < footer_len <= size - 12:
                return digest, b""
            f.seek(size - 8 - footer_len)
            return digest, f.read(footer_len + 8)

    try:
        digest, footer = with_retries(f"read {key}", read, store.cfg.retries)
    except FileNotFoundError:
        return Problem("missing", key, "listed, then gone while verifying"), 0
    if digest is not None and digest != entry["sha256"]:
        return Problem("corrupt", key, f"sha256 {digest[:16]}… but its commit marker says {entry['sha256'][:16]}…"), 0
    try:
        rows = pq.read_metadata(pa.BufferReader(b"PAR1" + footer)).num_rows if footer else -1
    except Exception:  # noqa: BLE001  any unparsable footer is corruption
        rows = -1
    if rows < 0:
        return Problem("corrupt", key, "not a readable Parquet file (footer)"), 0
    if rows != entry["rows"]:
        return Problem("corrupt", key, f"{rows} rows but its commit marker says {entry['rows']}"), 0
    return None, rows


def verify_run(store: RunStore, hash_parts: bool = True, batch_size: int = 256, threads: int = 8) -> VerifyReport:
    """Check every committed shard of `store` against its marker; each problem is logged as found."""
    report = VerifyReport(store.url)
    committed = np.asarray(store.committed_shards(), dtype=np.int64)
    report.shards = len(committed)
    hooks: list[str] = []
    if store.exists(MANIFEST_KEY):
        hooks = dictionary_ids(store.read_json(MANIFEST_KEY))  # hookpoints and crosscoder=NAME
    folders = data_folders(store, report)

    uncommitted = np.unique(np.concatenate([np.setdiff1d(ids, committed) for ids in folders.values()]))
    report.uncommitted = len(uncommitted)
    for s in uncommitted.tolist():
        where = [f"{p}/{shard_name(s)}/" for p, ids in folders.items() if _has(ids, s)]
        log.info(f"uncommitted {shard_name(s)}: {', '.join(where)} (in progress or crashed; readers ignore it)")

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(committed), batch_size):
            batch = committed[start:start + batch_size]
            todo: list[tuple[str, dict]] = []
            for s, marker in _read_markers(store, batch).items():
                if isinstance(marker, Exception):
                    report.add(Problem("corrupt", commit_key(s), f"{type(marker).__name__}: {marker}"))
                    continue
                todo += _check_listing(store, s, marker, hooks, folders, report)
            for problem, rows in pool.map(lambda t: check_part(store, t[0], t[1], hash_parts), todo):
                if problem is not None:
                    report.add(problem)
                else:
                    report.rows += rows
            report.files += len(todo)
            report.bytes += sum(int(e["bytes"]) for _, e in todo)
    return report


def _has(ids: np.ndarray, s: int) -> bool:
    i = np.searchsorted(ids, s)
    return bool(i < len(ids) and ids[i] == s)


def _check_listing(store: RunStore, s: int, marker: dict, hooks: list[str], folders: dict[str, np.ndarray],
                   report: VerifyReport) -> list[tuple[str, dict]]:
    """Compare one committed shard's folders with its marker; return the present parts to read."""
    expected = {f["path"]: f for f in marker["files"]}
    for key in [contexts_key(s)] + [latents_key(h, s) for h in hooks]:
        if key not in expected:
            report.add(Problem("missing", key, f"the manifest's layout needs it; {commit_key(s)} does not list it"))
    dirs = {f"{p}/{shard_name(s)}" for p, ids in folders.items() if _has(ids, s)}
    listed: dict[str, int | None] = {}
    for d in sorted(dirs):
        for e in _ls(store, d):
            if e["type"] == "directory":
                for name in store.fs.find(store.path(e["key"])):
                    listed[_rel(store, name)] = None
            else:
                listed[e["key"]] = e["size"]
    todo = []
    for key, entry in expected.items():
        if key not in listed:
            report.add(Problem("missing", key, f"listed in {commit_key(s)}"))
        elif listed[key] is not None and int(listed[key]) != int(entry["bytes"]):
            report.add(Problem("corrupt", key, f"{listed[key]} bytes but its commit marker says {entry['bytes']}"))
        else:
            todo.append((key, entry))
    for key in sorted(set(listed) - set(expected)):
        report.add(Problem("extra", key, f"under committed {shard_name(s)}, not in its marker"))
    return todo


def _main(cfg: VerifyConfig) -> None:
    store = RunStore(cfg.sink, cfg.run_id)
    if not store.exists(COMMITS_DIR) and not store.exists(MANIFEST_KEY):
        sys.exit(f"verify: no run at {store.url} (no manifest.json, no {COMMITS_DIR}/)")
    report = verify_run(store, cfg.hash, cfg.batch_size, cfg.threads)
    if not report.ok:
        log.error(report.describe())
        sys.exit(1)
    log.info(report.describe())


main = command("verify", VerifyConfig, _main)


if __name__ == "__main__":
    main()

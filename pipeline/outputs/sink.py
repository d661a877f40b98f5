"""Where a run's files go: local folders or s3:// through fsspec, with the commit protocol.

Every shard writes its parts to deterministic keys and then, last, its commit marker
`_commits/shard=NNNNNN.json` listing each part's path, row count, bytes and sha256. Readers
trust only committed shards, so a crash between parts and marker leaves nothing visible, and
a redone shard overwrites the same keys with the same bytes. Keys and schemas: pipeline/outputs/layout.py.
"""
from __future__ import annotations

import contextlib
import copy
import glob
import hashlib
import io
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import SinkConfig
from pipeline.outputs.layout import COMMITS_DIR, QUARANTINE_DIR, commit_key, contexts_key, latents_key

T = TypeVar("T")

def storage_options(cfg: SinkConfig) -> dict:
    """fsspec options for the sink: `sink.storage_options` plus the endpoint. Credentials normally
    stay in the environment (boto's own lookup)."""
    opts = copy.deepcopy(dict(cfg.storage_options or {}))
    if cfg.root.startswith("s3://") and cfg.endpoint_url:
        opts["client_kwargs"] = {**opts.get("client_kwargs", {}), "endpoint_url": cfg.endpoint_url}
    return opts


TRANSIENT_S3_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                      "InternalError", "ServiceUnavailable", "503", "500"}

log = logging.getLogger(__name__)


def _connection_errors() -> tuple[type[BaseException], ...]:
    """Errors with no HTTP answer to classify (refused, reset, closed, timed out). The async s3fs
    passes these through untranslated: botocore's (from aiobotocore) and aiohttp's own."""
    types: list[type[BaseException]] = []
    with contextlib.suppress(ImportError):
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, IncompleteReadError

        types += [BotoConnectionError, HTTPClientError, IncompleteReadError]
    with contextlib.suppress(ImportError):
        import aiohttp

        types.append(aiohttp.ClientError)
    return tuple(types)


def is_transient(err: BaseException) -> bool:
    """Worth retrying: I/O and timeouts (s3fs maps S3's error answers to OSError), connection-level
    errors s3fs lets through as they are, and botocore ClientErrors S3 documents as transient."""
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return False
    if isinstance(err, (OSError, TimeoutError, *_connection_errors())):
        return True
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
        return code in TRANSIENT_S3_CODES or status >= 500
    return False


def with_retries(what: str, fn: Callable[[], T], retries: int, base_delay: float = 0.2) -> T:
    """Retry transient I/O errors with exponential backoff and jitter; the last error propagates."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == retries or not is_transient(err):
                raise
            delay = base_delay * (2**attempt) * (0.5 + random.random())
            log.warning(f"[sink] {what}: {type(err).__name__}: {err}; retry {attempt + 1}/{retries} in {delay:.2f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


class CorruptPartError(OSError):
    """A committed part whose bytes differ from what its commit marker records."""


@dataclass
class WrittenFile:
    path: str  # relative to the run root
    rows: int
    bytes: int
    sha256: str


class RunStore:
    """One run's folder: `{root}/{run_id}/` on any fsspec filesystem."""

    def __init__(self, cfg: SinkConfig, run_id: str):
        if not run_id or "/" in run_id or run_id.startswith("."):
            raise ValueError(f"run_id={run_id!r} must be a non-empty name without '/'")
        self.cfg = cfg
        self.run_id = run_id
        self.fs, root = fsspec.core.url_to_fs(cfg.root, **storage_options(cfg))
        self.root = f"{root.rstrip('/')}/{run_id}"
        self.url = f"{cfg.root.rstrip('/')}/{run_id}"
        self.is_local = self.fs.protocol in ("file", ("file", "local")) or "file" in self.fs.protocol

    def path(self, key: str) -> str:
        return f"{self.root}/{key}"

    # -- writing -----------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> None:
        """Atomic per key: temp file + rename locally; a single PUT on object stores."""
        full = self.path(key)

        def put() -> None:
            if self.is_local:
                folder, name = os.path.split(full)
                os.makedirs(folder, exist_ok=True)
                # Hidden name: Parquet dataset readers (pyarrow, DuckDB globs) skip it if a crash
                # leaves it behind; the next successful write of the same key removes it.
                tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}-{threading.get_ident()}")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, full)
                for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.tmp-*")):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(stale)
            else:
                self.fs.pipe_file(full, data)

        with_retries(f"write {key}", put, self.cfg.retries)

    def write_table(self, key: str, table: pa.Table, **parquet_options) -> WrittenFile:
        buf = io.BytesIO()
        pq.write_table(
            table,
            buf,
            compression=self.cfg.compression,
            compression_level=self.cfg.compression_level,
            **parquet_options,
        )
        data = buf.getvalue()
        self.write_bytes(key, data)
        return WrittenFile(key, table.num_rows, len(data), hashlib.sha256(data).hexdigest())

    def write_json(self, key: str, obj: dict) -> None:
        self.write_bytes(key, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def remove(self, key: str) -> None:
        """Delete `key`; already gone is fine."""
        def rm() -> None:
            try:
                self.fs.rm(self.path(key))
            except FileNotFoundError:
                pass

        with_retries(f"remove {key}", rm, self.cfg.retries)

    # -- reading -----------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return with_retries(f"exists {key}", lambda: self.fs.exists(self.path(key)), self.cfg.retries)

    def read_json(self, key: str) -> dict:
        def get() -> dict:
            with self.fs.open(self.path(key), "rb") as f:
                return json.loads(f.read())

        return with_retries(f"read {key}", get, self.cfg.retries)

    def committed_shards(self) -> list[int]:
        """Sorted shard ids that have a commit marker (one listing, no per-shard requests)."""
        return self._marked_shards(COMMITS_DIR)

    def quarantined_shards(self) -> list[int]:
        """Sorted ids of shards set aside for killing their workers (cluster.on_poison_shard=quarantine)."""
        return self._marked_shards(QUARANTINE_DIR)

    def _marked_shards(self, folder: str) -> list[int]:
        prefix = self.path(folder)
        try:
            names = with_retries(f"list {folder}", lambda: self.fs.ls(prefix, detail=False), self.cfg.retries)
        except FileNotFoundError:
            return []
        self.fs.invalidate_cache(prefix)
        shards = []
        for name in names:
            base = name.rstrip("/").rsplit("/", 1)[-1]
            if base.startswith("shard=") and base.endswith(".json"):
                shards.append(int(base[len("shard="):-len(".json")]))
        return sorted(shards)

    def read_part(self, key: str, columns: list[str] | None = None, rows: int | None = None,
                  sha256: str | None = None) -> pa.Table:
        """One Parquet part; any failure is an OSError naming the file, as is a row count other than
        `rows` or (given `sha256`) bytes whose hash differs: `CorruptPartError`."""
        try:
            with self.fs.open(self.path(key), "rb") as f:
                if sha256 is None:
                    table = pq.read_table(f, columns=columns)
                else:  # the part is read whole anyway: hash the bytes, then parse the same bytes
                    data = f.read()
                    got = hashlib.sha256(data).hexdigest()
                    if got != sha256:
                        raise CorruptPartError(f"{self.path(key)} is corrupt: sha256 {got} but its commit "
                                               f"marker says {sha256}")
                    table = pq.read_table(pa.BufferReader(data), columns=columns)
        except CorruptPartError:
            raise
        except Exception as err:
            raise OSError(f"cannot read {self.path(key)}: {err}") from err
        if rows is not None and table.num_rows != rows:
            raise OSError(f"{self.path(key)} has {table.num_rows} rows but its commit says {rows}")
        return table

    def read_committed_part(self, shard_id: int, key: str, columns: list[str] | None = None,
                            verify: bool = False) -> pa.Table:
        """A part of a committed shard, checked against the row count its commit marker lists
        (and, with `verify`, against its sha256: `CorruptPartError` naming the key)."""
        commit = self.read_json(commit_key(shard_id))
        entry = next((f for f in commit["files"] if f["path"] == key), None)
        if entry is None:
            raise FileNotFoundError(f"{self.path(commit_key(shard_id))} lists no file {key}")
        return self.read_part(key, columns, entry["rows"], entry["sha256"] if verify else None)

    def iter_committed(self, kind: str, hookpoint: str | None = None, columns: list[str] | None = None,
                       shards: list[int] | None = None, verify: bool = False) -> Iterator[pa.Table]:
        """One committed shard's part of `contexts` or `latents` (one hookpoint) at a time, in shard
        order; each checked against its commit marker (row count; with `verify` also sha256, raising
        CorruptPartError naming the part; `python -m pipeline.verify` checks a whole run). Memory: one part."""
        if kind not in ("contexts", "latents") or (kind == "latents" and not hookpoint):
            raise ValueError(f"kind={kind!r} hookpoint={hookpoint!r}: want 'contexts', or 'latents' with a hookpoint")
        for s in self.committed_shards() if shards is None else shards:
            key = contexts_key(s) if kind == "contexts" else latents_key(hookpoint, s)
            yield self.read_committed_part(s, key, columns, verify)

    def read_committed(self, kind: str, hookpoint: str | None = None, columns: list[str] | None = None,
                       verify: bool = False) -> pa.Table:
        """Concatenate the committed parts (iter_committed) into one table: only for runs that fit in memory."""
        tables = list(self.iter_committed(kind, hookpoint, columns, verify=verify))
        if not tables:
            raise FileNotFoundError(f"run {self.url} has no committed shards")
        return pa.concat_tables(tables)

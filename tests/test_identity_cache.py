"""Identity without rereading (issue 13): content hashes cached by the files' stat, a changed
file still detected. Real files, real reads: `read_count` counts what sha256_of_files reads."""
from __future__ import annotations

import hashlib
import os
import time

import pytest

from pipeline import remote
from pipeline.remote import sha256_of_files


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_HARVEST_CACHE", str(tmp_path / "cache"))
    reads = []
    real = remote._hash_files
    monkeypatch.setattr(remote, "_hash_files", lambda paths: reads.append(list(paths)) or real(paths))
    return reads


def _aged(path, data: bytes):
    """Write `data` and wait out the racy window, as a checkpoint on disk for a while would be."""
    path.write_bytes(data)
    time.sleep(remote.RACY_NS / 1e9 + 0.05)


def test_unchanged_file_is_not_reread(tmp_path, cache_env):
    f = tmp_path / "w.bin"
    _aged(f, os.urandom(1 << 20))
    full = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_of_files([f]) == full and len(cache_env) == 1
    assert sha256_of_files([f]) == full and len(cache_env) == 1  # hit: a stat, no read


def test_changed_content_same_size_and_mtime_is_detected(tmp_path, cache_env):
    f = tmp_path / "w.bin"
    _aged(f, b"a" * 4096)
    old = sha256_of_files([f])
    st = os.stat(f)
    with open(f, "r+b") as h:  # same size, same inode; mtime set back: only ctime tells
        h.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(f).st_size == st.st_size and os.stat(f).st_mtime_ns == st.st_mtime_ns
    new = sha256_of_files([f])
    assert new != old and new == sha256_of_files([f], cache=False)


def test_touched_file_is_rehashed_to_the_same_digest(tmp_path, cache_env):
    f = tmp_path / "w.bin"
    _aged(f, b"x" * 4096)
    old = sha256_of_files([f])
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))  # touch: a miss, same content
    assert sha256_of_files([f]) == old and len(cache_env) == 2


def test_fresh_file_is_not_cached(tmp_path, cache_env):
    # Written just now: its times cannot tell a same-size rewrite in the same tick apart.
    f = tmp_path / "w.bin"
    f.write_bytes(b"y" * 100)
    sha256_of_files([f])
    sha256_of_files([f])
    assert len(cache_env) == 2


def test_file_replaced_by_rename_is_detected(tmp_path, cache_env):
    f, g = tmp_path / "w.bin", tmp_path / "g.bin"
    _aged(f, b"1" * 64)
    old = sha256_of_files([f])
    _aged(g, b"2" * 64)
    st = os.stat(f)
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(g, f)
    assert sha256_of_files([f]) != old


def test_remote_refetched_when_etag_changes(tmp_path, cache_env):
    """fetch_to_cache trusts a cached copy only while the remote's size and ETag are unchanged."""
    import fsspec
    from fsspec.implementations.memory import MemoryFileSystem

    class ETagFS(MemoryFileSystem):  # memory:// with an S3-like ETag (md5 of the content)
        protocol = ("etagmem",)

        def info(self, path, **kw):
            out = super().info(path, **kw)
            if out["type"] == "file":
                out["ETag"] = hashlib.md5(self.cat_file(path)).hexdigest()
            return out

    fsspec.register_implementation("etagmem", ETagFS, clobber=True)
    fs = fsspec.filesystem("etagmem")
    url = f"etagmem://b-{tmp_path.name}/w.bin"
    fs.pipe(url, b"a" * 1000)
    local = remote.fetch_to_cache(url, tmp_path / "fc")
    assert local.read_bytes() == b"a" * 1000
    fs.pipe(url, b"b" * 1000)  # same size, new content
    assert remote.fetch_to_cache(url, tmp_path / "fc").read_bytes() == b"b" * 1000

"""Remote files (s3://, any fsspec URL) copied to a local, integrity-checked cache, and file hashing.

Used alike by SAE loading (`pipeline.sae.formats.load_sae`) and model loading
(`pipeline.model.loader.resolve_model_dir`), so neither imports the other.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


def cache_root() -> Path:
    """Where sae-harvest keeps what it can rebuild: $SAE_HARVEST_CACHE, else ~/.cache/sae-harvest."""
    return Path(os.environ.get("SAE_HARVEST_CACHE", "~/.cache/sae-harvest")).expanduser()


def default_cache_dir() -> Path:
    return cache_root() / "remote"


# A digest is trusted from the cache only when the file is older than this when it was hashed:
# file times are coarse (a few ms locally, up to seconds on network filesystems), so a file
# rewritten within the same tick could keep (size, mtime) while its content changed. Such a
# "racily clean" entry is hashed again next time, as git does for its index.
RACY_NS = 1_000_000_000


def hash_cache_dir() -> Path:
    return cache_root() / "hashes"


def _stat_key(paths: list[Path]) -> list[list]:
    """What identifies the files' content without reading it: path, size, mtime, ctime, inode.

    ctime changes on every write and cannot be set back (os.utime sets only atime/mtime), and a
    file replaced by rename has a new inode, so a changed file always misses the cache."""
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.realpath(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return out


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def sha256_of_files(paths: list[Path], cache: bool = True) -> str:
    """One digest over the given files in order (content only), streamed: SAE and model identities.

    Cached by the files' (path, size, mtime, ctime, inode) in `hash_cache_dir()`: a nightly rerun
    learns that 100 GB of unchanged weights are unchanged from a stat() per file, not a read."""
    paths = [Path(p) for p in paths]
    if not cache:
        return _hash_files(paths)
    before = _stat_key(paths)
    key = hashlib.sha256(json.dumps(before).encode()).hexdigest()
    entry = hash_cache_dir() / f"{key[:32]}.json"
    try:
        known = json.loads(entry.read_text())
        if known["files"] == before:
            return known["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    hashed_at = time.time_ns()
    digest = _hash_files(paths)
    newest = max((max(f[2], f[3]) for f in before), default=0)
    # Not cached when a file changed while it was read, or is too fresh to be told apart by its times.
    if _stat_key(paths) == before and hashed_at - newest > RACY_NS:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"files": before, "sha256": digest}))
            os.replace(tmp, entry)  # atomic: concurrent workers and the driver may race here
        except OSError:
            pass  # a read-only cache costs a rehash next time, nothing else
    return digest


def fetch_to_cache(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    expected_sha256: dict[str, str] | None = None,
) -> Path:
    """Copy a remote file or prefix to a local cache folder and return the local path.

    Integrity: every file is hashed (sha256) while it streams in and checked against its size,
    against `expected_sha256[relative path]` when given and against a `<file>.sha256` sidecar
    when the remote has one. The digests (and the remote's size and ETag) are kept in `.sha256.json`;
    a later call checks the cached files against it (through the stat-keyed hash cache, so an
    unchanged file is not re-read), so a truncated or corrupted cache is fetched again, never
    used, and a remote object whose ETag changed is fetched again.
    Credentials and endpoints come from `storage_options` or the environment (AWS_*).
    """
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    root = root.rstrip("/")
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    # cache/<hash of url>/<last path part>[/<files under the prefix>]; digests in cache/<hash>/.sha256.json
    entry = Path(cache_dir or default_cache_dir()) / key
    name = Path(root).name or "root"
    if fs.isdir(root):
        remote = {Path(p).relative_to(Path(root)).as_posix(): p for p in fs.find(root) if not p.endswith(".sha256")}
        if not remote:
            raise FileNotFoundError(f"{url}: no files under this prefix")
        base = entry / name
    elif fs.exists(root):
        remote = {name: root}
        base = entry
    else:
        raise FileNotFoundError(f"{url} does not exist")

    manifest_path = entry / ".sha256.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    for rel, rpath in sorted(remote.items()):
        local = base / rel
        info = fs.info(rpath)
        size = int(info["size"])
        etag = info.get("ETag") or info.get("etag")  # S3: changes with the object's content
        known = manifest.get(rel)
        # Unchanged remote (size and ETag) and an intact local copy (its digest, from the hash
        # cache when the local file's stat is unchanged): nothing is downloaded or re-read.
        if (local.exists() and known and known["size"] == size == local.stat().st_size
                and known.get("etag") == etag and sha256_of_files([local]) == known["sha256"]):
            continue
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".part")
        digest = hashlib.sha256()
        with fs.open(rpath, "rb") as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 22), b""):
                digest.update(block)
                dst.write(block)
        got = digest.hexdigest()
        want = (expected_sha256 or {}).get(rel)
        if want is None and fs.exists(rpath + ".sha256"):
            with fs.open(rpath + ".sha256", "rb") as f:
                want = f.read().decode().split()[0]
        if tmp.stat().st_size != size or (want is not None and want != got):
            tmp.unlink()
            raise OSError(f"{url}: {rel} failed its integrity check (size {size}, sha256 {got}, expected {want})")
        os.replace(tmp, local)
        manifest[rel] = {"size": size, "sha256": got, "etag": etag}
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return entry / name


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")

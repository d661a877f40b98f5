"""Remote files (s3://, any fsspec URL) copied to a local, integrity-checked cache, and file hashing.

Used alike by SAE loading (`pipeline.sae.formats.load_sae`) and model loading
(`pipeline.model.loader.resolve_model_dir`), so neither imports the other.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def default_cache_dir() -> Path:
    return Path(os.environ.get("SAE_HARVEST_CACHE", "~/.cache/sae-harvest")).expanduser() / "remote"


def sha256_of_files(paths: list[Path]) -> str:
    """One digest over the given files in order (content only), streamed: SAE and model identities."""
    digest = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def fetch_to_cache(
    url: str,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    expected_sha256: dict[str, str] | None = None,
) -> Path:
    """Copy a remote file or prefix to a local cache folder and return the local path.

    Integrity: every file is hashed (sha256) while it streams in and checked against its size,
    against `expected_sha256[relative path]` when given and against a `<file>.sha256` sidecar
    when the remote has one. The digests are kept in `.sha256.json`; a later call re-hashes the
    cached files against it, so a truncated or corrupted cache is fetched again, never used.
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
        size = fs.size(rpath)
        known = manifest.get(rel)
        if local.exists() and known and known["size"] == size == local.stat().st_size and sha256_of_files([local]) == known["sha256"]:
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
        manifest[rel] = {"size": size, "sha256": got}
        manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return entry / name


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")

"""The run's manifest: what made it (config without secrets, model, SAEs, tokenizer, code).

`manifest.json` is written with status "running" before the first shard and rewritten with
status "complete" (plus the corpus files, their shards and quarantined documents) at the end,
only when its content changed: a rerun with nothing to do writes nothing. A rerun of a run id
must match its identity keys (`IDENTITY_KEYS`), else the run stops naming the difference.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import asdict
from pathlib import Path

from pipeline.config import RunConfig
from pipeline.outputs.layout import MANIFEST_KEY
from pipeline.outputs.sink import RunStore

SECRET_KEY = re.compile(r"(secret|password|passwd|credential|access_key|session_token|api_key|private_key)", re.IGNORECASE)
# fsspec/s3fs spell credentials `key`, `secret`, `token` (sink.storage_options): whole names only,
# so `max_tokens` or `token_cache` stay readable.
SECRET_NAMES = {"key", "token", "secret"}
# `name=value` / `name: value` inside a string: Hydra's saved overrides, `override_dirname`.
NAME_VALUE = re.compile(r"([+~]?[A-Za-z_][\w.]*)([ \t]*[:=][ \t]*)([^,{}\[\]\s]+)")  # one line
URL_USERINFO = re.compile(r"(\w+://)[^/@\s:]+:[^/@\s]+@")
# What output already written depends on: a rerun that changes any of them needs a new run id.
IDENTITY_KEYS = ("hookpoints", "ctx_len", "shard_size", "saes", "model")


def is_secret_name(name: str) -> bool:
    last = str(name).rsplit(".", 1)[-1].lstrip("+~").lower()
    return bool(SECRET_KEY.search(last)) or last in SECRET_NAMES


def redact_text(text: str) -> str:
    """`a.secret=x` -> `a.secret=***`, `https://user:pw@host` -> `https://***@host`."""
    text = NAME_VALUE.sub(lambda m: m[1] + m[2] + "***" if is_secret_name(m[1]) else m[0], text)
    return URL_USERINFO.sub(r"\1***@", text)


def redact(obj):
    """Copy of a config (dicts, lists, strings) with anything that looks like a credential replaced."""
    if isinstance(obj, dict):
        return {k: ("***" if is_secret_name(k) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def code_version() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        pkg = version("sae-harvest")
    except PackageNotFoundError:
        pkg = "unknown"
    commit = None
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": pkg, "git_commit": commit}


def manifest_for(cfg: RunConfig, identity: dict, sae_ids: dict, tokenizer: dict | None = None) -> dict:
    """`tokenizer`: name, vocab_size, eos_token_id, class, sha256, as a tokenize task reports it
    (pipeline/runtime/staging.py; the driver never loads the tokenizer); None until one has run."""
    return {
        "run_id": cfg.run_id,
        "config": redact(asdict(cfg)),
        "model": identity,
        "saes": sae_ids,
        "hookpoints": list(cfg.sae.hookpoints),
        # Every dictionary, in output order: kind, what it reads (hookpoints, `CKPT/hookpoint` for
        # model.checkpoints) and, for a transcoder, what it reconstructs (issue 17).
        "dictionaries": {d: {"kind": s.get("kind", "sae"), "inputs": list(s.get("inputs") or [d]),
                             **({"output": s["output"]} if s.get("output") else {})} for d, s in sae_ids.items()},
        "ctx_len": cfg.corpus.ctx_len,
        "shard_size": cfg.corpus.shard_size,
        "k": {h: s["k"] for h, s in sae_ids.items()},
        "tokenizer": tokenizer,
        "code": code_version(),
    }


def open_run(store: RunStore, manifest: dict) -> dict | None:
    """Start a run: write the manifest ("running"), or check a rerun's identity against it and
    return the earlier manifest."""
    if not store.exists(MANIFEST_KEY):
        store.write_json(MANIFEST_KEY, {**manifest, "status": "running"})
        return None
    previous = store.read_json(MANIFEST_KEY)
    for key in IDENTITY_KEYS:
        if previous.get(key) != manifest[key]:
            raise ValueError(
                f"run {store.run_id!r} at {store.url} was made with a different {key} "
                f"({previous.get(key)!r} vs now {manifest[key]!r}); use a new run_id"
            )
    return previous


def close_run(store: RunStore, manifest: dict, files: list[dict], quarantined: list[dict],
              fvu_check: dict | None = None, acts_overflow: int = 0, failed_shards: list[dict] | None = None) -> None:
    """Mark the run complete with its corpus files and quarantine (documents, and shards that
    killed their workers); no write when nothing changed. With `failed_shards` (poison shards
    under cluster.on_poison_shard=fail) the status is "failed" and they are listed; a rerun
    that commits them marks the run complete.

    `fvu_check` (hookpoint -> this invocation's FVU record) is merged, token-weighted, into the
    manifest's "fvu" from earlier invocations (pipeline/sae/fvu.py). `acts_overflow`: this
    invocation's activations beyond the fp16 range, added to the total of earlier invocations
    (each shard's own count is in its commit marker)."""
    from pipeline.sae import fvu

    previous = store.read_json(MANIFEST_KEY)
    total = int(previous.get("acts_overflow", 0)) + int(acts_overflow)
    final = {**manifest, "status": "failed" if failed_shards else "complete", "files": files,
             "quarantined": quarantined, "acts_overflow": total}
    if failed_shards:
        final["failed_shards"] = failed_shards
    merged = fvu.merge(previous.get("fvu") or {}, fvu_check or {})
    if merged:
        final["fvu"] = merged
    if previous != final:
        store.write_json(MANIFEST_KEY, final)

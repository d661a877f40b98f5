"""The driver: plan shards, hand them to harvest actors, track commits, write the manifest.

Data flows one way: plan (tokenize + pack, streamed) -> actors (harvest + encode + write +
commit marker) -> driver (progress, manifest). The driver holds only the shards in flight
and a sorted array of committed shard ids, so its memory does not grow with the corpus.
Re-running a run id skips committed shards; a run with nothing left to do changes no file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig
from pipeline.corpus import Quarantined, resolve_corpus
from pipeline.model import load_tokenizer, model_identity
from pipeline.packing import plan_shards
from pipeline.sink import RunStore, storage_options
from pipeline.worker import ShardPayload, ShardResult

SECRET_KEY = re.compile(r"(secret|password|passwd|credential|access_key|session_token|api_key|private_key)", re.I)


def redact(obj):
    """Copy of a config dict with anything that looks like a credential replaced."""
    if isinstance(obj, dict):
        return {k: ("***" if SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
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
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package": pkg, "git_commit": commit}


@dataclass
class RunSummary:
    run_id: str
    output: str
    shards_done: int = 0
    shards_skipped: int = 0
    tokens: int = 0
    pairs: int = 0
    bytes: int = 0
    seconds: float = 0.0
    quarantined: int = 0
    hookpoints: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        bpp = self.bytes / self.pairs if self.pairs else float("nan")
        return (
            f"run {self.run_id}: {self.shards_done} shards written, {self.shards_skipped} already committed; "
            f"{self.tokens:,} tokens, {self.pairs:,} (latent, act) pairs over {len(self.hookpoints)} hookpoint(s), "
            f"{self.bytes / 1e6:.1f} MB ({bpp:.2f} B/pair incl. contexts), {self.seconds:.1f}s, "
            f"{self.tokens_per_second:,.0f} tokens/s; quarantined documents: {self.quarantined}\n"
            f"output: {self.output}"
        )


class Progress:
    """One line every few seconds: shards done, tokens/s, ETA (from max_tokens or corpus bytes)."""

    def __init__(self, run_id: str, total_tokens: int | None, total_bytes: int, every: float = 5.0):
        self.run_id, self.total_tokens, self.total_bytes, self.every = run_id, total_tokens, total_bytes, every
        self.started = time.perf_counter()
        self.last = 0.0
        self.planned_bytes = 0

    def update(self, summary: RunSummary, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        rate = summary.tokens / elapsed if elapsed > 0 else 0.0
        if self.total_tokens:
            fraction = summary.tokens / self.total_tokens
        else:
            fraction = self.planned_bytes / self.total_bytes if self.total_bytes else 0.0
        eta = elapsed * (1 - fraction) / fraction if fraction > 0 else float("nan")
        eta_text = f"{eta:,.0f}s" if eta == eta else "?"
        print(
            f"[{self.run_id}] shards {summary.shards_done} done, {summary.shards_skipped} skipped | "
            f"{summary.tokens:,} tokens | {rate:,.0f} tokens/s | ETA {eta_text}",
            flush=True,
        )


def sae_paths(cfg: RunConfig) -> dict[str, str]:
    return {h: cfg.sae.path.replace("{hookpoint}", h) for h in cfg.sae.hookpoints}


def prepare_saes(cfg: RunConfig, files, tokenizer, identity: dict, log=print) -> dict[str, str]:
    """Hookpoint -> SAE path; fits (or reuses) the demo SAE when `sae.path` is empty."""
    if cfg.sae.path:
        return sae_paths(cfg)
    import torch

    from pipeline.demo_sae import ensure_demo_sae
    from pipeline.model import load_model

    torch.set_num_threads(cfg.cluster.torch_threads)
    model = None
    paths = {}
    for hook in cfg.sae.hookpoints:
        from pipeline.demo_sae import cache_path

        if not (cache_path(cfg.sae.train, identity["sha256"], hook, files, cfg.corpus) / "cfg.json").exists() and model is None:
            model = load_model(cfg.model)
        paths[hook] = str(
            ensure_demo_sae(model, tokenizer, files, cfg.corpus, hook, cfg.sae.train, identity["sha256"],
                            cfg.model.batch_size, log)
        )
    return paths


def preflight(cfg: RunConfig, sae_by_hook: dict[str, str]) -> dict:
    """Model/hookpoint/SAE checks before any work; returns the SAE identities for the manifest."""
    from pipeline.preflight import check_hookpoints, check_sae_against_model, meta_model, model_shape
    from pipeline.sae import load_sae

    meta = meta_model(cfg.model)
    check_hookpoints(meta, cfg.sae.hookpoints)
    shape = model_shape(meta)
    identities = {}
    for hook, path in sae_by_hook.items():
        sae = load_sae(path)
        check_sae_against_model(sae, hook, shape, cfg.model.name, cfg.sae)
        identities[hook] = {
            "path": path, "format": sae.format, "sha256": sae.sha256, "d_in": sae.d_in,
            "n_latents": sae.n_latents, "k": cfg.sae.k or sae.k, "hookpoint_trained": sae.hookpoint,
        }
    return identities


def make_actor_class():
    import ray

    @ray.remote(max_restarts=3, max_task_retries=3)
    class HarvestActor:
        """Owns the model and SAEs for its whole life; one per GPU (or CPU slot)."""

        def __init__(self, cfg: RunConfig, sae_by_hook: dict[str, str]):
            import torch

            from pipeline.model import load_model
            from pipeline.sae import load_sae
            from pipeline.worker import ShardWorker

            torch.set_num_threads(max(1, cfg.cluster.torch_threads))
            device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
            model = load_model(cfg.model, device)
            saes = {}
            for hook, path in sae_by_hook.items():
                sae = load_sae(path).to(device)
                sae.k = cfg.sae.k or sae.k
                sae.backend = cfg.sae.backend
                saes[hook] = sae
            self.worker = ShardWorker(model, saes, RunStore(cfg.sink, cfg.run_id), cfg.model.batch_size, device)

        def process(self, payload: ShardPayload) -> ShardResult:
            return self.worker.process(payload)

    return HarvestActor


def start_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(cfg.cluster.torch_threads)}
    if cfg.cluster.address:
        ray.init(address=cfg.cluster.address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cfg.cluster.cpus_per_worker * cfg.cluster.num_workers)),
                 include_dashboard=False, runtime_env={"env_vars": env}, log_to_driver=True)


def manifest_for(cfg: RunConfig, identity: dict, sae_ids: dict, tokenizer, files) -> dict:
    return {
        "run_id": cfg.run_id,
        "config": redact(asdict(cfg)),
        "model": identity,
        "saes": sae_ids,
        "hookpoints": list(cfg.sae.hookpoints),
        "ctx_len": cfg.corpus.ctx_len,
        "shard_size": cfg.corpus.shard_size,
        "k": {h: s["k"] for h, s in sae_ids.items()},
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", ""), "vocab_size": len(tokenizer),
                      "eos_token_id": tokenizer.eos_token_id, "class": type(tokenizer).__name__},
        "code": code_version(),
        "corpus": {"files": [dataclasses.asdict(f) for f in files]},
    }


def run(cfg: RunConfig, log=print) -> RunSummary:
    started = time.perf_counter()
    store = RunStore(cfg.sink, cfg.run_id)
    files = resolve_corpus(cfg.corpus, storage_options(cfg.sink) if cfg.corpus.paths[0].startswith("s3://") else None)
    tokenizer = load_tokenizer(cfg.model)
    identity = model_identity(cfg.model)
    sae_by_hook = prepare_saes(cfg, files, tokenizer, identity, log)
    sae_ids = preflight(cfg, sae_by_hook)
    manifest = manifest_for(cfg, identity, sae_ids, tokenizer, files)

    committed = np.asarray(store.committed_shards(), dtype=np.int64)
    summary = RunSummary(cfg.run_id, store.url, hookpoints=list(cfg.sae.hookpoints))
    quarantined: list[dict] = []
    file_plan: list[dict] = []
    progress = Progress(cfg.run_id, cfg.corpus.max_tokens, sum(f.size for f in files))

    actors = []
    pending: dict = {}  # ObjectRef -> (actor index, payload)
    in_flight = []

    def ensure_actors():
        if actors:
            return
        start_ray(cfg)
        actor_cls = make_actor_class()
        for i in range(cfg.cluster.num_workers):
            actors.append(
                actor_cls.options(
                    name=f"harvest-{cfg.run_id}-{i}", num_cpus=cfg.cluster.cpus_per_worker,
                    num_gpus=cfg.cluster.gpus_per_worker,
                ).remote(cfg, sae_by_hook)
            )
            in_flight.append(0)
        log(f"[{cfg.run_id}] {len(actors)} harvest worker(s) starting; writing to {store.url}")

    def collect(block: bool) -> None:
        import ray

        if not pending:
            return
        done, _ = ray.wait(list(pending), num_returns=1, timeout=None if block else 0)
        for ref in done:
            actor_index, payload = pending.pop(ref)
            in_flight[actor_index] -= 1
            result: ShardResult = ray.get(ref)
            if result.skipped:
                summary.shards_skipped += 1
            else:
                summary.shards_done += 1
                summary.tokens += result.tokens
                summary.pairs += result.pairs
                summary.bytes += result.bytes
        progress.update(summary)

    def on_quarantine(q: Quarantined) -> None:
        quarantined.append(dataclasses.asdict(q))
        log(f"[{cfg.run_id}] quarantined {q.file} {q.location}: {q.reason}")

    if not store.exists("manifest.json"):
        store.write_json("manifest.json", {**manifest, "status": "running"})

    depth = 1 + max(0, cfg.cluster.max_in_flight)
    current_file = None
    for shard in plan_shards(files, cfg.corpus, tokenizer, tokenizer.eos_token_id,
                             storage_options=None, on_quarantine=on_quarantine):
        if current_file != shard.file_index:
            if current_file is not None:
                progress.planned_bytes += files[current_file].size
            current_file = shard.file_index
            file_plan.append({"url": shard.file_url, "first_shard": shard.shard_id, "last_shard": shard.shard_id})
        file_plan[-1]["last_shard"] = shard.shard_id
        pos = np.searchsorted(committed, shard.shard_id)
        if pos < len(committed) and committed[pos] == shard.shard_id:
            summary.shards_skipped += 1
            continue
        ensure_actors()
        while sum(in_flight) >= depth * len(actors):
            collect(block=True)
        actor_index = int(np.argmin(in_flight))
        payload = ShardPayload(
            shard.shard_id, shard.seq_start, [c.doc_id for c in shard.contexts],
            [int(c.doc_offset) for c in shard.contexts], [c.token_ids for c in shard.contexts],
        )
        ref = actors[actor_index].process.remote(payload)
        pending[ref] = (actor_index, payload)
        in_flight[actor_index] += 1
        collect(block=False)
    while pending:
        collect(block=True)

    summary.quarantined = len(quarantined)
    summary.seconds = time.perf_counter() - started
    final = {**manifest, "status": "complete", "shard_plan": {"files": file_plan}, "quarantined": quarantined}
    if summary.shards_done or store.read_json("manifest.json") != final:
        store.write_json("manifest.json", final)
    progress.update(summary, force=True)
    for actor in actors:
        import ray

        ray.kill(actor)
    return summary

"""The driver: plan shards, hand them to harvest actors, track commits, write the manifest.

Data flows one way: plan (tokenize + pack, streamed) -> actors (harvest + encode + write +
commit marker) -> driver (progress, manifest). The driver holds only the shards in flight
and a sorted array of committed shard ids, so its memory does not grow with the corpus.
Re-running a run id skips committed shards; a run with nothing left to do changes no file.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import RunConfig
from pipeline.corpus import CorpusError, Quarantined, resolve_corpus
from pipeline.dispatch import RayDispatcher
from pipeline.ledger import FileRecord, Ledger
from pipeline.model import load_tokenizer, model_identity
from pipeline.packing import Shard
from pipeline.sink import RunStore, storage_options
from pipeline.token_cache import cached_plan_shards as plan_shards
from pipeline.worker import ShardPayload, ShardResult

SECRET_KEY = re.compile(r"(secret|password|passwd|credential|access_key|session_token|api_key|private_key)", re.IGNORECASE)


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
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
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
    retries: int = 0
    planned_bytes: int = 0  # corpus bytes fully planned so far (for the ETA)
    shards_by_node: dict[str, int] = field(default_factory=dict)
    setup_seconds: float = 0.0  # config checks, tokenizer, demo-SAE fitting: before any shard
    hookpoints: list[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> str:
        bpp = self.bytes / self.pairs if self.pairs else float("nan")
        return (
            f"run {self.run_id}: {self.shards_done} shards written, {self.shards_skipped} already committed; "
            f"{self.tokens:,} tokens, {self.pairs:,} (latent, act) pairs over {len(self.hookpoints)} hookpoint(s), "
            f"{self.bytes / 1e6:.1f} MB ({bpp:.2f} B/pair incl. contexts), {self.seconds:.1f}s extracting "
            f"(+{self.setup_seconds:.1f}s setup), {self.tokens_per_second:,.0f} tokens/s; "
            f"quarantined documents: {self.quarantined}, shard retries: {self.retries}\n"
            f"output: {self.output}"
        )


class Progress:
    """One line every few seconds: shards done, tokens/s, ETA (from max_tokens or corpus bytes)."""

    def __init__(self, run_id: str, total_tokens: int | None, total_bytes: int, every: float = 5.0):
        self.run_id, self.total_tokens, self.total_bytes, self.every = run_id, total_tokens, total_bytes, every
        self.started = time.perf_counter()
        self.last = 0.0

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
            fraction = summary.planned_bytes / self.total_bytes if self.total_bytes else 0.0
        eta = max(0.0, elapsed * (1 - fraction) / fraction) if fraction > 0 else float("nan")
        eta_text = "?" if math.isnan(eta) else f"{eta:,.0f}s"
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

    from pipeline.demo_sae import cache_path, ensure_demo_sae
    from pipeline.model import load_model

    torch.set_num_threads(cfg.cluster.torch_threads)
    model = None
    paths = {}
    for hook in cfg.sae.hookpoints:
        cached = (cache_path(cfg.sae.train, identity["sha256"], hook, files, cfg.corpus) / "cfg.json").exists()
        if not cached and model is None:
            model = load_model(cfg.model)
        paths[hook] = str(ensure_demo_sae(model, tokenizer, files, cfg.corpus, hook, cfg.sae.train,
                                          identity["sha256"], cfg.model.batch_size, log))
    return paths


def check_model(cfg: RunConfig):
    """The model's shape and hookpoints, from a meta-device copy: before anything is loaded or fitted."""
    from pipeline.preflight import check_hookpoints, meta_model, model_shape

    meta = meta_model(cfg.model)
    check_hookpoints(meta, cfg.sae.hookpoints)
    return model_shape(meta)


def check_saes(cfg: RunConfig, sae_by_hook: dict[str, str], shape) -> dict:
    """SAE against model checks before any work; returns the SAE identities for the manifest."""
    from pipeline.preflight import check_sae_against_model
    from pipeline.sae import load_sae

    identities = {}
    for hook, path in sae_by_hook.items():
        sae = load_sae(path, hookpoint=hook)
        check_sae_against_model(sae, hook, shape, cfg.model.name, cfg.sae)
        identities[hook] = {
            "path": path, "format": sae.format, "sha256": sae.sha256, "d_in": sae.d_in,
            "n_latents": sae.n_latents, "k": cfg.sae.k or sae.k, "hookpoint_trained": sae.hookpoint,
        }
    return identities


def make_actor_class():
    import ray

    # Ray restarts a dead actor and retries its task itself (max_restarts/max_task_retries);
    # the dispatcher redoes a shard elsewhere when that is exhausted. max_concurrency=2 lets
    # the next shard compute while the previous one's Parquet parts upload.
    @ray.remote(max_restarts=2, max_task_retries=2, max_concurrency=2)
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
                sae = load_sae(path, hookpoint=hook).to(device)
                sae.k = cfg.sae.k or sae.k
                sae.backend = cfg.sae.backend
                saes[hook] = sae
            store = RunStore(cfg.sink, cfg.run_id)
            self.run_id = cfg.run_id
            self.worker = ShardWorker(model, saes, store, cfg.model.batch_size, device, cfg.faults)

        def process(self, payload: ShardPayload) -> ShardResult:
            result = self.worker.process(payload)
            result.node = ray.get_runtime_context().get_node_id()
            what = "already committed" if result.skipped else f"{result.tokens} tokens in {result.seconds:.1f}s"
            print(f"[{self.run_id}] shard {payload.shard_id:06d}: {what}", flush=True)  # worker log: run + shard
            return result

    return HarvestActor


def start_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TQDM_DISABLE": "1",
           "OMP_NUM_THREADS": str(cfg.cluster.torch_threads)}
    # Where S3 is, not who we are: keys come from each node's environment or role, since
    # anything in a runtime_env is stored by Ray and may reach its logs.
    for name in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        if os.environ.get(name):
            env[name] = os.environ[name]
    if cfg.cluster.address:
        # Inside `ray job submit` the job's runtime env already sets its env vars for the driver and
        # every worker, and Ray refuses a driver runtime_env that sets one of them again.
        import json

        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {})
        env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
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
    }


def plan_run(cfg: RunConfig, files, ledger: Ledger, committed: np.ndarray, tokenizer, storage_opts,
             summary: RunSummary, log=print) -> Iterator[Shard]:
    """Shards still to do, in ledger order: known files first (same shards as before), then new
    files after every known shard. Skipped shards are counted in `summary`, not yielded."""
    current = {f.url: f for f in files}
    known = []
    for rec in ledger.in_order():
        f = current.get(rec.url)
        if f is None:
            log(f"[{cfg.run_id}] {rec.url} is no longer in the corpus; its {rec.n_shards} committed shard(s) stay")
            continue
        if f.fingerprint != rec.fingerprint:
            if cfg.corpus.on_changed_file == "error":
                raise CorpusError(
                    f"{rec.url} changed since run {cfg.run_id!r} planned it (fingerprint {rec.fingerprint} -> "
                    f"{f.fingerprint}); use a new run_id, or corpus.on_changed_file=skip to keep the earlier output"
                )
            log(f"[{cfg.run_id}] {rec.url} changed; keeping its earlier output (corpus.on_changed_file=skip)")
            continue
        known.append((f, rec))
    new = [f for f in files if f.url not in ledger.records]
    budget = cfg.corpus.max_tokens

    def is_committed(shard_id: int) -> bool:
        pos = np.searchsorted(committed, shard_id)
        return bool(pos < len(committed) and committed[pos] == shard_id)

    for f, rec in known + [(f, None) for f in new]:
        if budget is not None and budget <= 0:
            return
        if rec is None:
            rec = FileRecord(ordinal=ledger.next_ordinal(), url=f.url, fingerprint=f.fingerprint,
                             first_shard=ledger.next_shard(int(committed[-1]) if len(committed) else -1))
            ledger.save(rec)  # first shard fixed before any of the file's shards is submitted
        elif rec.complete and all(is_committed(s) for s in range(rec.first_shard, rec.last_shard + 1)):
            summary.shards_skipped += rec.n_shards
            if budget is not None:
                budget -= rec.tokens
            continue
        file_cfg = dataclasses.replace(cfg.corpus, max_tokens=budget)
        quarantined: list[dict] = []

        def on_quarantine(q: Quarantined, quarantined: list[dict] = quarantined) -> None:
            quarantined.append(dataclasses.asdict(q))
            log(f"[{cfg.run_id}] quarantined {q.file} {q.location}: {q.reason}")

        contexts = tokens = 0
        last = None
        for shard in plan_shards([f], file_cfg, tokenizer, tokenizer.eos_token_id, storage_options=storage_opts,
                                 on_quarantine=on_quarantine, first_shard=rec.first_shard):
            last = shard.shard_id
            contexts += len(shard.contexts)
            n_tokens = sum(len(c.token_ids) for c in shard.contexts)
            tokens += n_tokens
            if is_committed(shard.shard_id):
                summary.shards_skipped += 1
            else:
                rec = ledger.reserve(rec, shard.shard_id)  # durable before the shard is submitted
                yield shard
        summary.quarantined += len(quarantined)
        summary.planned_bytes += f.size
        truncated = budget is not None and tokens >= budget
        rec = dataclasses.replace(rec, last_shard=last if last is not None else rec.first_shard - 1,
                                  contexts=contexts, tokens=tokens, complete=not truncated,
                                  quarantined=quarantined)
        ledger.save(rec)
        if budget is not None:
            budget -= tokens


def run(cfg: RunConfig, log=print, dispatcher=None) -> RunSummary:
    """Extract latents for `cfg`; resumable: a second call with the same run id does only what is left."""
    started = time.perf_counter()
    store = RunStore(cfg.sink, cfg.run_id)
    corpus_opts = storage_options(cfg.sink) if any(p.startswith("s3://") for p in cfg.corpus.paths) else None
    files = resolve_corpus(cfg.corpus, corpus_opts)
    tokenizer = load_tokenizer(cfg.model)
    identity = model_identity(cfg.model)
    shape = check_model(cfg)
    sae_by_hook = prepare_saes(cfg, files, tokenizer, identity, log)
    sae_ids = check_saes(cfg, sae_by_hook, shape)
    manifest = manifest_for(cfg, identity, sae_ids, tokenizer, files)

    if store.exists("manifest.json"):
        previous = store.read_json("manifest.json")
        for key in ("hookpoints", "ctx_len", "shard_size", "saes", "model"):
            if previous.get(key) != manifest[key]:
                raise ValueError(
                    f"run {cfg.run_id!r} at {store.url} was made with a different {key} "
                    f"({previous.get(key)!r} vs now {manifest[key]!r}); use a new run_id"
                )
    else:
        store.write_json("manifest.json", {**manifest, "status": "running"})

    summary_setup = time.perf_counter() - started
    started = time.perf_counter()
    ledger = Ledger(store)
    committed = np.asarray(store.committed_shards(), dtype=np.int64)
    summary = RunSummary(cfg.run_id, store.url, hookpoints=list(cfg.sae.hookpoints), setup_seconds=summary_setup)
    progress = Progress(cfg.run_id, cfg.corpus.max_tokens, sum(f.size for f in files))

    def account(results: list[ShardResult]) -> None:
        for r in results:
            if r.skipped:
                summary.shards_skipped += 1
                continue
            summary.shards_done += 1
            summary.shards_by_node[r.node] = summary.shards_by_node.get(r.node, 0) + 1
            summary.tokens += r.tokens
            summary.pairs += r.pairs
            summary.bytes += r.bytes
        progress.update(summary)

    try:
        for shard in plan_run(cfg, files, ledger, committed, tokenizer, corpus_opts, summary, log):
            if dispatcher is None:
                dispatcher = ray_dispatcher(cfg, sae_by_hook, log)
                log(f"[{cfg.run_id}] {cfg.cluster.num_workers} harvest worker(s); writing to {store.url}")
            while not dispatcher.has_room():
                account(dispatcher.completed(block=True))
            dispatcher.submit(to_payload(shard))
            account(dispatcher.completed(block=False))
        while dispatcher is not None and dispatcher.pending():
            account(dispatcher.completed(block=True))
    finally:
        if dispatcher is not None:
            summary.retries = dispatcher.retries
            dispatcher.close()

    summary.seconds = time.perf_counter() - started
    final = {**manifest, "status": "complete", "files": ledger.summary(), "quarantined": ledger.quarantined()}
    if store.read_json("manifest.json") != final:
        store.write_json("manifest.json", final)
    progress.update(summary, force=True)
    return summary


def to_payload(shard: Shard) -> ShardPayload:
    return ShardPayload(shard.shard_id, shard.seq_start, [c.doc_id for c in shard.contexts],
                        [int(c.doc_offset) for c in shard.contexts], [c.token_ids for c in shard.contexts])


def ray_dispatcher(cfg: RunConfig, sae_by_hook: dict[str, str], log=print) -> RayDispatcher:
    start_ray(cfg)
    actor_cls = make_actor_class()

    def make_actor(i: int):
        return actor_cls.options(
            name=f"harvest-{cfg.run_id}-{i}-{time.time_ns() % 10**9}", num_cpus=cfg.cluster.cpus_per_worker,
            num_gpus=cfg.cluster.gpus_per_worker, resources=dict(cfg.cluster.worker_resources) or None,
        ).remote(cfg, sae_by_hook)

    return RayDispatcher(make_actor, cfg.cluster.num_workers, 1 + max(0, cfg.cluster.max_in_flight),
                         cfg.cluster.max_shard_attempts, log)

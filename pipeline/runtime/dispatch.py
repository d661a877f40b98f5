"""Getting shards done: the harvest actors and a bounded queue of shard payloads over them.

`HarvestActor` is a plain class (the model, the SAEs and a `ShardWorker`); `ray_dispatcher`
starts Ray and wraps it with `ray.remote(**HARVEST_ACTOR_OPTIONS)` when the pool starts, as
Ray Data does with its `_MapWorker`. `RayDispatcher` keeps at most `depth` shards per actor in
flight (one computing, the next already queued so its tokens are ready when the actor frees up),
replaces dead actors, decides which shard a death is charged to, and sets poison shards aside. `InlineDispatcher` runs a function in-process; the
driver benchmark uses it with a no-op worker to measure the driver's own cost.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.cli import setup_logging
from pipeline.config import RunConfig
from pipeline.data.corpus import CorpusFile
from pipeline.outputs.layout import is_crosscoder_id
from pipeline.outputs.sink import RunStore
from pipeline.runtime.worker import ShardPayload, ShardResult, ShardTask

log = logging.getLogger(__name__)

# Ray neither restarts a dead actor nor replays its queue: `RayDispatcher` replaces the worker and
# decides which shard was to blame and what runs next (an order Ray's retries would not keep).
# max_concurrency=2 lets the next shard compute while the previous one's Parquet parts upload.
HARVEST_ACTOR_OPTIONS = {"max_restarts": 0, "max_task_retries": 0, "max_concurrency": 2}


class HarvestActor:
    """Owns the model and SAEs for its whole life; one per GPU (or CPU slot)."""

    def __init__(self, cfg: RunConfig, sae_by_hook: dict[str, str], quiet: bool = False):
        import ray
        import torch

        from pipeline.model.loader import load_model
        from pipeline.sae.formats import load_sae

        setup_logging(quiet)  # a worker process has no Hydra logging config of its own
        torch.set_num_threads(max(1, cfg.cluster.torch_threads))
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        model = load_model(cfg.model, device)
        with_decoder = cfg.sae.fvu_sample > 0  # extraction only encodes; the FVU check decodes
        saes = {}
        for hook, path in sae_by_hook.items():
            if cfg.sae.latent_splits > 1:
                sae = open_split_sae(cfg, path, hook, with_decoder)
            else:
                # In the compute dtype, straight into the kernel layout on the device; the decoder
                # only when the FVU check needs it.
                sae = load_sae(path, hookpoint=None if is_crosscoder_id(hook) else hook, dtype=cfg.sae.dtype,
                               device=device, with_decoder=with_decoder)
                sae.backend = cfg.sae.backend
            sae.k = cfg.sae.k or sae.k
            saes[hook] = sae
        self.loaded = (model, saes, device, load_checkpoints(cfg, saes, model, device))
        self.bind(cfg)

    def bind(self, cfg: RunConfig) -> None:
        """Serve run `cfg` (its output, faults, acts dtype) with what this worker loaded: a kept
        worker (cluster.reuse_workers) is bound to the next run whose `worker_key` is the same."""
        from pipeline.runtime.worker import ShardWorker

        model, saes, device, checkpoints = self.loaded
        self.run_id = cfg.run_id
        self.worker = ShardWorker(model, saes, RunStore(cfg.sink, cfg.run_id), cfg.model.batch_size, device,
                                  cfg.faults, fvu_sample=cfg.sae.fvu_sample, acts_dtype=cfg.output.acts_dtype,
                                  checkpoints=checkpoints)

    def close(self) -> None:
        """Remove the latent-split parts and their placement groups (Ray keeps a placement group
        an actor made after `ray.kill` of that actor)."""
        for sae in self.worker.saes.values():
            if hasattr(sae, "close"):
                sae.close()

    def process(self, payload: ShardTask | ShardPayload) -> ShardResult:
        import ray

        try:
            result = self.worker.process(payload)
        except ray.exceptions.RayActorError as err:
            # Only a latent-split part can raise this here: it died and Ray's restarts of it are
            # used up. The worker is the harvest actor plus its parts, so it dies as one (its
            # placement group and parts go with it) and the shard is redone like any worker death.
            log.error(f"[{self.run_id}] shard {payload.shard_id:06d}: a latent-split part died ({err}); "
                      "ending this worker")
            logging.shutdown()
            os._exit(1)
        result.node = ray.get_runtime_context().get_node_id()
        what = "already committed" if result.skipped else f"{result.tokens} tokens in {result.seconds:.1f}s"
        log.info(f"[{self.run_id}] shard {payload.shard_id:06d}: {what}")  # worker log: run + shard
        return result


def load_checkpoints(cfg: RunConfig, saes: dict, model, device: str) -> dict:
    """The `model.checkpoints` the crosscoders read, all resident (one per name; the main model's
    object where a checkpoint is `model.path` itself). Same dtype and loader as the main model."""
    import dataclasses

    from pipeline.model.loader import load_model
    from pipeline.runtime.sources import dictionary_inputs

    wanted = {ck for d, sae in saes.items() for ck, _ in dictionary_inputs(d, sae) if ck is not None}
    out = {}
    for name in sorted(wanted):
        path = cfg.model.checkpoints[name]
        out[name] = model if path == cfg.model.path else load_model(dataclasses.replace(cfg.model, path=path), device)
    return out


def open_split_sae(cfg: RunConfig, path: str, hook: str, with_decoder: bool):
    """`sae.latent_splits` parts for one hookpoint, in a placement group owned by this actor.

    Bundles take GPUs when the workers do (`sae.split_gpus`, default 1 per part on a GPU
    cluster), CPU slots otherwise. Owned by the harvest actor: if it dies, Ray removes them too."""
    import ray

    from pipeline.sae.latent_split import open_split

    owner = ray.get_runtime_context().get_actor_name() or "driver"
    gpus = cfg.sae.split_gpus if cfg.sae.split_gpus is not None else (1.0 if cfg.cluster.gpus_per_worker > 0 else 0.0)
    return open_split(path, hook, cfg.sae.latent_splits, with_decoder=with_decoder, backend=cfg.sae.backend,
                      dtype=cfg.sae.dtype, num_cpus=cfg.sae.split_cpus, num_gpus=gpus, strategy=cfg.sae.split_strategy,
                      max_restarts=cfg.sae.split_max_restarts, name=f"{owner}/{hook}")


def local_ray_system_config(num_cpus: int) -> dict:
    """Ray settings for a local instance of our own: keep one idle task process per CPU. With Ray's
    default (`num_workers_soft_limit=-1`), once the harvest actors hold the CPUs every idle tokenize
    or post-processing process is ended within about a second (seen with Ray 2.60:
    tests/test_driver_tokenize.py), and the next file, post-processing task or run in this driver
    (a sweep's members, a notebook, the tests) paid for a new process and its torch/transformers
    imports again, ~3 s of CPU each. An explicit limit keeps that many warm processes."""
    return {"num_workers_soft_limit": int(num_cpus)}


def start_ray(cfg: RunConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Ray's token-auth banner (a WARNING at every local start, then where it saved the token) tells a
    # user of the local instance nothing to act on; infra/submit.sh sends the token when it exists.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
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
        job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {})
        env = {k: v for k, v in env.items() if k not in (job_env.get("env_vars") or {})}
        ray.init(address=cfg.cluster.address, runtime_env={"env_vars": env}, log_to_driver=True)
    else:
        # Locally every worker also needs its latent-split parts' CPU slots (sae.latent_splits).
        parts = len(cfg.sae.hookpoints) * cfg.sae.latent_splits if cfg.sae.latent_splits > 1 else 0
        per_worker = cfg.cluster.cpus_per_worker + parts * cfg.sae.split_cpus
        num_cpus = max(os.cpu_count() or 1, math.ceil(per_worker * cfg.cluster.num_workers))
        # address="local": a Ray of our own even when `ray start --head` (or RAY_ADDRESS) offers one to
        # join, since cluster.address=null says so and a joined cluster refuses num_cpus.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=True, _system_config=local_ray_system_config(num_cpus))


# Harvest workers kept by runs with cluster.reuse_workers, by `worker_key`: (actor, name, hookpoints).
_kept: dict[str, list[tuple]] = {}


def worker_key(cfg: RunConfig, sae_by_hook: dict[str, str], quiet: bool) -> str:
    """What a harvest worker loads and holds: runs that agree on it can share workers."""
    c = cfg.cluster
    return json.dumps([dataclasses.asdict(cfg.model), dataclasses.asdict(cfg.sae), sae_by_hook, c.cpus_per_worker,
                       c.gpus_per_worker, c.worker_resources, c.torch_threads, quiet], sort_keys=True, default=str)


def _end_worker(actor, name: str | None, hooks) -> None:
    """Kill a harvest actor and remove its latent-split placement groups (`<name>/<hookpoint>`): a
    placement group made by an actor lives as long as the driver, so a dead worker's would hold its
    GPUs/CPUs for the rest of the run and its replacement might never be scheduled."""
    import ray

    ray.kill(actor, no_restart=True)
    _remove_split_groups(name, hooks)


def _remove_split_groups(name: str | None, hooks) -> None:
    """Remove a harvest actor's latent-split placement groups, `<actor name>/<hookpoint>`."""
    from ray.util.placement_group import get_placement_group, remove_placement_group

    for hook in hooks if name else ():
        try:
            remove_placement_group(get_placement_group(f"{name}/{hook}"))
        except Exception:  # noqa: BLE001  never made, or removed by the actor's own close()
            pass


def release_kept_workers(except_key: str | None = None) -> int:
    """End the workers kept by cluster.reuse_workers (all, or all but `except_key`'s): they hold
    their CPU/GPU slots, which other work in this driver may need. Returns how many."""
    import ray

    gone = [k for k in _kept if k != except_key]
    ended = 0
    for key in gone:
        workers = _kept.pop(key)
        try:
            ray.get([a.close.remote() for a, _, _ in workers], timeout=60)
        except Exception as err:  # noqa: BLE001  a dead worker has nothing left to free
            log.debug(f"[dispatch] closing kept workers: {err}")
        for actor, name, hooks in workers:
            _end_worker(actor, name, hooks)
        ended += len(workers)
    return ended


def ray_dispatcher(cfg: RunConfig, sae_by_hook: dict[str, str]) -> RayDispatcher:
    """Start Ray (or join cfg.cluster.address) and a pool of `cluster.num_workers` harvest actors
    (with cluster.reuse_workers, first those an earlier run in this driver kept, if they loaded the same)."""
    import ray

    start_ray(cfg)
    actor_cls = ray.remote(**HARVEST_ACTOR_OPTIONS)(HarvestActor)
    quiet = not log.isEnabledFor(logging.INFO)
    key = worker_key(cfg, sae_by_hook, quiet)
    release_kept_workers(except_key=key if cfg.cluster.reuse_workers else None)  # their slots are needed now
    kept = _kept.pop(key, [])
    hooks = list(sae_by_hook)

    names: dict[int, str] = {}  # id(actor handle) -> actor name

    def make_actor(i: int):
        while kept:
            actor, name, _ = kept.pop()
            try:  # alive, and bound to this run before any shard is sent (actor calls run in order)
                ray.get(actor.bind.remote(cfg), timeout=120)
            except Exception as err:  # noqa: BLE001  gone since (killed, node lost): start a new one
                log.info(f"[{cfg.run_id}] a kept harvest worker is gone ({type(err).__name__}); starting a new one")
                _end_worker(actor, name, hooks)
                continue
            names[id(actor)] = name
            return actor
        name = f"harvest-{cfg.run_id}-{i}-{time.time_ns() % 10**9}"
        actor = actor_cls.options(
            name=name, num_cpus=cfg.cluster.cpus_per_worker,
            num_gpus=cfg.cluster.gpus_per_worker, resources=dict(cfg.cluster.worker_resources) or None,
        ).remote(cfg, sae_by_hook, quiet)
        names[id(actor)] = name
        return actor

    def release(actor) -> None:
        """A gone worker's latent-split placement groups (see `_end_worker`)."""
        name = names.pop(id(actor), None)
        if cfg.sae.latent_splits > 1:
            _remove_split_groups(name, hooks)

    def keep(actor) -> bool:
        """At the end of the run: an idle, live worker is kept for the next run (cluster.reuse_workers)."""
        if not cfg.cluster.reuse_workers or id(actor) not in names:
            return False
        _kept.setdefault(key, []).append((actor, names.pop(id(actor)), hooks))
        return True

    return RayDispatcher(make_actor, cfg.cluster.num_workers, 1 + max(0, cfg.cluster.max_in_flight),
                         cfg.cluster.max_shard_attempts, release=release, keep=keep)


class ShardFailed(RuntimeError):
    pass


GROUP_FILES = 64  # files per tokenize task at most: empty or tiny files do not make one task of a corpus


@dataclass
class TokenizeTask:
    handle: object
    results: list | None = None  # each file's metadata or error, once fetched
    left: int = 0  # its files whose result the driver has not taken yet


class TokenizePool:
    """Tokenize tasks (`pipeline.runtime.staging.stage_files`) for the files the driver will need,
    at most `window` tasks ahead, results taken in file order. Consecutive files of at most
    `group_bytes` together (and at most GROUP_FILES) share a task; a larger file has one of its
    own: a task in a new process pays its imports and tokenizer load (~3 s of CPU) once for the group.

    `start(jobs)` starts a task for [(file, cap), ...] and returns a handle, `get(handle)` its list
    (each file's metadata, or the error that file raised), `ready(handle)` whether `get` would return
    at once, `cancel(handles)` gives up on the rest. The Ray pool (`ray_tokenize_pool`) runs plain
    CPU tasks on any node; `inline_tokenize_pool` tokenizes in this process (bench/driver.py and
    tests: the driver with the work taken out)."""

    def __init__(self, start: Callable, get: Callable, ready: Callable, cancel: Callable, window: int,
                 group_bytes: int = 0):
        self._start, self._get, self._ready, self._cancel = start, get, ready, cancel
        self.window = max(1, window)
        self.group_bytes = group_bytes
        self.jobs: list[tuple[CorpusFile, int | None]] = []  # every file the plan may need, in order
        self.where: dict[int, tuple[int, int]] = {}  # job index -> (its task's first job, position in it)
        self.tasks: dict[int, TokenizeTask] = {}  # by its first job, until every result is taken
        self.next = 0  # next job index to start

    def add(self, file: CorpusFile, cap: int | None) -> int:
        self.jobs.append((file, cap))
        return len(self.jobs) - 1

    def _fill(self, upto: int) -> None:
        while self.next < len(self.jobs) and (self.next <= upto or len(self.tasks) < self.window):
            first, size = self.next, self.jobs[self.next][0].size
            end = first + 1
            while (end < len(self.jobs) and end - first < GROUP_FILES
                   and size + self.jobs[end][0].size <= self.group_bytes):
                size += self.jobs[end][0].size
                end += 1
            self.tasks[first] = TokenizeTask(self._start(self.jobs[first:end]), left=end - first)
            self.where.update({j: (first, j - first) for j in range(first, end)})
            self.next = end

    def ready(self, i: int) -> bool:
        self._fill(i)
        task = self.tasks[self.where[i][0]]
        return task.results is not None or self._ready(task.handle)

    def result(self, i: int) -> dict:
        self._fill(i)
        first, pos = self.where.pop(i)
        task = self.tasks[first]
        if task.results is None:
            task.results = self._get(task.handle)
        task.left -= 1
        if not task.left:
            del self.tasks[first]
        self._fill(i)
        meta = task.results[pos]
        if isinstance(meta, Exception):
            raise meta
        return meta

    def close(self) -> None:
        """Stop the tasks not taken (a `corpus.max_tokens` plan ends before them) and wait for them,
        so none writes to the staging area after the run removed it."""
        running = [task.handle for task in self.tasks.values() if task.results is None]
        if running:
            self._cancel(running)
        self.tasks.clear()
        self.where.clear()


def ray_tokenize_pool(cfg: RunConfig, storage_options: dict | None) -> TokenizePool:
    import ray

    from pipeline.runtime.staging import stage_files

    start_ray(cfg)
    # max_retries: a worker lost mid-task (node gone) runs it again; staging is idempotent (the .json
    # marker is written last), so a retry is safe.
    task = ray.remote(max_retries=2)(stage_files).options(num_cpus=cfg.cluster.tokenize_cpus)

    def get(ref):
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # the task's own error (bad setting), as it was
            raise (err.cause if isinstance(err.cause, Exception) else err) from None

    return TokenizePool(lambda jobs: task.remote(cfg, jobs, storage_options), get,
                        lambda ref: bool(ray.wait([ref], timeout=0)[0]), cancel_tasks, cfg.cluster.tokenize_ahead,
                        group_bytes(cfg))


def group_bytes(cfg: RunConfig) -> int:
    return int(cfg.cluster.tokenize_group_mb * 2**20)


def cancel_tasks(refs: list) -> None:
    """Give up on Ray tasks and wait until none runs. A running one is stopped by killing its
    worker process (`force=True`), never by the KeyboardInterrupt that `force=False` raises
    wherever the task happens to be: inside `import torch` that leaves the process with a
    half-initialised torch._C, and the next task it runs fails to import torch ("bad call flags",
    "module functions cannot set METH_CLASS", or a segfault). A task not started yet is dropped."""
    import ray

    for ref in refs:
        ray.cancel(ref, force=True)
    for ref in refs:
        try:
            ray.get(ref)
        except Exception:  # cancelled, killed, or failed: its result is not wanted either way
            pass


def inline_tokenize_pool(cfg: RunConfig, storage_options: dict | None) -> TokenizePool:
    from pipeline.runtime.staging import stage_files

    return TokenizePool(lambda jobs: jobs, lambda jobs: stage_files(cfg, jobs, storage_options),
                        lambda jobs: True, lambda handles: None, 1, group_bytes(cfg))


class InlineDispatcher:
    def __init__(self, fn: Callable[[ShardPayload], ShardResult]):
        self.fn = fn
        self.done: deque[ShardResult] = deque()
        self.retries = 0
        self.charged: dict[int, int] = {}
        self.poisoned: list[PoisonShard] = []

    def has_room(self) -> bool:
        return True

    def submit(self, payload: ShardPayload) -> None:
        self.done.append(self.fn(payload))

    def completed(self, block: bool) -> list[ShardResult]:
        out = list(self.done)
        self.done.clear()
        return out

    def pending(self) -> int:
        return len(self.done)

    def close(self) -> None:
        pass


@dataclass
class PoisonShard:
    """A shard that killed a worker `attempts` times, each time alone on it: the cause beyond doubt."""

    task: ShardTask | ShardPayload
    attempts: int
    cause: str  # the last death as Ray reported it (exit code, signal, out of memory)


@dataclass
class WorkerSlot:
    actor: object
    load: int = 0  # shards in flight on it
    alone: bool = False  # running one suspect shard with nothing queued beside it
    fresh: bool = True  # no shard finished on it yet (a replacement): where suspects go first


class RayDispatcher:
    """At most `depth` shards in flight per actor; a shard lost with its worker is redone here.

    Ray replays nothing (HARVEST_ACTOR_OPTIONS): when a worker dies, the pool alone decides what
    runs next, so the outcome never depends on which of its queued tasks Ray would have retried
    first. Attribution: a death is charged to a shard only when it was the only shard on the
    worker; shards in flight together (one computing, one uploading, the rest queued) are all
    redone uncharged, each alone on a worker, where a second death is unambiguous. A shard
    charged `max_attempts` deaths is a poison shard: set aside in `poisoned`, never resubmitted,
    while every other shard goes on (the driver applies `cluster.on_poison_shard`)."""

    def __init__(self, make_actor: Callable[[int], object], n_actors: int, depth: int, max_attempts: int,
                 release: Callable[[object], None] = lambda actor: None,
                 keep: Callable[[object], bool] = lambda actor: False):
        self.make_actor = make_actor
        self.release = release  # frees what a killed actor held outside itself
        self.keep = keep  # at close: takes an idle live worker for a later run (True) or not
        self.slots = [WorkerSlot(make_actor(i)) for i in range(n_actors)]
        self.depth = depth
        self.max_attempts = max_attempts
        self.inflight: dict = {}  # ObjectRef -> (slot index, payload)
        self.suspects: deque = deque()  # shards lost with others: each runs next alone on a worker
        self.charged: dict[int, int] = {}  # shard id -> deaths it alone can have caused
        self.poisoned: list[PoisonShard] = []
        self.retries = 0  # shards redone after their worker died

    def has_room(self) -> bool:
        self._place_suspects()
        return any(not s.alone and s.load < self.depth for s in self.slots)

    def submit(self, payload: ShardTask | ShardPayload) -> None:
        self._place_suspects()
        free = [i for i, s in enumerate(self.slots) if not s.alone and s.load < self.depth]
        self._send(min(free, key=lambda j: self.slots[j].load), payload)

    def _send(self, i: int, payload) -> None:
        ref = self.slots[i].actor.process.remote(payload)
        self.inflight[ref] = (i, payload)
        self.slots[i].load += 1

    def _place_suspects(self) -> None:
        """Each idle worker takes the next suspect, alone: nothing else goes to it until it is done.
        Fresh workers (a dead one's replacement) first, so what an earlier shard left behind in a
        process (memory, a wedged GPU context) is not blamed on the suspect."""
        for i in sorted(range(len(self.slots)), key=lambda j: not self.slots[j].fresh):
            if not self.suspects:
                return
            if self.slots[i].load == 0:
                self.slots[i].alone = True
                self._send(i, self.suspects.popleft())

    def pending(self) -> int:
        return len(self.inflight) + len(self.suspects)

    def completed(self, block: bool) -> list[ShardResult]:
        import ray

        self._place_suspects()
        if not self.inflight:
            return []
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=None if block else 0)
        results = []
        for ref in ready:
            if ref not in self.inflight:  # taken with its dead worker's other shards below
                continue
            i, payload = self.inflight.pop(ref)
            self.slots[i].load -= 1
            try:
                result = ray.get(ref)
            except worker_lost_errors() as err:
                results += self._worker_died(i, payload, err)
                continue
            if self.slots[i].alone:  # the suspect was innocent: the worker takes normal work again
                self.slots[i].alone = False
            self.slots[i].fresh = False
            results.append(result)
        self._place_suspects()
        return results

    def _worker_died(self, i: int, payload, err: Exception) -> list[ShardResult]:
        """Worker `i` is gone with `payload`: kill and replace it, take what its other shards
        finished, and charge or requeue what they did not. Returns the finished results."""
        import ray

        if getattr(err, "actor_init_failed", False):  # every new worker would fail the same way
            raise WorkerStartFailed(f"a harvest worker failed to start: {err}") from err
        # Killed first: a worker that only looks dead (unreachable) must not come back and write.
        ray.kill(self.slots[i].actor, no_restart=True)
        self.release(self.slots[i].actor)
        others = [r for r, (j, _) in self.inflight.items() if j == i]
        if others:  # they end at once now (failed, or finished just before the death)
            ray.wait(others, num_returns=len(others), timeout=30)
        lost, results = [(payload, err)], []
        for ref in others:
            _, p = self.inflight.pop(ref)
            try:
                results.append(ray.get(ref, timeout=0))
            except Exception as e:  # noqa: BLE001  lost with the worker, whatever Ray calls it
                lost.append((p, e))
        self.slots[i] = WorkerSlot(self.make_actor(i))
        self.retries += len(lost)
        sole = len(lost) == 1
        if not sole:
            names = ", ".join(str(p.shard_id) for p, _ in lost)
            log.warning(f"[dispatch] worker {i} died with shards {names} in flight; none is charged: "
                        f"each runs alone next ({death_cause(err)})")
        for p, e in lost:
            if sole:
                self.charged[p.shard_id] = self.charged.get(p.shard_id, 0) + 1
            attempts = self.charged.get(p.shard_id, 0)
            if attempts >= self.max_attempts:
                log.error(f"[dispatch] shard {p.shard_id} killed its worker {attempts} time(s), alone on it: "
                          f"a poison shard ({death_cause(e)})")
                self.poisoned.append(PoisonShard(p, attempts, death_cause(e)))
                continue
            if sole:
                log.warning(f"[dispatch] shard {p.shard_id}: worker lost ({death_cause(e)}); redoing it alone "
                            f"(charged {attempts}/{self.max_attempts})")
            self.suspects.append(p)
        return results

    def close(self) -> None:
        import ray

        busy = {i for i, _ in self.inflight.values()}  # a worker with work left is never kept
        ending = [s for i, s in enumerate(self.slots) if i in busy or not self.keep(s.actor)]
        try:  # free what the actors hold outside themselves (latent-split placement groups)
            ray.get([s.actor.close.remote() for s in ending if hasattr(s.actor, "close")], timeout=60)
        except Exception as err:  # a dead actor has nothing left to free; killing it below is enough
            log.debug(f"[dispatch] closing workers: {err}")
        for slot in ending:
            ray.kill(slot.actor, no_restart=True)
            self.release(slot.actor)
        # `ray.kill` returns before the processes are gone. Return only once every task given to
        # the pool has ended, so that no process of it writes into the run after `close`.
        if self.inflight:
            ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=60)


class WorkerStartFailed(RuntimeError):
    pass


def worker_lost_errors() -> tuple[type, ...]:
    """What `ray.get` raises when a shard's worker (or its node) died under it."""
    import ray

    e = ray.exceptions
    # OutOfMemoryError: Ray's memory monitor killed the worker process (it says so in the message).
    return (e.RayActorError, e.WorkerCrashedError, e.ObjectLostError, e.NodeDiedError, e.OutOfMemoryError)


def death_cause(err: Exception) -> str:
    """The lines of a Ray death error that say why: exit code or signal, out of memory, node gone."""
    # Ray's text goes on with a generic list of possible causes: not this death's, so cut there.
    lines = [ln.split("Some common causes")[0].strip() for ln in str(err).splitlines()]
    keep = [ln for ln in lines if ln and any(w in ln.lower() for w in (
        "pid:", "exit", "signal", "memory", "oom", "killed", "node", "died", "crash", "sigkill", "sigsegv"))]
    text = " | ".join(keep or lines[:1]) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:600]

"""Getting shards done: a bounded queue of shard payloads over a pool of harvest actors.

`RayDispatcher` keeps at most `depth` shards per actor in flight (one computing, the next
already queued so its tokens are ready when the actor frees up), redoes a shard elsewhere when
its actor dies, and replaces dead actors. `InlineDispatcher` runs a function in-process; the
driver benchmark uses it with a no-op worker to measure the driver's own cost.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pipeline.worker import ShardPayload, ShardResult


class ShardFailed(RuntimeError):
    pass


class InlineDispatcher:
    def __init__(self, fn: Callable[[ShardPayload], ShardResult]):
        self.fn = fn
        self.done: deque[ShardResult] = deque()
        self.retries = 0

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


class RayDispatcher:
    def __init__(self, make_actor: Callable[[int], object], n_actors: int, depth: int, max_attempts: int, log=print):
        self.make_actor = make_actor
        self.actors = [make_actor(i) for i in range(n_actors)]
        self.load = [0] * n_actors
        self.depth = depth
        self.max_attempts = max_attempts
        self.inflight: dict = {}  # ObjectRef -> (actor index, payload, attempt)
        self.retries = 0
        self.log = log

    def has_room(self) -> bool:
        return len(self.inflight) < self.depth * len(self.actors)

    def submit(self, payload: ShardPayload, attempt: int = 1) -> None:
        i = min(range(len(self.actors)), key=lambda j: self.load[j])
        ref = self.actors[i].process.remote(payload)
        self.inflight[ref] = (i, payload, attempt)
        self.load[i] += 1

    def pending(self) -> int:
        return len(self.inflight)

    def completed(self, block: bool) -> list[ShardResult]:
        import ray

        if not self.inflight:
            return []
        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=None if block else 0)
        results = []
        for ref in ready:
            i, payload, attempt = self.inflight.pop(ref)
            self.load[i] -= 1
            try:
                results.append(ray.get(ref))
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError, ray.exceptions.NodeDiedError) as err:
                # The actor (or its node) died with the shard; Ray's own retries are exhausted.
                # Committing is idempotent (same keys, same bytes, marker last), so redo it.
                if attempt >= self.max_attempts:
                    raise ShardFailed(f"shard {payload.shard_id} failed {attempt} times; last: {err}") from err
                self.retries += 1
                self.log(f"[dispatch] shard {payload.shard_id}: worker lost ({type(err).__name__}); "
                         f"redoing it (attempt {attempt + 1}/{self.max_attempts})")
                self._replace_if_dead(i)
                self.submit(payload, attempt + 1)
        return results

    def _replace_if_dead(self, i: int) -> None:
        import ray

        try:
            ray.get(self.actors[i].__ray_ready__.remote(), timeout=60)
        except Exception:  # dead for good (restarts exhausted): start a fresh one in its slot
            self.log(f"[dispatch] replacing dead worker {i}")
            self.actors[i] = self.make_actor(i)

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

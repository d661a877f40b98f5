"""Which shard killed the worker: attribution in `RayDispatcher`, with real Ray actors that really
die (`os._exit`) but carry no model, so every queueing pattern runs in seconds.

The pool's rule: a death is charged only to a shard that was alone on the dying worker; shards in
flight together are redone uncharged, each alone, so the outcome never depends on timing (which
of them had started, which Ray would have retried first). The end-to-end versions, with the
real harvest worker, exactly-once files and both `cluster.on_poison_shard` policies, are in
tests/test_faults.py.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytestmark = pytest.mark.slow


def drain(pool, shard_ids: list[int]) -> list[int]:
    """Submit as the driver does (wait while full) and collect every result."""
    done = []
    for s in shard_ids:
        while not pool.has_room():
            done += [r.shard_id for r in pool.completed(block=True)]
        pool.submit(SimpleNamespace(shard_id=s))
        done += [r.shard_id for r in pool.completed(block=False)]
    while pool.pending():
        done += [r.shard_id for r in pool.completed(block=True)]
    pool.close()
    return done


def make_pool(ray, poison: list[int], n_actors: int, depth: int, max_attempts: int, pause_s: float = 0.3):
    from pipeline.runtime.dispatch import HARVEST_ACTOR_OPTIONS, RayDispatcher

    class DiesOn:  # nested: Ray ships it by value. Dies on the `poison` shards, else returns the id
        def __init__(self, poison: list[int], pause_s: float):
            self.poison, self.pause_s = set(poison), pause_s

        def process(self, payload):
            import os
            import time

            time.sleep(self.pause_s)  # long enough that the queue behind a shard is really full
            if payload.shard_id in self.poison:
                os._exit(3)
            return SimpleNamespace(shard_id=payload.shard_id)

    actor = ray.remote(**{**HARVEST_ACTOR_OPTIONS, "num_cpus": 0})(DiesOn)
    return RayDispatcher(lambda i: actor.remote(poison, pause_s), n_actors, depth, max_attempts)


@pytest.mark.parametrize("n_actors,depth", [(1, 3), (2, 3), (2, 2), (3, 1)])
def test_only_the_poison_shard_is_charged_and_named(ray_local, n_actors, depth):
    pool = make_pool(ray_local, poison=[3], n_actors=n_actors, depth=depth, max_attempts=2)
    done = drain(pool, list(range(10)))
    assert sorted(done) == [s for s in range(10) if s != 3], "a good shard was lost or done twice"
    assert [p.task.shard_id for p in pool.poisoned] == [3]
    assert pool.poisoned[0].attempts == 2 and pool.poisoned[0].cause.startswith("ActorDiedError"), pool.poisoned[0].cause
    assert pool.charged == {3: 2}, "a shard queued with the poison one was charged its death"


def test_two_poison_shards_on_one_worker_are_told_apart(ray_local):
    """Shards 2 and 4 share a worker: its death is nobody's yet; alone, each dies again and is named."""
    pool = make_pool(ray_local, poison=[2, 4], n_actors=1, depth=3, max_attempts=1)
    done = drain(pool, list(range(8)))
    assert sorted(done) == [0, 1, 3, 5, 6, 7]
    assert sorted(p.task.shard_id for p in pool.poisoned) == [2, 4]
    assert pool.charged == {2: 1, 4: 1}


def test_an_innocent_death_charges_nobody_in_a_full_queue(ray_local, tmp_path):
    """The worker is killed from outside while three shards are on it: all three are redone
    alone and succeed; none is charged, nothing is named."""
    import os
    import signal

    from pipeline.runtime.dispatch import HARVEST_ACTOR_OPTIONS, RayDispatcher

    class Slow:
        def pid(self):
            return os.getpid()

        def process(self, payload):
            import time
            time.sleep(1.0)
            return SimpleNamespace(shard_id=payload.shard_id)

    actor = ray_local.remote(**{**HARVEST_ACTOR_OPTIONS, "num_cpus": 0})(Slow)
    pool = RayDispatcher(lambda i: actor.remote(), 1, 3, max_attempts=1)
    first_pid = ray_local.get(pool.slots[0].actor.pid.remote())
    for s in range(3):
        pool.submit(SimpleNamespace(shard_id=s))
    os.kill(first_pid, signal.SIGKILL)
    done = []
    while pool.pending():
        done += [r.shard_id for r in pool.completed(block=True)]
    pool.close()
    assert sorted(done) == [0, 1, 2] and not pool.poisoned and pool.charged == {}
    assert pool.retries == 3

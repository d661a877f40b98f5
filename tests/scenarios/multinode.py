"""A run on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster), with one node
removed mid-run. Runs in its own process (it owns its Ray cluster); writes OUT_DIR/report.json.

    python tests/scenarios/multinode.py MODEL_DIR CORPUS_DIR SAE_DIR OUT_DIR
"""
from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path

import psutil
import ray
from ray.cluster_utils import Cluster

import pipeline.runtime.driver as driver_module
from pipeline.config import ClusterConfig, CorpusConfig, ModelConfig, RunConfig, SAEConfig, SinkConfig
from pipeline.outputs.sink import RunStore
from pipeline.runtime.driver import run
from pipeline.runtime.ledger import Ledger


def main(model_dir: str, corpus_dir: str, sae_dir: str, out_dir: str) -> None:
    env = {"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # "slot" stands in for a GPU: one per worker node, so each node holds one harvest actor.
    workers = [cluster.add_node(num_cpus=1, resources={"slot": 1}) for _ in range(2)]
    ray.init(address=cluster.address, runtime_env=env, log_to_driver=False)
    cfg = RunConfig(
        run_id="multi",
        model=ModelConfig(name="tiny-llama", path=model_dir, gguf_file=None, dtype="float32", batch_size=4),
        sae=SAEConfig(name="random", path=sae_dir + "/{hookpoint}", hookpoints=["layers.1", "layers.2"]),
        corpus=CorpusConfig(name="tiny", paths=[corpus_dir], ctx_len=16, shard_size=1),
        sink=SinkConfig(root=out_dir),
        cluster=ClusterConfig(address=cluster.address, num_workers=2, cpus_per_worker=0.5, torch_threads=1,
                              max_in_flight=1, worker_resources={"slot": 1}),
    )
    result = {}
    # The driver's harvest pool, seen as it is (the real one, only recorded): which shards are in
    # flight on which worker is the event the freeze below waits for.
    pools = []
    make_pool = driver_module.ray_dispatcher
    driver_module.ray_dispatcher = lambda *args, **kw: pools.append(make_pool(*args, **kw)) or pools[-1]

    def driver() -> None:
        result["summary"] = run(cfg)

    thread = threading.Thread(target=driver)
    thread.start()
    commits = Path(out_dir) / "multi" / "_commits"

    def committed() -> set[int]:
        return {int(p.stem.split("=")[1]) for p in commits.glob("shard=*.json")}

    deadline = time.time() + 300
    while time.time() < deadline and len(committed()) < 4:
        time.sleep(0.05)
    # Freeze node 0's worker processes (SIGSTOP): its actor keeps the shards the driver handed it
    # but cannot finish them. The other node's actor goes on until nothing else is left; once no
    # commit has appeared for a while and the run is still going, every uncommitted shard is in
    # flight on node 0 (the driver refills an idle actor at once, so none waits unsubmitted).
    frozen = [p for p in psutil.Process(workers[0].all_processes["raylet"][0].process.pid).children(recursive=True)
              if p.name().startswith("ray::") or any("default_worker.py" in a for a in p.cmdline())]
    for p in frozen:
        p.send_signal(signal.SIGSTOP)
    n_files = len([f for f in Path(corpus_dir).iterdir() if f.is_file()])
    while thread.is_alive() and not node0_holds_the_rest(pools, cfg, n_files, committed(), workers[0].node_id):
        assert time.time() < deadline, "node 1 never finished what node 0 does not hold"
        time.sleep(0.05)
    if not thread.is_alive():
        raise SystemExit("the run finished before node 0 could be removed with a shard in flight")
    removed_with = committed()
    spare = cluster.add_node(num_cpus=1, resources={"slot": 1})  # where the lost worker can restart
    cluster.remove_node(workers[0])
    for p in frozen:  # whatever of node 0 is still there, stopped: ours to end
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    thread.join(timeout=600)
    summary = result["summary"]
    (Path(out_dir) / "report.json").write_text(json.dumps({
        "removed_after_commits": len(removed_with),
        # Shards in flight on node 0 when it went: committed only after, so redone elsewhere.
        "redone": sorted(committed() - removed_with),
        # Counted from the commit markers, not summary.shards_done: a shard node 0 committed
        # just before its reply froze is found committed on retry and counts as skipped.
        "committed_at_end": len(committed()),
        "shards_skipped": summary.shards_skipped,
        "frozen_processes": len(frozen),
        "shards_done": summary.shards_done,
        "shards_by_node": summary.shards_by_node,
        "removed_node": workers[0].node_id,
        "spare_node": spare.node_id,
        "retries": summary.retries,
    }))
    ray.shutdown()
    cluster.shutdown()


def node0_holds_the_rest(pools: list, cfg: RunConfig, n_files: int, committed: set[int], node0: str) -> bool:
    """Every file is planned (the ledger is durable before its shards go out), and the shards not
    committed are exactly those in flight on node 0's worker: node 1 has nothing left to do. (A
    shard node 0 committed just before its reply froze is in flight there but committed.)"""
    from ray._private.state import actors

    if not pools:
        return False
    try:
        records = Ledger(RunStore(cfg.sink, cfg.run_id)).records.values()
    except FileNotFoundError:  # a log file compacted away between listing and reading: look again
        return False
    if len(records) < n_files or any(r.last_shard is None for r in records):
        return False
    planned = {s for r in records for s in range(r.first_shard, r.last_shard + 1)}
    pool = pools[0]
    held = {payload.shard_id for i, payload in list(pool.inflight.values())
            if actors(pool.slots[i].actor._actor_id.hex())["Address"]["NodeID"] == node0}
    return bool(held) and planned - committed == held - committed


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""A run on a simulated multi-node Ray cluster (ray.cluster_utils.Cluster), with one node
removed mid-run. Runs in its own process (it owns its Ray cluster); writes OUT_DIR/report.json.

    python tests/scenarios/multinode.py MODEL_DIR CORPUS_DIR SAE_DIR OUT_DIR
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from pipeline.config import ClusterConfig, CorpusConfig, ModelConfig, RunConfig, SAEConfig, SinkConfig
from pipeline.runtime.driver import run


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

    def driver() -> None:
        result["summary"] = run(cfg)

    thread = threading.Thread(target=driver)
    thread.start()
    commits = Path(out_dir) / "multi" / "_commits"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(commits.glob("*.json"))) < 4:
        time.sleep(0.05)
    removed_at = len(list(commits.glob("*.json")))
    spare = cluster.add_node(num_cpus=1, resources={"slot": 1})  # where the lost worker can restart
    cluster.remove_node(workers[0])
    thread.join(timeout=600)
    summary = result["summary"]
    (Path(out_dir) / "report.json").write_text(json.dumps({
        "removed_after_commits": removed_at,
        "shards_done": summary.shards_done,
        "shards_by_node": summary.shards_by_node,
        "removed_node": workers[0].node_id,
        "spare_node": spare.node_id,
        "retries": summary.retries,
    }))
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])

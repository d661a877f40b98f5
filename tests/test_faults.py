"""Exactly-once under failures: real process deaths, real Ray, real files.

Every scenario ends with each (seq_id, pos) exactly once per hookpoint, and the final files
equal, by checksum, those of an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_pipeline_e2e import HOOKS, make_cfg

from pipeline.config import FaultConfig, RunConfig, SinkConfig

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def data_checksums(root: Path) -> dict[str, str]:
    """Checksums of everything a reader sees: parts, commit markers, the plan."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.parts[-2] != "_hydra" and "_runs" not in p.parts and p.name != "manifest.json"
    }


def assert_exactly_once(root: Path, dict_ids=HOOKS) -> None:
    """Every committed context once, and each dictionary's latents one row per token of them."""
    from pipeline.outputs.layout import partition

    ctx = pq.read_table(root / "contexts").to_pandas()
    expected = sorted((int(s), p) for s, toks in zip(ctx.seq_id, ctx.token_ids) for p in range(len(toks)))
    assert len(ctx.seq_id.unique()) == len(ctx)
    for d in dict_ids:
        lat = pq.read_table(root / "latents" / partition(d), columns=["seq_id", "pos"]).to_pandas()
        assert sorted(zip(lat.seq_id.astype(int), lat.pos.astype(int))) == expected, d


@pytest.fixture(scope="module")
def clean_run(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path_factory, ray_local):
    from pipeline.runtime.driver import run

    out = tmp_path_factory.mktemp("clean")
    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, out, "same", shard_size=2)
    summary = run(cfg)
    assert summary.shards_done >= 6
    return cfg, out / "same", data_checksums(out / "same")


def test_worker_killed_mid_shard_is_redone_without_duplicates(clean_run, tmp_path):
    from pipeline.runtime.driver import run

    cfg, _, reference = clean_run
    marker = tmp_path / "crashed-once"
    faulty = dataclasses.replace(
        cfg, sink=SinkConfig(root=str(tmp_path / "out")),
        faults=FaultConfig(crash_shard=3, crash_point="after_parts", once_marker=str(marker)),
    )
    summary = run(faulty)
    assert marker.exists(), "the worker never died: the fault was not exercised"
    root = tmp_path / "out" / "same"
    assert_exactly_once(root)
    assert data_checksums(root) == reference
    # A task that had committed when its actor died is retried and finds its marker: "skipped".
    assert summary.shards_done + summary.shards_skipped == len(list((root / "_commits").glob("*.json")))


def run_failing_shard_2_after_its_parts(cfg: RunConfig, sink: SinkConfig) -> None:
    """Every attempt at shard 2 dies after writing its parts: the run must fail, not commit it."""
    from pipeline.runtime.dispatch import ShardFailed
    from pipeline.runtime.driver import run

    always = dataclasses.replace(cfg, sink=sink, faults=FaultConfig(crash_shard=2, crash_point="after_parts"),
                                 cluster=dataclasses.replace(cfg.cluster, max_shard_attempts=1))
    with pytest.raises(ShardFailed, match="shard 2"):
        run(always)


def test_crash_between_parts_and_commit_leaves_nothing_visible(clean_run, tmp_path):
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.driver import run

    cfg, _, reference = clean_run
    out = SinkConfig(root=str(tmp_path / "out"))
    run_failing_shard_2_after_its_parts(cfg, out)
    root = tmp_path / "out" / "same"
    assert (root / "contexts" / "shard=000002" / "part-0.parquet").exists()  # the orphaned parts are there...
    assert not (root / "_commits" / "shard=000002.json").exists()
    store = RunStore(out, "same")
    seen = set(store.read_committed("contexts").column("seq_id").to_pylist())
    assert not seen & {4, 5}, "rows of the uncommitted shard are visible"  # ...but no reader sees them
    run(dataclasses.replace(cfg, sink=out))  # resume without faults
    assert_exactly_once(root)
    assert data_checksums(root) == reference


def hydra_overrides(cfg: RunConfig) -> list[str]:
    return [
        f"run_id={cfg.run_id}", f"model.name={cfg.model.name}", f"model.path={cfg.model.path}", "model.gguf_file=null",
        "model.dtype=float32", "model.batch_size=4", f"sae.name={cfg.sae.name}", f"sae.path='{cfg.sae.path}'",
        f"sae.hookpoints=[{','.join(HOOKS)}]", f"corpus.name={cfg.corpus.name}", f"corpus.paths=[{cfg.corpus.paths[0]}]",
        "corpus.ctx_len=16", "corpus.shard_size=2", "corpus.max_tokens=null", f"sink.root={cfg.sink.root}",
        "cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.torch_threads=1", "cluster.max_in_flight=0",
        "demo=null",
    ]


def test_driver_killed_mid_run_resumes_to_identical_files(clean_run, tmp_path):
    from pipeline.runtime.driver import run

    cfg, _, reference = clean_run
    killed = dataclasses.replace(cfg, sink=SinkConfig(root=str(tmp_path / "out")))
    root = tmp_path / "out" / "same"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *hydra_overrides(killed)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            if len(list((root / "_commits").glob("*.json"))) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"driver ended before it could be killed:\n{proc.stdout.read().decode()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = len(list((root / "_commits").glob("*.json")))
    assert done_before < len([k for k in reference if k.startswith("_commits/")]), "nothing was left to resume"
    summary = run(killed)
    assert summary.shards_skipped >= done_before
    assert_exactly_once(root)
    assert data_checksums(root) == reference


def test_incremental_run_processes_only_new_files(clean_run, tmp_path, tiny_corpus):
    import shutil

    from pipeline.data.corpus import CorpusError
    from pipeline.runtime.driver import run

    cfg, _, _ = clean_run
    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    nightly = dataclasses.replace(cfg, run_id="nightly", sink=SinkConfig(root=str(tmp_path / "out")),
                                  corpus=dataclasses.replace(cfg.corpus, paths=[str(corpus)]))
    first = run(nightly)
    root = tmp_path / "out" / "nightly"
    before = data_checksums(root)
    # A new file whose name sorts *before* the existing ones still goes after every known shard.
    (corpus / "0-new.txt").write_text("fresh documents arrive every night " * 30)
    second = run(nightly)
    assert second.shards_done >= 1 and second.shards_skipped == first.shards_done
    after = data_checksums(root)
    assert all(after[k] == v for k, v in before.items() if not k.startswith("_plan/")), "old shards changed"
    manifest = json.loads((root / "manifest.json").read_text())
    new_rec = next(f for f in manifest["files"] if f["url"].endswith("0-new.txt"))
    assert new_rec["first_shard"] > max(f["last_shard"] for f in manifest["files"] if f is not new_rec)
    assert_exactly_once(root)
    assert run(nightly).shards_done == 0  # unchanged corpus: no work
    time.sleep(0.01)
    (corpus / "b.txt").write_text("this file was edited after it was processed")
    with pytest.raises(CorpusError, match="b.txt changed"):
        run(nightly)


def test_replaced_worker_is_killed_not_left_to_finish_its_retries(tmp_path, ray_local):
    """A worker that dies and is slow to restart is replaced. The pool must kill it: a dropped
    handle ends an actor only after its queued tasks, so it came back and finished Ray's retries of
    its old shards while the next run redid them (a CI run found its half-written commit marker
    in the next run's folder). Fails without the `ray.kill` in `_replace_if_dead`: the restarted
    process outlives the pool."""
    from types import SimpleNamespace

    from test_driver_tokenize import process_alive

    from pipeline.runtime.dispatch import RayDispatcher

    class CrashesOnceRestartsSlowly:  # nested: Ray ships it by value
        def __init__(self, folder: str):
            import os
            import time

            import ray
            self.folder = Path(folder)
            with open(self.folder / "pids", "a") as f:
                f.write(f"{os.getpid()}\n")
            if ray.get_runtime_context().was_current_actor_reconstructed:
                time.sleep(60)  # longer than the pool waits for it

        def process(self, payload):
            import os
            crashed = self.folder / "crashed"
            if not crashed.exists():
                crashed.touch()
                os._exit(1)
            return payload.shard_id

    actor_cls = ray_local.remote(max_restarts=1, max_task_retries=0, num_cpus=0)(CrashesOnceRestartsSlowly)
    pool = RayDispatcher(lambda i: actor_cls.remote(str(tmp_path)), n_actors=1, depth=1, max_attempts=2)
    pool.ready_timeout_s = 3
    pool.submit(SimpleNamespace(shard_id=7))
    done: list = []
    while pool.pending():
        done += pool.completed(block=True)
    pool.close()
    assert done == [7] and pool.retries == 1
    pids = [int(p) for p in (tmp_path / "pids").read_text().split()]
    assert len(pids) >= 2, pids  # the first actor, its restart if it began, the replacement
    replaced, replacement = pids[:-1], pids[-1]
    # Killed when it was replaced, seconds ago; Ray alone ends it only some seconds after close.
    assert not [p for p in replaced if process_alive(p)], f"the replaced worker outlived the pool: {pids}"
    deadline = time.monotonic() + 10
    while process_alive(replacement):
        assert time.monotonic() < deadline, f"worker process {replacement} outlived the pool"
        time.sleep(0.1)

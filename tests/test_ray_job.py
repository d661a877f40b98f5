"""The cluster path for real: `ray start --head` (with the dashboard's job API), then
infra/submit.sh -> `ray job submit` uploads this repository (minus .venv, out, .cache, .git) and
runs `python -m pipeline` as the job's driver, which joins the cluster with cluster.address=auto.

The head is private to this test: its own ports and its own --temp-dir (so other Ray users on the
machine neither see it through /tmp/ray/ray_current_cluster nor get stopped with it). It is torn
down by process id (its process group and every process of its session), never `ray stop`, which
would kill every Ray instance on the machine.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def wait_for_dashboard(url: str, head: subprocess.Popen | None = None, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if head is not None and head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers (401 without a token): up
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"dashboard at {url} did not come up in {timeout}s")


def stop_ray_session(temp_dir: str, procs: list | None = None) -> None:
    """Stop `procs` and every process of the Ray session started with --temp-dir=temp_dir (only those)."""
    procs = list(procs or [])
    for p in psutil.process_iter(["cmdline"]):
        try:
            mine = p.pid != os.getpid() and p.info["cmdline"] and any(temp_dir in a for a in p.info["cmdline"])
            if mine and p not in procs:
                procs.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=5)


def stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """Stop exactly this head: its process tree and any process of its session (by temp dir)."""
    try:
        tree = psutil.Process(head.pid).children(recursive=True) + [psutil.Process(head.pid)]
    except psutil.NoSuchProcess:
        tree = []
    stop_ray_session(temp_dir, tree)


def user_env(home: Path) -> dict:
    """A user's shell after `make demo`: their own HOME, the venv NOT activated (not on PATH), and
    no Ray auth settings: whatever Ray does about authentication it does by itself."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("VIRTUAL_ENV", "PYTHONHOME")}
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p).resolve() != BIN.resolve()]
    env.update(HOME=str(home), PATH=os.pathsep.join(path), RAY_USAGE_STATS_ENABLED="0")
    return env


@pytest.fixture(scope="module")  # one head for the module: each start costs ~15 s
def ray_head(tmp_path_factory):
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env = free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rjob", dir="/tmp")  # short: Ray's socket paths have a length limit
    home = tmp_path_factory.mktemp("home")
    env = user_env(home)
    # What `make demo` does to a user's machine: a local ray.init() writes ~/.ray/auth_token.
    demo_tmp = tempfile.mkdtemp(prefix="rdemo", dir="/tmp")
    subprocess.run([sys.executable, "-c", "import ray, sys; ray.init(address='local', num_cpus=1, "
                    "include_dashboard=False, _temp_dir=sys.argv[1]); ray.shutdown()", demo_tmp],
                   env=env, cwd=home, check=True, capture_output=True, timeout=180)
    assert (home / ".ray" / "auth_token").is_file(), "a local ray.init() no longer writes ~/.ray/auth_token"
    # `.venv/bin/ray start --head` as the README says, from that shell.
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", "--num-cpus=2",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    url = f"http://127.0.0.1:{dash}"
    try:
        wait_for_dashboard(url, head)
        # The head did turn token auth on by itself: a client without the token is refused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/jobs/", timeout=10)
        assert refused.value.code in (401, 403)
        yield url, env, f"127.0.0.1:{gcs}"
    finally:
        stop_head(head, temp_dir)
        if head.poll() is None:
            head.kill()
        head.stdout.close()


def test_submit_runs_the_pipeline_as_a_ray_job(ray_head, tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path):
    url, env, _ = ray_head
    out = tmp_path / "out"
    overrides = [
        "experiment=none", "cluster=cpu_cluster", "run_id=job1", f"model.path={tiny_model_dir}", "model.gguf_file=null",
        "model.dtype=float32", "model.batch_size=4", f"sae.path='{tiny_sae_dir}/{{hookpoint}}'",
        "sae.hookpoints=[layers.1]", "corpus=files", f"corpus.paths=[{tiny_corpus}]", "corpus.ctx_len=16",
        "corpus.shard_size=3", f"corpus.token_cache={tmp_path / 'tokens'}", f"sink.root={out}",
    ]
    job_env = {**env, "RAY_JOB_ARGS": "--submission-id job1-test"}
    if not (ROOT / ".venv" / "bin" / "ray").exists():
        # A checkout without its own .venv (a git worktree sharing one): name the venv explicitly,
        # the way infra/submit.sh documents. With a .venv the defaults are what is tested.
        job_env.update(RAY=str(BIN / "ray"), SAE_HARVEST_PYTHON=sys.executable)
    job = subprocess.run([str(ROOT / "infra" / "submit.sh"), url, *overrides], cwd=tmp_path, env=job_env,
                         capture_output=True, text=True, timeout=400, check=False)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-4000:]
    assert "succeeded" in log and "run job1:" in log, log[-4000:]  # ray's verdict + the driver's summary line
    assert f"[submit] job python: {ROOT / '.venv' / 'bin' / 'python'}" in log or \
        f"[submit] job python: {sys.executable}" in log, log[-4000:]

    root = out / "job1"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["hookpoints"] == ["layers.1"]
    # The driver really ran on the cluster, from the uploaded copy of this repository.
    assert manifest["config"]["cluster"]["address"] == "auto"
    commits = sorted((root / "_commits").glob("shard=*.json"))
    summary = json.loads((root / "summary.json").read_text())
    assert commits and summary["shards_new"] == len(commits) and summary["tokens"] > 0
    for commit in commits:
        for f in json.loads(commit.read_text())["files"]:
            assert (root / f["path"]).stat().st_size == f["bytes"]

    # The cluster keeps the job's logs: what `ray job logs` shows an operator afterwards.
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", url, "job1-test"],
                          env={**env, "RAY_AUTH_MODE": "token"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert "run job1:" in logs.stdout


def test_a_local_run_starts_its_own_ray_beside_a_running_cluster(ray_head, tiny_model_dir, tiny_corpus,
                                                                 tiny_sae_dir, tmp_path):
    """`cluster.address=null` (the local preset) means a Ray of the run's own, even in a shell where
    `ray start --head` runs and RAY_ADDRESS names it: joining would make ray.init refuse the
    num_cpus a local run sets ("When connecting to an existing cluster, num_cpus ... must not be
    provided"), which is how the demo failed for a user with a cluster up."""
    _, env, gcs = ray_head
    out = tmp_path / "out"
    overrides = [
        "experiment=none", "run_id=beside", f"model.path={tiny_model_dir}", "model.gguf_file=null",
        "model.dtype=float32", "model.batch_size=4", f"sae.path='{tiny_sae_dir}/{{hookpoint}}'",
        "sae.hookpoints=[layers.1]", "corpus=files", f"corpus.paths=[{tiny_corpus}]", "corpus.ctx_len=16",
        "corpus.shard_size=3", f"sink.root={out}", "cluster.num_workers=1", "cluster.cpus_per_worker=1",
        "cluster.torch_threads=1",
    ]
    run = subprocess.run([sys.executable, "-m", "pipeline", *overrides], cwd=ROOT, env={**env, "RAY_ADDRESS": gcs},
                         capture_output=True, text=True, timeout=400, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    manifest = json.loads((out / "beside" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["config"]["cluster"]["address"] is None

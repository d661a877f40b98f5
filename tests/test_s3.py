"""The whole product on S3: a real `moto_server` on 127.0.0.1, the pipeline (tiny model, local
Ray actors) writing to s3://, post-processing, delphi export and the browser reading from it,
and a search for the secret key in everything the run wrote and logged."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import require
from test_pipeline_e2e import make_cfg

from pipeline.config import PostprocessConfig, SinkConfig

pytestmark = pytest.mark.slow

SECRET = "s3cr3t-Dummy-Value-7f3a9c"
BUCKET = "harvest"
# Ray workers inherit the environment of the raylet, which is started by whichever test calls
# ray.init first: the (dummy) credentials must be in the environment before any test runs.
# pipeline/runtime/dispatch.py's start_ray does not forward AWS_* to actors of an already running Ray.
os.environ["AWS_ACCESS_KEY_ID"] = "testing-key-id"
os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    exe = Path(sys.executable).parent / "moto_server"
    require("moto_server", exe.exists(), "pip install 'moto[server]'")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(url, timeout=1)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"moto_server exited with {proc.returncode}") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("moto_server did not answer")
        os.environ["AWS_ENDPOINT_URL"] = url
        import s3fs

        s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir(BUCKET)
        yield url
    finally:
        os.environ.pop("AWS_ENDPOINT_URL", None)
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def s3_run(s3_server, ray_local, tiny_model_dir, tiny_corpus, tiny_sae_dir):
    from pipeline.outputs.postprocess import postprocess
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.driver import run

    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, f"s3://{BUCKET}/runs", run_id="s3run")
    cfg.sink = SinkConfig(root=f"s3://{BUCKET}/runs", endpoint_url=s3_server, retries=2)
    summary = run(cfg)
    store = RunStore(cfg.sink, cfg.run_id)
    post_cfg = PostprocessConfig(bucket_size=32, top_n=5, n_quantiles=4, per_quantile=2, n_random=5, window=8)
    post = postprocess(store, post_cfg)
    return cfg, summary, store, post, post_cfg


def test_pipeline_and_postprocess_read_back_from_s3(s3_run):
    cfg, summary, store, post, post_cfg = s3_run
    assert summary.shards_done > 1 and store.fs.protocol[0] == "s3" and store.committed_shards()
    assert post["buckets_run"] == 2 * 3 and post["scattered"] == 2 * summary.shards_done  # 96 latents / 32
    for hook in cfg.sae.hookpoints:
        lat = store.read_committed("latents", hook).to_pandas()
        assert len(lat) == summary.tokens
        n_pairs = int(sum((a > 0).sum() for a in lat.acts))
        with store.fs.open(store.path(f"latent_stats/hookpoint={hook}/part-0.parquet"), "rb") as f:
            stats = pq.read_table(f).to_pandas()
        assert len(stats) == 96 and int(stats.n_active.sum()) == n_pairs
        by_latent = pq.read_table(store.path(f"by_latent/hookpoint={hook}"), filesystem=store.fs).to_pandas()
        assert len(by_latent) == n_pairs
        examples = pq.read_table(store.path(f"examples/hookpoint={hook}"), filesystem=store.fs).to_pandas()
        live = stats[~stats.is_dead]
        top = examples[examples.kind == "top"].groupby("latent_id").size()
        assert (top.reindex(live.latent_id) == live.n_active.clip(upper=post_cfg.top_n).to_numpy()).all()


def test_cli_rerun_skips_and_exports_from_s3(s3_run, s3_server, tmp_path):
    cfg, _, store, _, post_cfg = s3_run
    env = {**os.environ, "RAY_ADDRESS": ""}
    args = [f"run_id={cfg.run_id}", "sink=s3", f"sink.root={cfg.sink.root}", f"bucket_size={post_cfg.bucket_size}",
            f"top_n={post_cfg.top_n}", f"n_quantiles={post_cfg.n_quantiles}", f"per_quantile={post_cfg.per_quantile}",
            f"n_random={post_cfg.n_random}", f"window={post_cfg.window}"]
    # Nothing new committed: the CLI decides that from markers alone (no Ray started) and writes nothing.
    out = subprocess.run([sys.executable, "-m", "pipeline.outputs.postprocess", *args], env=env, capture_output=True, check=False,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'buckets_run': 0" in out.stdout and "'scattered': 0" in out.stdout
    assert SECRET not in out.stdout + out.stderr

    from pipeline.outputs.browser import build_browser
    from pipeline.outputs.delphi_export import export_delphi

    files = export_delphi(store, tmp_path / "delphi")
    assert len(files) == 2 * 3 and all(f.stat().st_size > 0 for f in files)
    index = build_browser(store, tmp_path / "site", max_latents=5)
    assert len(list((tmp_path / "site" / "latents").rglob("*.html"))) == 2 * 5 and index.exists()


def test_secret_is_nowhere_in_outputs_or_logs(s3_run, capfd):
    import ray

    _, _, store, _, _ = s3_run
    keys = store.fs.find(store.root)
    assert any(k.endswith("manifest.json") for k in keys)
    manifest = store.fs.cat_file(store.path("manifest.json"))
    assert SECRET.encode() not in manifest and b"sink" in manifest
    for key in keys:
        if key.endswith(".json"):
            assert SECRET.encode() not in store.fs.cat_file(key), key
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err
    # Ray's own session logs (driver, raylet, workers): credentials must not have been put in a runtime_env.
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    logs = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert logs
    for p in logs:
        assert SECRET.encode() not in p.read_bytes(), p

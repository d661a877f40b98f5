"""Credentials never land in anything a run writes. They come in three ways: the environment
(AWS_*), the config (sink.storage_options key/secret/token, given on the command line), and so
the fsspec storage_options built from it. A real `python -m pipeline` run (its own local Ray)
against a real moto_server gets distinct secrets in every one of those places; then every file it
wrote is searched: the run's objects on S3 (manifest, summary, _runs, commit markers, parts), the
local files (Hydra's .hydra/*.yaml and log, whatever else landed in the working dir), Ray's
session logs, and the run's stdout/stderr."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_s3 import BUCKET, s3_server  # noqa: F401  (the moto_server fixture)

from pipeline.runtime.manifest import redact

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

ENV_SECRETS = {"AWS_ACCESS_KEY_ID": "envKeyId-3b9d2e", "AWS_SECRET_ACCESS_KEY": "envSecret-a71f0c9e",
               "AWS_SESSION_TOKEN": "envSessionToken-5c2e88"}
CONFIG_SECRETS = {"key": "cfgKeyId-0e4b1a", "secret": "cfgSecret-9d3c7f21", "token": "cfgToken-61aa0d"}


def test_redact_masks_credential_names_values_and_urls():
    cfg = {"sink": {"storage_options": {"key": "K", "secret": "S", "token": "T", "anon": False,
                                        "client_kwargs": {"endpoint_url": "http://user:pw@h:9000"}}},
           "corpus": {"max_tokens": 5, "token_cache": "./.cache/tokens", "aws_secret_access_key": "S2"},
           "overrides": ["sink.storage_options.secret=S3", "sink.storage_options={key:K2,secret:'S4',token:T2}",
                         "corpus.max_tokens=7"],
           "override_dirname": "sink.storage_options.token=T3,run_id=x"}
    out = redact(cfg)
    assert out["sink"]["storage_options"] == {"key": "***", "secret": "***", "token": "***", "anon": False,
                                              "client_kwargs": {"endpoint_url": "http://***@h:9000"}}
    assert out["corpus"] == {"max_tokens": 5, "token_cache": "./.cache/tokens", "aws_secret_access_key": "***"}
    assert out["overrides"] == ["sink.storage_options.secret=***", "sink.storage_options={key:***,secret:***,token:***}",
                                "corpus.max_tokens=7"]
    assert out["override_dirname"] == "sink.storage_options.token=***,run_id=x"
    # YAML text (what `--cfg job` prints): a name at the end of one line never takes the next line's
    # `secret:` as its value, so the secret itself is still found and masked.
    assert redact({"shown": "storage_options:\n    secret: abc\n"})["shown"] == "storage_options:\n    secret: ***\n"


def test_no_credential_in_any_output_or_log(s3_server, tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path):  # noqa: F811
    import s3fs

    ray_tmp = tempfile.mkdtemp(prefix="rred", dir="/tmp")  # Ray's socket paths have a length limit
    env = {**os.environ, **ENV_SECRETS, "AWS_ENDPOINT_URL": s3_server, "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    root = f"s3://{BUCKET}/redact"
    args = ["experiment=none", "run_id=red", f"model.path={tiny_model_dir}", "model.gguf_file=null",
            "model.dtype=float32", "model.batch_size=4", f"sae.path='{tiny_sae_dir}/{{hookpoint}}'",
            "sae.hookpoints=[layers.1]", "corpus=files", f"corpus.paths=[{tiny_corpus}]", "corpus.ctx_len=16",
            "corpus.shard_size=3", f"corpus.token_cache={tmp_path / 'tokens'}", f"sink.root={root}",
            f"sink.endpoint_url={s3_server}", *[f"+sink.storage_options.{k}={v}" for k, v in CONFIG_SECRETS.items()],
            "cluster.num_workers=1",
            "cluster.cpus_per_worker=1", "cluster.torch_threads=1"]
    work = tmp_path / "cwd"
    work.mkdir()
    out = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=work, env=env, capture_output=True,
                         text=True, timeout=400, check=False)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    secrets = [*ENV_SECRETS.values(), *CONFIG_SECRETS.values()]
    places: dict[str, bytes] = {"stdout": out.stdout.encode(), "stderr": out.stderr.encode()}
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    keys = fs.find(f"{BUCKET}/redact")
    for want in ("manifest.json", "summary.json", "_runs/", "_commits/shard=", "latents/", "contexts/"):
        assert any(want in k for k in keys), (want, keys)
    places.update({f"s3://{k}": fs.cat_file(k) for k in keys})
    local = [p for p in work.rglob("*") if p.is_file()]
    hydra = [p for p in local if p.parent.name == ".hydra"]
    assert {p.name for p in hydra} >= {"config.yaml", "overrides.yaml", "hydra.yaml"}, local
    assert any(b"storage_options" in p.read_bytes() for p in hydra)  # the option is recorded, masked
    ray_logs = [p for p in Path(ray_tmp).rglob("*") if p.is_file() and "/logs/" in str(p)]
    assert ray_logs
    for p in [*local, *ray_logs]:
        places[str(p)] = p.read_bytes()
    leaks = [(where, s) for where, data in places.items() for s in secrets if s.encode() in data]
    assert not leaks, leaks

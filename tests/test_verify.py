"""Verification a user can run: `python -m pipeline.verify`, `read_committed(verify=True)`, and the
nightly preset running verify after extraction; plus Hydra's run folder for an s3:// sink.

A tiny run is made once through the real Hydra app with the nightly preset (local sink); every
test damages its own copy (flipped bytes, a deleted part, an extra part) and checks that each
problem is reported, naming its key, and that the command exits non-zero. On S3 (a real
moto_server) the nightly CLI runs in a fresh folder: no `s3:` folder may appear there, Hydra's
config is kept under ./outputs/_hydra/ without the secret, and a corrupted part fails the night.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_s3 import BUCKET, SECRET, s3_server  # noqa: F401  (fixture; sets dummy AWS credentials first)

from pipeline.config import SinkConfig
from pipeline.outputs.layout import commit_key, contexts_key, latents_key

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
HOOKS = ["layers.1", "layers.2"]


def nightly_args(model_dir, sae_dir, corpus_dir, cache_dir) -> list[str]:
    """The nightly preset on the tiny model, corpus and SAEs, on this machine's local Ray."""
    return ["experiment=nightly", "cluster=local", "cluster.num_workers=1", "cluster.cpus_per_worker=1",
            "cluster.torch_threads=1", f"model.path={model_dir}", "model.gguf_file=null", "model.dtype=float32",
            "model.batch_size=4", f"sae.path='{sae_dir}/{{hookpoint}}'", f"sae.hookpoints=[{','.join(HOOKS)}]",
            f"corpus.paths=[{corpus_dir}]", "corpus.ctx_len=16", "corpus.shard_size=3",
            f"corpus.token_cache={cache_dir}"]


def run_app(argv: list[str]) -> int | str | None:
    """`python -m pipeline` in this process (the real Hydra entry point); its exit code or message."""
    import pipeline.__main__ as app

    saved = sys.argv
    sys.argv = ["pipeline", *argv]
    try:
        app.main()
    except SystemExit as exit_info:
        return exit_info.code
    finally:
        sys.argv = saved
    return None


@pytest.fixture(scope="module")
def nightly_run(tiny_model_dir, tiny_sae_dir, tiny_corpus, tmp_path_factory, ray_local):
    base = tmp_path_factory.mktemp("verify")
    args = nightly_args(tiny_model_dir, tiny_sae_dir, tiny_corpus, base / "tokens")
    code = run_app([*args, "sink=local", f"sink.root={base / 'out'}"])
    assert code in (None, 0), code
    return args, base / "out" / "nightly"


@pytest.fixture
def run_copy(nightly_run, tmp_path) -> Path:
    """A private copy of the clean run folder: <tmp>/out/nightly."""
    _, clean = nightly_run
    dst = tmp_path / "out" / "nightly"
    shutil.copytree(clean, dst, ignore=shutil.ignore_patterns("_hydra"))
    return dst


def verify_cli(sink_root: Path | str, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.verify", "run_id=nightly", f"sink.root={sink_root}", *extra],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4] = bytes(b ^ 0xFF for b in data[mid:mid + 4])  # same size: only the hash can tell
    path.write_bytes(bytes(data))


def verify(run: Path, **kwargs):
    from pipeline.outputs.sink import RunStore
    from pipeline.outputs.verify import verify_run

    return verify_run(RunStore(SinkConfig(root=str(run.parent)), run.name), **kwargs)


def test_clean_run_verifies_and_exits_zero(run_copy):
    out = verify_cli(run_copy.parent)
    assert out.returncode == 0, out.stdout + out.stderr
    shards = len(list((run_copy / "_commits").glob("*.json")))
    assert shards > 1
    assert f"OK: {shards} committed shard(s), {shards * 3} part(s)" in out.stdout
    assert "0 missing, 0 extra, 0 corrupt" in out.stdout


def test_corrupt_missing_and_extra_parts_are_each_reported_and_fail(run_copy):
    corrupt = latents_key("layers.1", 1)
    missing = contexts_key(0)
    extra = "latents/hookpoint=layers.2/shard=000001/part-1.parquet"
    stray = "latents/hookpoint=layers.2/part-0.parquet"
    flip_bytes(run_copy / corrupt)
    (run_copy / missing).unlink()
    shutil.copy(run_copy / latents_key("layers.2", 1), run_copy / extra)
    shutil.copy(run_copy / latents_key("layers.2", 1), run_copy / stray)
    out = verify_cli(run_copy.parent)
    assert out.returncode != 0, out.stdout
    lines = out.stdout.splitlines()
    assert any(line.startswith("CORRUPT") and corrupt in line and "sha256" in line for line in lines), out.stdout
    assert any(line.startswith("MISSING") and missing in line for line in lines), out.stdout
    assert any(line.startswith("EXTRA") and extra in line for line in lines), out.stdout
    assert any(line.startswith("EXTRA") and stray in line for line in lines), out.stdout
    assert "FAILED" in out.stdout and "1 missing, 2 extra, 1 corrupt" in out.stdout


@pytest.mark.parametrize("damage,counts", [
    ("flip", {"missing": 0, "extra": 0, "corrupt": 1}),
    ("delete", {"missing": 1, "extra": 0, "corrupt": 0}),
    ("extra", {"missing": 0, "extra": 1, "corrupt": 0}),
    ("marker", {"missing": 0, "extra": 0, "corrupt": 1}),
    ("unlisted", {"missing": 1, "extra": 1, "corrupt": 0}),
])
def test_each_kind_of_damage_alone(run_copy, damage, counts):
    key = latents_key("layers.2", 0)
    if damage == "flip":
        flip_bytes(run_copy / key)
    elif damage == "delete":
        (run_copy / key).unlink()
    elif damage == "extra":
        shutil.copy(run_copy / key, run_copy / key.replace("part-0", "part-7"))
    elif damage == "marker":
        (run_copy / commit_key(0)).write_text("{not json")
    else:  # the marker forgets a hookpoint's part: the part is unlisted and the layout's part missing
        marker = json.loads((run_copy / commit_key(0)).read_text())
        marker["files"] = [f for f in marker["files"] if f["path"] != key]
        (run_copy / commit_key(0)).write_text(json.dumps(marker))
    report = verify(run_copy)
    assert report.counts == counts and not report.ok
    assert all(p.key.endswith((key, key.replace("part-0", "part-7"), commit_key(0))) for p in report.problems)


def test_uncommitted_shard_is_informational_only(run_copy):
    """A shard in progress (parts, no marker yet) is not a problem: readers ignore it."""
    folder = run_copy / "contexts" / "shard=000999"
    folder.mkdir()
    shutil.copy(run_copy / contexts_key(0), folder / "part-0.parquet")
    report = verify(run_copy)
    assert report.ok and report.uncommitted == 1
    out = verify_cli(run_copy.parent)
    assert out.returncode == 0 and "uncommitted shard=000999: contexts/shard=000999/" in out.stdout, out.stdout


def test_read_committed_verify_raises_on_the_corrupt_part(run_copy):
    from pipeline.outputs.sink import CorruptPartError, RunStore

    store = RunStore(SinkConfig(root=str(run_copy.parent)), "nightly")
    clean = store.read_committed("latents", "layers.1", verify=True)
    assert clean.equals(store.read_committed("latents", "layers.1"))
    key = latents_key("layers.1", 1)
    flip_bytes(run_copy / key)
    with pytest.raises(CorruptPartError, match=r"shard=000001/part-0\.parquet is corrupt: sha256"):
        store.read_committed("latents", "layers.1", verify=True)
    with pytest.raises(CorruptPartError, match="shard=000001"):
        store.read_committed_part(1, key, verify=True)


def test_nightly_preset_fails_when_a_committed_part_is_corrupt(nightly_run, run_copy):
    """The rerun has nothing to extract; its verify step still finds the damage and the job fails."""
    args, _ = nightly_run
    flip_bytes(run_copy / contexts_key(1))
    code = run_app([*args, "sink=local", f"sink.root={run_copy.parent}"])
    assert code not in (None, 0), code
    assert "verify" in str(code) and "1 corrupt" in str(code)
    # The same rerun without the preset's verify passes: the check above is the verify step's.
    assert run_app([*args, "sink=local", f"sink.root={run_copy.parent}", "verify=false"]) in (None, 0)


def test_nightly_on_s3_keeps_hydra_files_local_and_verifies(s3_server, tiny_model_dir, tiny_sae_dir,  # noqa: F811
                                                            tiny_corpus, tmp_path):
    root = f"s3://{BUCKET}/nightly-verify"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": "",
           "SAE_HARVEST_S3_ROOT": root}
    env.pop("SAE_HARVEST_HYDRA_DIR", None)
    cmd = [sys.executable, "-m", "pipeline", *nightly_args(tiny_model_dir, tiny_sae_dir, tiny_corpus,
                                                           tmp_path / "tokens")]
    first = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"verify {root}/nightly: OK" in first.stdout, first.stdout[-3000:]
    # Hydra's files: local, under ./outputs/_hydra/<run_id>/<stamp>/.hydra, never a folder named `s3:`.
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("s3:")]
    saved = list(tmp_path.glob("outputs/_hydra/nightly/*/.hydra/config.yaml"))
    assert len(saved) == 1 and "sink:" in saved[0].read_text() and "verify: true" in saved[0].read_text()
    for p in tmp_path.rglob("*"):
        if p.is_file() and "tokens" not in p.parts:
            assert SECRET.encode() not in p.read_bytes(), p
    assert SECRET not in first.stdout + first.stderr

    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server})
    key = f"{BUCKET}/nightly-verify/nightly/{latents_key('layers.2', 0)}"
    data = bytearray(fs.cat_file(key))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(key, bytes(data))
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert again.returncode != 0, again.stdout[-3000:]
    assert f"CORRUPT  {latents_key('layers.2', 0)}" in again.stdout
    out = verify_cli(root, "sink=s3", env={"AWS_ENDPOINT_URL": s3_server})
    assert out.returncode != 0 and f"CORRUPT  {latents_key('layers.2', 0)}" in out.stdout, out.stdout + out.stderr
    assert "1 corrupt" in out.stdout and SECRET not in out.stdout + out.stderr


def test_hydra_files_are_saved_with_credentials_redacted(tmp_path):
    """Hydra writes .hydra/ before the app runs, a refused `+sink.aws_secret=...` included: the app
    rewrites those files redacted (and still refuses the key)."""
    secret = "TopSecret-Value-1b2c3d"
    out = subprocess.run([sys.executable, "-m", "pipeline", f"sink.root={tmp_path}", f"+sink.aws_secret={secret}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})
    assert out.returncode != 0 and "aws_secret" in out.stderr, out.stderr
    saved = list(tmp_path.glob("_hydra/demo/*/.hydra/*.yaml"))
    assert {p.name for p in saved} == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    assert "+sink.aws_secret=***" in (saved[0].parent / "overrides.yaml").read_text()
    for p in tmp_path.rglob("*"):
        assert not p.is_file() or secret.encode() not in p.read_bytes(), p

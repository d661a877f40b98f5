"""The Hydra app's contract: every preset composes into a typed RunConfig, mistakes fail before any
work (in the compose API and on the real command line), and `--cfg job` shows no secrets."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from pipeline.__main__ import to_run_config  # also registers the `run_schema` structured config
from pipeline.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
GROUPS = ["model", "sae", "corpus", "sink", "cluster", "experiment"]


def _compose(overrides: list[str]) -> RunConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return to_run_config(cfg)


@pytest.mark.parametrize("group,option", [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_preset_composes_into_the_typed_config(group, option):
    cfg = _compose([f"{group}={option}"])
    assert isinstance(cfg, RunConfig)
    assert type(getattr(cfg, group)).__name__.endswith("Config") if group != "experiment" else True


def test_presets_set_what_they_promise():
    nightly = _compose(["experiment=nightly"])
    assert nightly.run_id == "nightly" and nightly.fail_on_quarantine and nightly.demo is None
    assert nightly.cluster.address == "auto" and nightly.corpus.name == "files" and nightly.corpus.max_tokens is None
    # The command line still wins over the preset's group choices.
    local = _compose(["experiment=nightly", "cluster=local", "sink=local"])
    assert local.cluster.address is None and local.sink.root == "./out"
    plain = _compose(["experiment=none"])
    assert plain.demo is None and plain.corpus.max_tokens is None and not plain.fail_on_quarantine
    assert _compose([]).demo is not None  # the default stays `make demo`


@pytest.mark.parametrize("override", ["corpus.ctx_lenn=5", "+corpus.ctx_lenn=5", "+sink.secret=1", "cluster.gpus=1"])
def test_unknown_key_is_a_composition_error(override):
    # `+` may add keys in Hydra; the app's own check (to_run_config) still refuses undeclared ones.
    with pytest.raises((ConfigCompositionException, ValueError), match="ctx_lenn|secret|gpus"):
        _compose([override])


@pytest.mark.parametrize("override", ["corpus.ctx_len=abc", "cluster.num_workers=1.5", "fail_on_quarantine=maybe",
                                      "sae.hookpoints=layers.4"])
def test_wrong_type_is_an_error(override):
    with pytest.raises(ConfigCompositionException):
        _compose([override])


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, timeout=120, check=False)


def test_cli_rejects_typo_and_wrong_type_before_any_work(tmp_path):
    typo = _cli("corpus.ctx_lenn=5", f"sink.root={tmp_path}")
    assert typo.returncode != 0 and "ctx_lenn" in typo.stderr, typo.stderr
    added = _cli("+sink.aws_secret=x", f"sink.root={tmp_path}")
    assert added.returncode != 0 and "aws_secret" in added.stderr, added.stderr
    wrong = _cli("corpus.ctx_len=abc", f"sink.root={tmp_path}")
    assert wrong.returncode != 0 and "ctx_len" in wrong.stderr, wrong.stderr
    # Nothing started: no run folder (the `+` case reaches the app, so Hydra's log dir may exist).
    assert [p.name for p in tmp_path.iterdir()] in ([], ["_hydra"])


def test_cli_cfg_job_prints_resolved_config_without_secrets():
    secret = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"
    env = {"AWS_SECRET_ACCESS_KEY": secret, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE123",
           "AWS_SESSION_TOKEN": "session-" + secret, "SAE_HARVEST_S3_ROOT": "s3://nightly-bucket/harvest",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:5999"}
    out = _cli("sink=s3", "--cfg", "job", "--resolve", env=env)
    assert out.returncode == 0, out.stderr
    cfg = OmegaConf.create(out.stdout)
    assert cfg.sink.root == "s3://nightly-bucket/harvest" and cfg.sink.endpoint_url == "http://127.0.0.1:5999"
    assert cfg.run_id == "demo" and cfg.corpus.ctx_len == 256
    for leaked in (secret, "AKIAEXAMPLE123"):
        assert leaked not in out.stdout + out.stderr

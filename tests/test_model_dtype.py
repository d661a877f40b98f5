"""`model.dtype=auto` (the default): bfloat16 on CUDA; on CPU float32 unless the CPU has native
bf16 (AVX512_BF16 / AMX), where bf16 matmuls are not emulated. Explicit dtypes pass through."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from pipeline.__main__ import to_run_config
from pipeline.config import ModelConfig
from pipeline.model.loader import ModelError, load_model, model_identity, resolve_model_dtype

CONF = Path(__file__).resolve().parents[1] / "conf"


def cpu_flags() -> set[str]:
    """This CPU's feature flags, read from the kernel (independent of torch's probes)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def test_auto_resolves_by_device_and_cpu_features():
    assert resolve_model_dtype("auto", "cuda") == "bfloat16"
    assert resolve_model_dtype("auto", torch.device("cuda", 0)) == "bfloat16"
    native = bool({"avx512_bf16", "amx_tile", "amx_bf16"} & cpu_flags())
    assert resolve_model_dtype("auto", "cpu") == ("bfloat16" if native else "float32")


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_explicit_dtypes_pass_through(name, device):
    assert resolve_model_dtype(name, device) == name


def test_unknown_dtype_names_the_setting():
    with pytest.raises(ModelError, match=r"model\.dtype='fp8' is not one of auto, float32, bfloat16, float16"):
        resolve_model_dtype("fp8")


def test_default_and_demo_preset_are_auto():
    assert ModelConfig().dtype == "auto"
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = to_run_config(compose(config_name="config"))
    assert cfg.model.dtype == "auto"


def test_load_model_and_manifest_use_the_resolved_dtype(tiny_model_dir):
    cfg = ModelConfig(name="tiny", path=str(tiny_model_dir), gguf_file=None, dtype="auto", batch_size=2)
    want = resolve_model_dtype("auto", "cpu")
    model = load_model(cfg)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, want)}
    assert model_identity(cfg)["dtype"] == want
    assert model_identity(cfg, "cuda")["dtype"] == "bfloat16"  # a GPU run's manifest
    explicit = load_model(dataclasses.replace(cfg, dtype="bfloat16"))
    assert {p.dtype for p in explicit.parameters()} == {torch.bfloat16}

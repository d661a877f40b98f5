"""Checks that stop a run before any work, each naming both sides of the mismatch."""
from __future__ import annotations

import warnings

import pytest
import torch

from pipeline.config import ModelConfig, SAEConfig
from pipeline.model.hookpoints import HookpointError
from pipeline.runtime.preflight import (
    ConfigMismatch,
    check_cast_range,
    check_hookpoints,
    check_sae_against_model,
    check_sae_dtype,
    meta_model,
    model_shape,
)
from pipeline.sae.sae import random_sae


def model_cfg(folder, dtype="float32") -> ModelConfig:
    return ModelConfig(name="tiny-llama", path=str(folder), gguf_file=None, dtype=dtype)


@pytest.fixture(scope="module")
def shape(tiny_model_dir):
    return model_shape(meta_model(model_cfg(tiny_model_dir)))


def test_meta_model_has_no_weights(tiny_model_dir, shape):
    meta = meta_model(model_cfg(tiny_model_dir))
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert (shape.hidden_size, shape.n_layers, shape.model_type) == (32, 4, "llama")


def test_sae_width_vs_model_hidden_size(shape):
    sae = random_sae(48, 64, 4)
    with pytest.raises(ConfigMismatch, match=r"d_in=48.*model tiny-llama \(llama\) has hidden_size=32 at layers\.1"):
        check_sae_against_model(sae, "layers.1", shape, "tiny-llama", SAEConfig())


def test_hookpoint_vs_model_modules(tiny_model_dir):
    meta = meta_model(model_cfg(tiny_model_dir))
    with pytest.raises(HookpointError, match=r"'layers\.9'.*4 blocks.*layers\.0 \.\. layers\.3.*LlamaForCausalLM"):
        check_hookpoints(meta, ["layers.1", "layers.9"])
    with pytest.raises(HookpointError, match=r"'layers\.2\.moe'"):
        check_hookpoints(meta, ["layers.2.moe"])
    with pytest.raises(ConfigMismatch, match="duplicates"):
        check_hookpoints(meta, ["layers.1", "layers.1"])
    check_hookpoints(meta, ["embed", "layers.0.attn", "layers.3.mlp", "layers.3"])


def test_k_vs_latent_count(shape):
    sae = random_sae(32, 96, 8)
    with pytest.raises(ConfigMismatch, match=r"sae\.k=500 \(checkpoint k=8\).*96 latents"):
        check_sae_against_model(sae, "layers.1", shape, "tiny-llama", SAEConfig(k=500))
    check_sae_against_model(sae, "layers.1", shape, "tiny-llama", SAEConfig(k=96))


def test_sae_trained_on_another_hookpoint_stops_unless_allowed(shape):
    """An error naming both hookpoints and the setting (it was a warning: issue 27); the override
    warns and returns what the manifest records. tests/test_hookpoint_mismatch.py: every format."""
    sae = random_sae(32, 96, 8, hookpoint="layers.1")
    with pytest.raises(ConfigMismatch, match=r"sae\.hookpoints=\[layers\.2\]: SAE demo was trained on hookpoint "
                                             r"'layers\.1' .*applied at 'layers\.2' of model tiny-llama.*write layers\.1 "
                                             r"instead of layers\.2 in sae\.hookpoints.*sae\.allow_hookpoint_mismatch=true"):
        check_sae_against_model(sae, "layers.2", shape, "tiny-llama", SAEConfig(hookpoints=["layers.2"]))
    with pytest.warns(UserWarning, match=r"trained on hookpoint 'layers\.1' but is applied at 'layers\.2' of model tiny-llama"):
        record = check_sae_against_model(sae, "layers.2", shape, "tiny-llama", SAEConfig(allow_hookpoint_mismatch=True))
    assert record == {"trained": "layers.1", "applied": "layers.2", "allowed_by": "sae.allow_hookpoint_mismatch=true"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_sae_against_model(sae, "layers.1", shape, "tiny-llama", SAEConfig()) is None
        sae.hookpoint = None  # a checkpoint that names no hookpoint: nothing to compare
        assert check_sae_against_model(sae, "layers.2", shape, "tiny-llama", SAEConfig()) is None


def test_sae_cast_beyond_float16_range_names_the_tensor():
    sae = random_sae(32, 96, 8)
    sae.W_dec[5, 3] = 1.0e5
    with pytest.raises(ConfigMismatch, match=r"tensor 'W_dec' \(torch.float32\) has values up to 1e\+05.*torch.float16"):
        check_sae_dtype(sae, torch.float16)
    check_sae_dtype(sae, torch.bfloat16)  # same exponent range as float32
    sae.W_dec[5, 3] = 6.0e4  # within float16
    sae.b_enc[0] = float("inf")  # already inf in the checkpoint: not the cast's doing
    check_sae_dtype(sae, torch.float16)


def test_cast_range_is_checked_blockwise_on_large_tensors():
    t = torch.zeros((1 << 16) + 7, 2)
    t[-1, 1] = -7.0e4  # in the last, partial block
    with pytest.raises(ConfigMismatch, match="'big'"):
        check_cast_range([("small", torch.ones(3)), ("big", t)], torch.float16, "test")


def test_model_weights_beyond_float16_range(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.norm.weight[7] = 9.0e4
    model.save_pretrained(str(tmp_path / "m"))
    with pytest.raises(ConfigMismatch, match=r"model tiny-llama \(model.dtype=float16\).*model\.norm\.weight.*9e\+04"):
        meta_model(model_cfg(tmp_path / "m", dtype="float16"))
    meta_model(model_cfg(tmp_path / "m", dtype="bfloat16"))


# ---------------------------------------------------------------------------------------------
# Presets for real public SAE families compose into the typed RunConfig


PRESETS = {
    # experiment: (model name, default model path, end of sae.path, hookpoints)
    "gpt2_openai_v5_32k": ("gpt2", "hf-cache:openai-community/gpt2",
                           "/openai/gpt2-small/resid_post_mlp_v5_32k/autoencoders/8.pt", ["layers.8"]),
    "llama3_8b_sparsify": ("Meta-Llama-3-8B", "hf-cache:meta-llama/Meta-Llama-3-8B",
                           "/EleutherAI/sae-llama-3-8b-32x/{hookpoint}", ["layers.16"]),
    "gpt2_openai_16m": ("gpt2", "hf-cache:openai-community/gpt2", "/gpt2-small-16m/8.pt", ["layers.8"]),
}


@pytest.mark.parametrize("experiment", sorted(PRESETS))
def test_experiment_presets_compose(experiment, monkeypatch):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pipeline.__main__  # noqa: F401  (registers the run_schema structured config)
    from pipeline.config import RunConfig

    for var in ("GPT2_PATH", "LLAMA3_8B_PATH", "SAE_ROOT", "SAE_16M_PATH"):
        monkeypatch.delenv(var, raising=False)
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[f"experiment={experiment}"]))
        monkeypatch.setenv("SAE_ROOT", "s3://my-bucket/saes")
        overridden = OmegaConf.to_object(compose(config_name="config", overrides=[f"experiment={experiment}"]))
    name, model_path, sae_path, hooks = PRESETS[experiment]
    assert isinstance(cfg, RunConfig)
    assert (cfg.model.name, cfg.model.path, cfg.model.gguf_file) == (name, model_path, None)
    assert cfg.sae.path.endswith(sae_path) and cfg.sae.hookpoints == hooks and cfg.sae.k is None
    assert cfg.demo is None and cfg.run_id != "demo"  # the demo experiment's settings are replaced
    if experiment != "gpt2_openai_16m":  # that one reads SAE_16M_PATH
        assert overridden.sae.path.startswith("s3://my-bucket/saes/")

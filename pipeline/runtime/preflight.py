"""Everything before the first shard: `prepare(cfg)` resolves the corpus and the SAEs (fitting
the demo SAE when `sae.path` is empty) and checks them against each other.

The tokenizer is not loaded here: the tokenize tasks load it (pipeline/runtime/staging.py) and
report what the manifest records about it. The one exception is fitting the demo SAE (empty
`sae.path`, nothing cached), which loads the model and tokenizer here, once.

A mismatch between SAE and model stops the run here. Everything is checked against a
*meta-device* copy of the model (its module tree and config, no weights), so the driver never
loads the real weights just to validate.
"""
from __future__ import annotations

import dataclasses
import re
import time
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from pipeline.config import ModelConfig, RunConfig, SAEConfig
from pipeline.data.corpus import CorpusFile, resolve_corpus
from pipeline.model.hookpoints import is_hookpoint_name, resolve_hookpoint
from pipeline.model.loader import from_pretrained_args, model_files, model_identity
from pipeline.outputs.layout import latents_schema
from pipeline.outputs.sink import storage_options
from pipeline.runtime.manifest import manifest_for
from pipeline.sae.formats import SAEFormatError, SAEInfo, resolve_dtype, resolve_sae_path, sae_info
from pipeline.sae.sae import SAE


class ConfigMismatch(ValueError):
    pass


@dataclass
class ModelShape:
    hidden_size: int
    n_layers: int
    model_type: str


def meta_model(cfg: ModelConfig) -> torch.nn.Module:
    """The model's module tree without weights. Also the model-side preflight entry point: a
    dtype cast that would overflow a weight fails here (`check_model_dtype`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, kwargs = from_pretrained_args(cfg)
    config = AutoConfig.from_pretrained(folder, **kwargs)
    check_model_dtype(cfg)
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
        resolve_hookpoint(model, h)  # raises HookpointError naming the hookpoint, the model and the valid names


def check_sae_against_model(sae: SAE | SAEInfo, hookpoint: str, shape: ModelShape, model_name: str,
                            sae_cfg: SAEConfig) -> dict | None:
    """Width, k and trained hookpoint; returns the manifest's record of a hookpoint mismatch that
    `sae.allow_hookpoint_mismatch` let through (None when there is none)."""
    if sae.d_in != shape.hidden_size:
        raise ConfigMismatch(
            f"SAE {sae.source or sae_cfg.name} for {hookpoint} has d_in={sae.d_in}, but model {model_name} "
            f"({shape.model_type}) has hidden_size={shape.hidden_size} at {hookpoint}"
        )
    k = sae_cfg.k or sae.k
    if not 1 <= k <= sae.n_latents:
        raise ConfigMismatch(
            f"sae.k={k} (checkpoint k={sae.k}) must be between 1 and the {sae.n_latents} latents of SAE "
            f"{sae.source or sae_cfg.name} for {hookpoint}"
        )
    return check_trained_hookpoint(sae, hookpoint, model_name, sae_cfg)


ALLOW_MISMATCH = "sae.allow_hookpoint_mismatch=true"
HOOKPOINT_NAMES = "embed, layers.N, layers.N.attn, layers.N.mlp, layers.N.mlp_in, layers.N.mlp_out"


def check_trained_hookpoint(sae: SAE | SAEInfo, hookpoint: str, model_name: str, sae_cfg: SAEConfig) -> dict | None:
    """A dictionary applied at another hookpoint than the one its own metadata names stops the run:
    every latent would be computed from activations it was not trained on, and nothing downstream
    could tell (issue 27). `sae.allow_hookpoint_mismatch=true` runs it anyway, with a warning, and
    the record returned goes into the manifest. None when the hookpoints match or none is named."""
    trained = sae.hookpoint
    if not trained or trained == hookpoint:
        return None
    source = getattr(sae, "hookpoint_from", "")
    name = sae.source or sae_cfg.name
    what = f"transcoder {name}, which reconstructs {sae.output}," if sae.kind == "transcoder" else f"SAE {name}"
    what += (f" was trained on hookpoint {trained!r}{f' ({source})' if source else ''} but is applied at "
             f"{hookpoint!r} of model {model_name}")
    if sae_cfg.allow_hookpoint_mismatch:
        warnings.warn(f"{what}; running it there anyway ({ALLOW_MISMATCH}; the manifest records it)", stacklevel=3)
        return {"trained": trained, "applied": hookpoint, "allowed_by": ALLOW_MISMATCH}
    if is_hookpoint_name(trained):
        fix = f"write {trained} instead of {hookpoint} in sae.hookpoints"
    else:
        fix = (f"{trained!r} has no hookpoint here ({HOOKPOINT_NAMES}), so it cannot be applied where it was "
               f"trained; check sae.path")
    raise ConfigMismatch(f"sae.hookpoints=[{','.join(sae_cfg.hookpoints)}]: {what}. To apply it where it was "
                         f"trained, {fix}; to run it at {hookpoint} anyway, set {ALLOW_MISMATCH} "
                         f"(the manifest records it)")


# ---------------------------------------------------------------------------------------------
# Casts that would lose range: a finite weight beyond the target dtype's largest value becomes
# inf (fp32/bf16 -> fp16 above 65504) and every activation it touches turns into inf/NaN.

_ROWS = 1 << 16  # abs-max in row blocks: bounded extra memory even for a 16M x d matrix


def _finite_abs_max(t: torch.Tensor) -> float:
    """Largest finite |value| (inf/NaN already in the checkpoint are not the cast's doing)."""
    flat = t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1)
    best = 0.0
    for i in range(0, flat.shape[0], _ROWS):
        block = flat[i:i + _ROWS].abs()
        best = max(best, float(block.masked_fill(~torch.isfinite(block), 0).amax()) if block.numel() else 0.0)
    return best


def check_cast_range(tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, owner: str) -> None:
    """Raise ConfigMismatch naming the first tensor whose finite values overflow `dtype`."""
    limit = torch.finfo(dtype).max
    for name, t in tensors:
        if t is None or not t.is_floating_point() or torch.finfo(t.dtype).max <= limit:
            continue  # a cast to an equal or wider range cannot overflow
        m = _finite_abs_max(t)
        if m > limit:
            raise ConfigMismatch(
                f"{owner}: tensor {name!r} ({t.dtype}) has values up to {m:.4g}, beyond the {dtype} range "
                f"(max {limit:.6g}); casting it to {dtype} would make them inf. Use bfloat16 or float32."
            )


def check_sae_dtype(sae: SAE, dtype: torch.dtype) -> None:
    names = ("W_enc", "b_enc", "W_dec", "b_dec", "b_pre", "latent_scale")
    check_cast_range(((n, getattr(sae, n)) for n in names), dtype, f"SAE {sae.source or sae.format}")


def check_model_dtype(cfg: ModelConfig) -> None:
    """Scan the model's safetensors weights (mmap'd) when `model.dtype` is narrower in range.

    Only float16 is narrower than the float32/bfloat16 checkpoints are stored in, so this reads
    the weights only for float16 runs. GGUF files are dequantized by transformers: not scanned.
    """
    from pipeline.model.loader import DTYPES

    dtype = DTYPES.get(cfg.dtype)
    if dtype is None or torch.finfo(dtype).max >= torch.finfo(torch.float32).max:
        return  # bfloat16/float32 hold every float32 value's range: nothing to scan
    folder, gguf_file = model_files(cfg)
    if gguf_file:
        return
    from safetensors import safe_open

    owner = f"model {cfg.name} (model.dtype={cfg.dtype})"
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                check_cast_range([(f"{file.name}:{name}", f.get_tensor(name))], dtype, owner)


# ---------------------------------------------------------------------------------------------
# The whole preflight, as the driver calls it


@dataclass
class Prepared:
    """What planning and the workers need, all checked against each other."""

    files: list[CorpusFile]
    corpus_storage: dict | None  # fsspec options for an s3:// corpus (the sink's endpoint)
    sae_by_hook: dict[str, str]  # hookpoint -> SAE path the workers load
    manifest: dict
    seconds: float


def prepare(cfg: RunConfig) -> Prepared:
    started = time.perf_counter()
    corpus_storage = storage_options(cfg.sink) if any(p.startswith("s3://") for p in cfg.corpus.paths) else None
    files = resolve_corpus(cfg.corpus, corpus_storage)
    identity = model_identity(cfg.model, "cuda" if cfg.cluster.gpus_per_worker > 0 else "cpu")  # dtype as workers resolve it
    meta = meta_model(cfg.model)
    check_hookpoints(meta, cfg.sae.hookpoints)  # before anything is loaded or fitted
    metas = {None: meta, **check_checkpoints(cfg, meta)}  # model.checkpoints (issue 17)
    xc_paths, xc_ids = check_crosscoders(cfg, metas, model_shape(meta))  # before anything is fitted
    if cfg.model.checkpoints:
        identity = {**identity, "checkpoints": {n: model_identity(checkpoint_cfg(cfg.model, n))
                                                for n in cfg.model.checkpoints}}
    sae_by_hook = sae_paths(cfg, files, identity)
    sae_ids = check_saes(cfg, sae_by_hook, model_shape(meta))
    check_transcoders(meta, sae_ids, cfg.model.name)
    sae_by_hook, sae_ids = {**sae_by_hook, **xc_paths}, {**sae_ids, **xc_ids}
    manifest = manifest_for(cfg, identity, sae_ids)
    return Prepared(files, corpus_storage, sae_by_hook, manifest, time.perf_counter() - started)


def sae_paths(cfg: RunConfig, files: list[CorpusFile], identity: dict) -> dict[str, str]:
    """Hookpoint -> SAE path; fits (or reuses) the demo SAE when `sae.path` is empty."""
    if cfg.sae.path:
        paths = {}
        for h in cfg.sae.hookpoints:
            try:  # `{hookpoint}` finds sparsify's folder for a transcoder (named after its module)
                paths[h] = resolve_sae_path(cfg.sae.path, h)
            except FileNotFoundError as e:
                raise SAELoadError(f"sae.path={cfg.sae.path!r}, sae.hookpoints entry {h}: {e}") from e
        return paths
    from pipeline.model.loader import load_model, load_tokenizer, resolve_model_dtype
    from pipeline.sae.demo import cache_path, ensure_demo_sae

    torch.set_num_threads(cfg.cluster.torch_threads)
    model_dtype = resolve_model_dtype(cfg.model.dtype)  # the fit runs here, on this CPU (load_model's default)
    model = tokenizer = None
    paths = {}
    for hook in cfg.sae.hookpoints:
        cached = (cache_path(cfg.sae.train, identity["sha256"], model_dtype, hook, files, cfg.corpus) / "cfg.json").exists()
        if not cached and model is None:  # fitting needs tokens and activations here, once
            model, tokenizer = load_model(cfg.model), load_tokenizer(cfg.model)
        paths[hook] = str(ensure_demo_sae(model, tokenizer, files, cfg.corpus, hook, cfg.sae.train,
                                          identity["sha256"], model_dtype, cfg.model.batch_size))
    return paths


class SAELoadError(SAEFormatError):
    """An SAE that cannot be loaded at all; the message names sae.path and the file."""


def check_saes(cfg: RunConfig, sae_by_hook: dict[str, str], shape: ModelShape) -> dict:
    """SAE against model checks before any work; returns the SAE identities for the manifest.

    From metadata only (cfg.json, safetensors headers, a memory-mapped .pt; digests from the hash
    cache): the driver never reads a weight, so its memory does not grow with the SAE."""
    resolve_dtype(cfg.sae.dtype)  # a bad sae.dtype or output.acts_dtype fails here, not in every worker
    latents_schema(1, cfg.output.acts_dtype)
    identities = {}
    for hook, path in sae_by_hook.items():
        try:
            sae = sae_info(path, hookpoint=hook)
        except Exception as e:  # missing, unreadable, truncated, refused pickle: name the setting
            raise SAELoadError(f"sae.path={cfg.sae.path!r}: cannot load the SAE for {hook} from {path}: "
                               f"{type(e).__name__}: {e}") from e
        if sae.kind == "crosscoder":
            raise ConfigMismatch(f"sae.path={cfg.sae.path!r}: {path} (for {hook}) is a crosscoder over "
                                 f"{sae.inputs}; list it under sae.crosscoders, not sae.hookpoints")
        mismatch = check_sae_against_model(sae, hook, shape, cfg.model.name, cfg.sae)
        identities[hook] = {
            "path": path, "format": sae.format, "sha256": sae.sha256, "d_in": sae.d_in,
            "n_latents": sae.n_latents, "k": cfg.sae.k or sae.k, "hookpoint_trained": sae.hookpoint,
            # A transcoder's latents live under its input hookpoint; the manifest says what it is.
            **({"kind": sae.kind, "output": sae.output} if sae.kind == "transcoder" else {}),
            # Only when sae.allow_hookpoint_mismatch let one through: other runs' identity is unchanged.
            **({"hookpoint_mismatch": mismatch} if mismatch else {}),
        }
    return identities


# ---------------------------------------------------------------------------------------------
# Transcoders and crosscoders (issue 17): what they read must all be there before any work.

# Config keys that name or stamp a checkpoint rather than shape it.
UNSHAPED_CONFIG_KEYS = {"_name_or_path", "name_or_path", "transformers_version", "torch_dtype", "dtype",
                        "_commit_hash", "_attn_implementation_autoset"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def checkpoint_cfg(model: ModelConfig, name: str) -> ModelConfig:
    """`model.checkpoints[name]` as a ModelConfig: the main model's settings, its own path."""
    return dataclasses.replace(model, name=f"{model.name}/{name}", path=model.checkpoints[name], checkpoints={})


def _architecture(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.config.to_dict().items() if k not in UNSHAPED_CONFIG_KEYS}


def _tokenizer_files(model: ModelConfig) -> dict[str, str]:
    """sha256 of each tokenizer file a model folder ships (what decides its token ids), read as
    bytes: the driver never constructs a tokenizer (workers tokenize)."""
    import hashlib

    folder, _ = model_files(model)
    return {f: hashlib.sha256((folder / f).read_bytes()).hexdigest() for f in TOKENIZER_FILES if (folder / f).exists()}


def check_checkpoints(cfg: RunConfig, meta: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every `model.checkpoints` entry has model.path's architecture (its config, names and
    stamps aside) and, where it ships one, the same tokenizer files. Returns their meta-device models."""
    base = _architecture(meta)
    metas = {}
    for name, path in cfg.model.checkpoints.items():
        if not name or "/" in name:
            raise ConfigMismatch(f"model.checkpoints: name {name!r} must be non-empty and contain no '/' "
                                 f"(crosscoder inputs are NAME/hookpoint)")
        ck = checkpoint_cfg(cfg.model, name)
        ck_meta = meta_model(ck)
        other = _architecture(ck_meta)
        diff = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if diff:
            shown = ", ".join(f"{k}: {base.get(k)!r} vs {other.get(k)!r}" for k in diff[:8])
            raise ConfigMismatch(f"model.checkpoints.{name}={path!r} is not the architecture of model.path="
                                 f"{cfg.model.path!r}: {shown}")
        ck_files = _tokenizer_files(ck)
        if ck_files:
            base_files = _tokenizer_files(cfg.model)
            differ = sorted(f for f in ck_files.keys() | base_files.keys() if ck_files.get(f) != base_files.get(f))
            if differ:
                raise ConfigMismatch(f"model.checkpoints.{name}={path!r} has another tokenizer than model.path="
                                     f"{cfg.model.path!r} ({', '.join(differ)} differ): its contexts would differ")
        metas[name] = ck_meta
    return metas


def check_crosscoders(cfg: RunConfig, metas: dict, shape: ModelShape) -> tuple[dict[str, str], dict]:
    """`sae.crosscoders` from metadata: each is a crosscoder, every input exists (all missing ones
    named at once), d_in = inputs x hidden_size, k fits. Returns (id -> path, id -> identity)."""
    from pipeline.model.hookpoints import HookpointError, valid_hookpoints
    from pipeline.outputs.layout import crosscoder_id
    from pipeline.runtime.sources import split_source

    if cfg.sae.crosscoders and cfg.sae.latent_splits > 1:
        raise ConfigMismatch("sae.latent_splits > 1 is not supported with sae.crosscoders (yet)")
    if not cfg.sae.hookpoints and not cfg.sae.crosscoders:
        raise ConfigMismatch("nothing to extract: sae.hookpoints and sae.crosscoders are both empty")
    paths, identities = {}, {}
    for name, path in cfg.sae.crosscoders.items():
        if not name or "/" in name:
            raise ConfigMismatch(f"sae.crosscoders: name {name!r} must be non-empty and contain no '/'")
        try:
            info = sae_info(path)
        except Exception as e:
            raise SAELoadError(f"sae.crosscoders.{name}={path!r}: cannot load it: {type(e).__name__}: {e}") from e
        if info.kind != "crosscoder":
            raise ConfigMismatch(f"sae.crosscoders.{name}={path!r} is a {info.kind} (its cfg's kind), not a crosscoder")
        missing = []
        for src in info.inputs:
            ckpt, hook = split_source(src)
            if ckpt is not None and ckpt not in metas:
                missing.append(f"{src} (no checkpoint {ckpt!r} in model.checkpoints {sorted(cfg.model.checkpoints)})")
                continue
            try:
                resolve_hookpoint(metas[ckpt], hook)
            except HookpointError:
                missing.append(src)
        if missing:
            raise ConfigMismatch(
                f"crosscoder {name} ({path}) reads {len(missing)} of its {len(info.inputs)} inputs that model "
                f"{cfg.model.name} does not have: {', '.join(missing)}; the model has "
                f"{', '.join(valid_hookpoints(metas[None]))}")
        mismatch = check_crosscoder_trained(name, path, info, cfg.sae)
        if info.d_in != len(info.inputs) * shape.hidden_size:
            raise ConfigMismatch(f"crosscoder {name} ({path}) has d_in={info.d_in}, but its {len(info.inputs)} inputs "
                                 f"of model {cfg.model.name} (hidden_size={shape.hidden_size}) make "
                                 f"{len(info.inputs) * shape.hidden_size}")
        k = cfg.sae.k or info.k
        if not 1 <= k <= info.n_latents:
            raise ConfigMismatch(f"sae.k={k} (checkpoint k={info.k}) must be between 1 and the {info.n_latents} "
                                 f"latents of crosscoder {name} ({path})")
        did = crosscoder_id(name)
        paths[did] = path
        identities[did] = {"path": path, "format": info.format, "sha256": info.sha256, "d_in": info.d_in,
                           "n_latents": info.n_latents, "k": k, "kind": "crosscoder", "inputs": list(info.inputs),
                           **({"hookpoint_mismatch": mismatch} if mismatch else {})}
    return paths, identities


def check_crosscoder_trained(name: str, path: str, info: SAEInfo, sae_cfg: SAEConfig) -> dict | None:
    """A crosscoder reads its `inputs`, which a user often writes into its config by hand; where the
    library's own metadata names what it was trained on, every input must read that: the
    model-diff replication's `hook_point` (the hookpoint), dictionary_learning's trainer `layer`
    (the block index). Same stop and override as `check_trained_hookpoint`."""
    from pipeline.runtime.sources import split_source

    hooks = [split_source(src)[1] for src in info.inputs]
    if info.format == "crosscoder_model_diff" and info.hookpoint:
        trained, source = info.hookpoint, info.hookpoint_from
        wrong = [src for src, h in zip(info.inputs, hooks) if h != trained]
    elif info.format == "dictionary_learning" and str(info.meta.get("layer", "")).isdigit():
        layer = int(info.meta["layer"])
        trained, source = f"layer {layer}", f"config.json layer={layer}"
        wrong = [src for src, h in zip(info.inputs, hooks) if not re.match(rf"^layers\.{layer}(?:\.|$)", h)]
    else:
        return None
    if not wrong:
        return None
    what = (f"crosscoder {name} ({path}) was trained on {trained} ({source}) but its inputs {', '.join(wrong)} "
            f"(its config's 'inputs') read another hookpoint")
    if sae_cfg.allow_hookpoint_mismatch:
        warnings.warn(f"{what}; running it anyway ({ALLOW_MISMATCH}; the manifest records it)", stacklevel=3)
        return {"trained": trained, "applied": wrong, "allowed_by": ALLOW_MISMATCH}
    raise ConfigMismatch(f"sae.crosscoders.{name}={path!r}: {what}. Fix 'inputs' in its config, or set "
                         f"{ALLOW_MISMATCH} to run it anyway (the manifest records it)")


def check_transcoders(meta: torch.nn.Module, sae_ids: dict, model_name: str) -> None:
    """A transcoder's output hookpoint (what its decode predicts) must exist too."""
    from pipeline.model.hookpoints import HookpointError

    for hook, ident in sae_ids.items():
        if ident.get("kind") == "transcoder":
            try:
                resolve_hookpoint(meta, ident["output"])
            except HookpointError as e:
                raise ConfigMismatch(f"transcoder {ident['path']} at {hook} reconstructs {ident['output']!r}, "
                                     f"which model {model_name} does not have: {e}") from e

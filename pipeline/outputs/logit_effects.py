"""Logit effects: the tokens each latent's decoder direction promotes and suppresses.

For latent i with decoder row w = W_dec[i] (in the residual stream at the SAE's hookpoint), the
direct effect on the next-token logits is taken as

    effect(w) = (center(w) * g) @ W_U.T          [vocab]

where g is the final norm's weight (RMSNorm weight, LayerNorm gamma; Gemma stores it as g - 1),
center() subtracts the mean over d for a LayerNorm (the linear part of LayerNorm) and is the
identity for RMSNorm, and W_U [vocab, d] is the unembedding (tied to the embedding when the model
ties them). The approximation, as in Neuronpedia's and SAELens's "logit lens" of a feature:
the norm's data-dependent 1/rms (1/std) scale is dropped (a positive factor per token: it scales
every logit alike and does not change the ranking), the LayerNorm bias is dropped (the same for
every latent), and later layers are ignored (direct path only). W_dec is used as the SAE loader
gives it: format scalings are already folded in (SAELens `rescale_acts_by_decoder_norm` and
`expected_average_only_in`), so a row is the residual-stream effect of one unit of the activation
the run recorded. For an OpenAI/`layer_norm` SAE the decoder works in the normalized space; the
direction is the same up to that positive scale.

Written per bucket (`logit_effects/hookpoint=H/bucket=B/part-0.parquet`) for the latents that get
browser pages (`page_latents`: most active first, at most `logit_effects.max_latents`), one
[rows_per_matmul, vocab] matmul at a time (torch on CPU, cuBLAS on GPU): only those decoder rows
are read (safetensors/.pt files are memory-mapped by the SAE readers), and only W_U and the norm
weight are read from the model's safetensors (the whole model is loaded only for GGUF weights).
When the SAE or model is not available the state file records why and the browser says so.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.config import LogitEffectsConfig, ModelConfig, PostprocessConfig
from pipeline.outputs.layout import (
    LOGIT_EFFECTS_SCHEMA,
    MANIFEST_KEY,
    dictionary_ids,
    logit_effects_key,
    logit_effects_state_key,
    stats_key,
)
from pipeline.outputs.sink import RunStore

log = logging.getLogger(__name__)

# Checkpoint tensor names, most specific first: (unembedding, tied embedding, final norm prefix).
UNEMBED_NAMES = ("lm_head.weight", "embed_out.weight")
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "gpt_neox.embed_in.weight",
               "model.decoder.embed_tokens.weight")
NORM_PREFIXES = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                 "model.decoder.final_layer_norm")


def page_latents(n_active: np.ndarray, max_pages: int) -> np.ndarray:
    """The latents that get browser pages, in page order: active ones, most active first, ties to
    the lower id; at most `max_pages` (-1: all). Shared by post-processing and the browser."""
    active = np.flatnonzero(n_active > 0)
    order = active[np.lexsort((active, -n_active[active]))]
    return order if max_pages < 0 else order[:max_pages]


# -- the unembedding --------------------------------------------------------------------------------
class Unembedding:
    """W_U [vocab, d] with the final norm's gain folded in, and whether the norm centres (LayerNorm)."""

    def __init__(self, w_u: torch.Tensor, gain: torch.Tensor | None, centre: bool, source: str):
        self.weight = (w_u.float() * gain.float()[None, :]) if gain is not None else w_u.float()
        self.centre, self.source = centre, source

    def effects(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [n, d] decoder directions -> [n, vocab] logit effects (fp32)."""
        rows = rows.float()
        if self.centre:
            rows = rows - rows.mean(dim=1, keepdim=True)
        return rows @ self.weight.T


def _safetensors_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> file, from model.safetensors.index.json or the single/several .safetensors files."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.exists():
        return {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
    names: dict[str, Path] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            names.update({n: f for n in st.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return names


def _read(names: dict[str, Path], name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(names[name]), framework="pt") as st:
        return st.get_tensor(name)


def load_unembedding(model: ModelConfig) -> Unembedding:
    """The unembedding and final norm, read tensor by tensor when the weights are safetensors."""
    from pipeline.model.loader import model_files

    folder, gguf_file = model_files(model)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    model_type = str(config.get("model_type", ""))
    names = {} if gguf_file else _safetensors_index(folder)
    if names:
        unembed = next((n for n in UNEMBED_NAMES if n in names), None)
        if unembed is None or config.get("tie_word_embeddings", False):
            unembed = next((n for n in EMBED_NAMES if n in names), unembed)
        norm = next((p for p in NORM_PREFIXES if f"{p}.weight" in names), None)
        if unembed is not None and norm is not None:
            gain = _read(names, f"{norm}.weight").float()
            if model_type.startswith("gemma"):
                gain = gain + 1.0  # Gemma's RMSNorm multiplies by (1 + weight)
            centre = f"{norm}.bias" in names or model_type in ("gpt2", "gpt_neox", "gptj", "opt", "phi")
            return Unembedding(_read(names, unembed), gain, centre, f"{folder} ({unembed}, {norm}.weight)")
    return _unembedding_from_model(model, model_type)


def _unembedding_from_model(model: ModelConfig, model_type: str) -> Unembedding:
    """Fallback (GGUF, unknown tensor names): load the model once and take its modules."""
    from pipeline.model.loader import load_model

    m = load_model(ModelConfig(**{**model.__dict__, "dtype": "float32"}))
    w_u = m.get_output_embeddings().weight.detach()
    for prefix in NORM_PREFIXES:
        mod = m
        for part in prefix.split("."):
            mod = getattr(mod, part, None)
            if mod is None:
                break
        if mod is not None and getattr(mod, "weight", None) is not None:
            gain = mod.weight.detach().float() + (1.0 if model_type.startswith("gemma") else 0.0)
            centre = isinstance(mod, torch.nn.LayerNorm)
            return Unembedding(w_u, gain, centre, f"{model.path} ({prefix})")
    raise ValueError(f"model {model.path}: no final norm found among {NORM_PREFIXES}")


# -- computation ----------------------------------------------------------------------------------
def top_bottom(effects: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """(top ids, top values, bottom ids, bottom values) per row; n is capped by the vocabulary."""
    n = min(n, effects.shape[1])
    top_v, top_i = torch.topk(effects, n, dim=1)
    bot_v, bot_i = torch.topk(-effects, n, dim=1)
    return top_i, top_v, bot_i, -bot_v


def effects_table(latents: np.ndarray, w_dec: torch.Tensor, unembed: Unembedding, cfg: LogitEffectsConfig,
                  device: torch.device) -> pa.Table:
    """Logit effects of `latents` (sorted ids), one [rows_per_matmul, vocab] matmul at a time."""
    cols: dict[str, list[np.ndarray]] = {n: [] for n in LOGIT_EFFECTS_SCHEMA.names[1:]}
    weight = unembed.weight.to(device)
    unembed_dev = Unembedding(weight, None, unembed.centre, unembed.source)
    for s in range(0, len(latents), cfg.rows_per_matmul):
        ids = torch.from_numpy(latents[s:s + cfg.rows_per_matmul].astype(np.int64))
        rows = w_dec[ids].to(device)  # gathers only these rows of a memory-mapped decoder
        for name, t in zip(cols, top_bottom(unembed_dev.effects(rows), cfg.top_n)):
            cols[name].append(t.cpu().numpy())
    n = min(cfg.top_n, weight.shape[0])

    def lists(name: str, dtype) -> pa.Array:
        flat = np.concatenate(cols[name]).reshape(-1) if cols[name] else np.zeros(0)
        return pa.ListArray.from_arrays(pa.array(np.arange(len(latents) + 1, dtype=np.int32) * n),
                                        pa.array(flat.astype(dtype)))

    return pa.Table.from_arrays(
        [pa.array(latents.astype(np.int32)), lists("top_ids", np.int32), lists("top_logits", np.float32),
         lists("bottom_ids", np.int32), lists("bottom_logits", np.float32)], schema=LOGIT_EFFECTS_SCHEMA)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def write_logit_effects(store: RunStore, cfg: PostprocessConfig) -> dict:
    """Post-processing's last step, per hookpoint: logit effects of the page latents, bucket by bucket.

    Skipped (state records the reason) when disabled or when the SAE decoder / model unembedding
    cannot be loaded; redone only when the latents, SAE, model or settings changed."""
    manifest = store.read_json(MANIFEST_KEY)
    le = cfg.logit_effects
    done: dict[str, str] = {}
    unembed: Unembedding | None = None
    for hook in cfg.hookpoints or dictionary_ids(manifest):
        n_active = store.read_part(stats_key(hook)).column("n_active").to_numpy()  # one int64 per latent
        latents = np.sort(page_latents(n_active, le.max_latents))
        sae_id = (manifest.get("saes") or {}).get(hook, {})
        model = (manifest.get("config") or {}).get("model")
        state = {"latents": len(latents), "latents_sha256": hashlib.sha256(latents.tobytes()).hexdigest(),
                 "sae": sae_id.get("sha256") or sae_id.get("path"), "model": (manifest.get("model") or {}).get("sha256"),
                 "bucket_size": cfg.bucket_size, "top_n": le.top_n}
        previous = _read_json(store, logit_effects_state_key(hook))
        if previous is not None and previous.get("computed") == state:
            done[hook] = "unchanged"
            continue
        reason = None if le.enabled else "disabled (logit_effects.enabled=false)"
        if reason is None and not sae_id.get("path"):
            reason = "the manifest records no SAE path for this hookpoint, so its decoder is not available"
        if reason is None and not model:
            reason = "the manifest records no model, so its unembedding is not available"
        w_dec = None
        if reason is None:
            try:
                from pipeline.sae import load_sae

                w_dec = load_sae(sae_id["path"], hookpoint=hook).W_dec
                if unembed is None:
                    unembed = load_unembedding(ModelConfig(**model))
                if w_dec.shape[1] != unembed.weight.shape[1]:
                    raise ValueError(f"SAE d={w_dec.shape[1]} but the unembedding has d={unembed.weight.shape[1]}")
            except Exception as err:  # noqa: BLE001 - any load failure is reported, not fatal
                reason = f"{type(err).__name__}: {err}"
        if reason is not None:
            log.warning(f"[{store.run_id}] logit effects for {hook} skipped: {reason}")
            if previous != {"skipped": reason, "for": state}:  # a no-op rerun writes nothing
                store.write_json(logit_effects_state_key(hook), {"skipped": reason, "for": state})
            done[hook] = "skipped"
            continue
        device = _device(le.device)
        buckets = latents // cfg.bucket_size
        for b in np.unique(buckets).tolist():
            store.write_table(logit_effects_key(hook, b),
                              effects_table(latents[buckets == b], w_dec, unembed, le, device))
        store.write_json(logit_effects_state_key(hook), {"computed": state, "unembedding": unembed.source,
                                                         "centred": unembed.centre, "device": str(device),
                                                         "buckets": np.unique(buckets).tolist()})
        log.info(f"[{store.run_id}] logit effects for {hook}: {len(latents)} latent(s) on {device}")
        done[hook] = "computed"
    return done


def _read_json(store: RunStore, key: str) -> dict | None:
    try:
        return store.read_json(key)
    except FileNotFoundError:
        return None

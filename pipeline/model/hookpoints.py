"""Hookpoint names -> modules of a Hugging Face causal LM.

Names (docs/DESIGN.md, "Hookpoints"):
    embed          the residual stream entering block 0       == hidden_states[0]
    layers.N       block N's output                           == hidden_states[N+1]
    layers.N.attn  block N's attention update: exactly what the attention sub-block adds
                   to the residual stream
    layers.N.mlp   block N's MLP update: exactly what the MLP sub-block adds to the residual stream
    layers.N.mlp_in   the MLP module's input: the residual stream after the pre-MLP norm (what a
                   transcoder reads; the MLP module's forward input)
    layers.N.mlp_out  the MLP module's output, before any post-MLP norm, dropout module or residual
                   add (what a transcoder reconstructs). Equal to layers.N.mlp where the block adds
                   the MLP output unchanged (Llama, Mistral, Qwen, GPT-2 in eval); differs in Gemma 2/3
                   (post_feedforward_layernorm) and GPT-NeoX (post_mlp_dropout, identity in eval).

The updates per family (transformers 5.x modeling code): Llama/Mistral/Qwen: the o_proj /
down_proj outputs (self_attn / mlp); GPT-2: c_proj after resid_dropout (attn / mlp); Gemma 2/3:
*after* the post-attention / post-feedforward norm; GPT-NeoX: after post_attention_dropout /
post_mlp_dropout (with the parallel residual both read the block input). For sequential
blocks attn + mlp == hidden_states[N+1] - hidden_states[N].

`embed` is taken as the *input* of block 0 rather than the embedding module's output, so
families that scale or add positions after the lookup (Gemma, GPT-2) still match
hidden_states[0]. For the last block, Hugging Face's hidden_states[-1] has the final norm
applied; `layers.{last}` is the raw block output.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Where each family keeps its decoder blocks, and what it calls their attention and MLP.
BLOCK_LIST_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma 1/2
    "model.language_model.layers",  # Gemma 3 (multimodal wrapper)
    "transformer.h",  # GPT-2, GPT-J
    "gpt_neox.layers",  # GPT-NeoX / Pythia
    "model.decoder.layers",  # OPT
)
ATTN_NAMES = ("self_attn", "attn", "attention")
MLP_NAMES = ("mlp", "feed_forward")
# Blocks that transform a sub-block's output before the residual add: the hookpoint is the last
# module on that path. Keyed on a module only that family has: in Llama `post_attention_layernorm`
# is the *pre*-MLP norm, in Gemma 2/3 it normalizes the attention output.
UPDATE_MODULES = (
    ("post_feedforward_layernorm", {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}),  # Gemma 2/3
    ("post_mlp_dropout", {"attn": "post_attention_dropout", "mlp": "post_mlp_dropout"}),  # GPT-NeoX
)

_NAME = re.compile(r"^(embed|layers\.(\d+)(?:\.(attn|mlp|mlp_in|mlp_out))?)$")


class HookpointError(ValueError):
    pass


def is_hookpoint_name(name: str) -> bool:
    """Whether `name` is spelled as one of our hookpoints (whether a model has it: `resolve_hookpoint`)."""
    return _NAME.match(name) is not None


@dataclass(frozen=True)
class Hookpoint:
    name: str
    module: nn.Module
    layer: int  # -1 for embed
    kind: str  # "embed" | "block" | "attn" | "mlp" | "mlp_in" | "mlp_out"

    @property
    def depth(self) -> tuple[int, int]:
        """Execution order inside the forward: embed < attn < mlp_in < mlp_out <= mlp < block output.
        (mlp_in is the MLP module's input, captured by a forward pre-hook: nothing of the MLP ran.)"""
        return (self.layer, {"embed": 0, "attn": 1, "mlp_in": 2, "mlp_out": 3, "mlp": 4, "block": 5}[self.kind])

    @property
    def reads_input(self) -> bool:
        """Captured from the module's forward input (a pre-hook), not its output."""
        return self.kind in ("embed", "mlp_in")


def _get(root: nn.Module, dotted: str) -> nn.Module | None:
    obj = root
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def find_blocks(model: nn.Module) -> nn.ModuleList:
    for path in BLOCK_LIST_PATHS:
        blocks = _get(model, path)
        if isinstance(blocks, nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise HookpointError(
        f"cannot find the decoder blocks of {type(model).__name__}: looked for {', '.join(BLOCK_LIST_PATHS)}"
    )


def _sub(block: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        m = getattr(block, n, None)
        if isinstance(m, nn.Module):
            return m
    return None


def valid_hookpoints(model: nn.Module) -> list[str]:
    blocks = find_blocks(model)
    names = ["embed"]
    for i, block in enumerate(blocks):
        names.append(f"layers.{i}")
        if _sub(block, ATTN_NAMES) is not None:
            names.append(f"layers.{i}.attn")
        if _sub(block, MLP_NAMES) is not None:
            names += [f"layers.{i}.mlp_in", f"layers.{i}.mlp_out", f"layers.{i}.mlp"]
    return names


def _valid_summary(model: nn.Module) -> str:
    n = len(find_blocks(model))
    return (f"embed, layers.0 .. layers.{n - 1}, layers.N.attn, layers.N.mlp, layers.N.mlp_in, layers.N.mlp_out "
            f"({type(model).__name__}, {n} blocks)")


def resolve_hookpoint(model: nn.Module, name: str) -> Hookpoint:
    match = _NAME.match(name)
    blocks = find_blocks(model)
    if match is None:
        raise HookpointError(f"unknown hookpoint {name!r}; valid: {_valid_summary(model)}")
    if name == "embed":
        return Hookpoint(name, blocks[0], -1, "embed")
    layer = int(match.group(2))
    if layer >= len(blocks):
        raise HookpointError(
            f"hookpoint {name!r}: the model has {len(blocks)} blocks; valid: {_valid_summary(model)}"
        )
    block = blocks[layer]
    kind = match.group(3)
    if kind is None:
        return Hookpoint(name, block, layer, "block")
    module = _sub(block, ATTN_NAMES if kind == "attn" else MLP_NAMES)
    if module is None:
        raise HookpointError(f"hookpoint {name!r}: block {layer} has no {kind.split('_')[0]} submodule; "
                             f"valid: {_valid_summary(model)}")
    if kind in ("mlp_in", "mlp_out"):  # the MLP module itself: its input (pre-hook) or its output
        return Hookpoint(name, module, layer, kind)
    return Hookpoint(name, _update_module(block, kind) or module, layer, kind)


def _update_module(block: nn.Module, kind: str) -> nn.Module | None:
    """The module whose output is what `kind` adds to the residual stream, where that is not the
    sub-block itself (see UPDATE_MODULES)."""
    for marker, names in UPDATE_MODULES:
        if isinstance(getattr(block, marker, None), nn.Module):
            return _sub(block, (names[kind],))
    return None

"""Harvest activations at several hookpoints in one forward, stopping after the deepest.

Forward hooks copy each requested output; the hook on the deepest hookpoint raises
`_StopForward`, so the blocks after it (and the LM head) never run. That makes the cost of
a harvest proportional to the depth of the deepest hookpoint, not to the model's depth.
"""
from __future__ import annotations

import torch
from torch import nn

from pipeline.model.hookpoints import Hookpoint, resolve_hookpoint


class _StopForward(Exception):
    pass


def _first_tensor(output) -> torch.Tensor:
    # Blocks and attention modules return tuples in several families; the hidden state is first.
    return output[0] if isinstance(output, (tuple, list)) else output


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor:
    # Blocks take the hidden state first (positional or `hidden_states=`); MLP modules name it
    # `x` or `hidden_states`.
    if args:
        return args[0]
    for name in ("hidden_states", "x", "input"):
        if name in kwargs:
            return kwargs[name]
    raise RuntimeError(f"cannot find the hidden state among the module's inputs {sorted(kwargs)}")


class Harvester:
    """`Harvester(model, ["layers.3", "layers.12"])(input_ids)` -> {hookpoint: [B, T, d]}."""

    def __init__(self, model: nn.Module, hookpoints: list[str]):
        if not hookpoints:
            raise ValueError("at least one hookpoint is required")
        self.model = model
        self.hookpoints: list[Hookpoint] = [resolve_hookpoint(model, h) for h in hookpoints]
        self.deepest = max(self.hookpoints, key=lambda h: h.depth)

    def _backbone(self) -> nn.Module:
        # Run the base model (no LM head) when the wrapper exposes it.
        base = getattr(self.model, "base_model", None)
        return base if isinstance(base, nn.Module) and base is not self.model else self.model

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        captured: dict[str, torch.Tensor] = {}
        handles = []

        def make_hook(hp: Hookpoint):
            def save(value: torch.Tensor) -> None:
                captured[hp.name] = value.detach()
                if hp is self.deepest:
                    raise _StopForward

            if hp.reads_input:  # embed: block 0's input; mlp_in: the MLP module's input (after the pre-MLP norm)
                return hp.module.register_forward_pre_hook(
                    lambda mod, args, kwargs: save(_first_input(args, kwargs)), with_kwargs=True
                )
            return hp.module.register_forward_hook(lambda mod, args, output: save(_first_tensor(output)))

        try:
            for hp in self.hookpoints:
                handles.append(make_hook(hp))
            try:
                self._backbone()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except _StopForward:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = [hp.name for hp in self.hookpoints if hp.name not in captured]
        if missing:
            raise RuntimeError(f"hookpoints {missing} were not reached in the forward pass")
        return captured

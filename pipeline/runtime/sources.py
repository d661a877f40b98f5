"""What each dictionary reads, as (checkpoint, hookpoint) sources (issue 17).

    sae          reads its dictionary id, a hookpoint of the main model (`model.path`)
    transcoder   reads its dictionary id (e.g. layers.N.mlp_in); the FVU check compares its
                 decode with `sae.output` (e.g. layers.N.mlp_out) of the main model
    crosscoder   reads `sae.inputs` in order, concatenated: `layers.6` is the main model's,
                 `CKPT/layers.6` that hookpoint of `model.checkpoints[CKPT]`

A source's checkpoint is None for the main model. Preflight and the worker both use these, so
what is checked is what is harvested.
"""
from __future__ import annotations

Source = tuple[str | None, str]  # (checkpoint name or None for model.path, hookpoint)


def split_source(name: str) -> Source:
    """`step1000/layers.6` -> ("step1000", "layers.6"); `layers.6` -> (None, "layers.6")."""
    ckpt, sep, hook = name.rpartition("/")
    return (ckpt, hook) if sep else (None, name)


def source_name(src: Source) -> str:
    return src[1] if src[0] is None else f"{src[0]}/{src[1]}"


def dictionary_inputs(dict_id: str, sae) -> list[Source]:
    """The sources whose activations, concatenated in this order, are the dictionary's input."""
    if sae.kind == "crosscoder":
        return [split_source(i) for i in sae.inputs]
    return [(None, dict_id)]


def fvu_targets(dict_id: str, sae) -> list[Source]:
    """What the decode is compared with: the input, except for a transcoder (its `output`)."""
    if sae.kind == "transcoder":
        return [split_source(sae.output)]
    return dictionary_inputs(dict_id, sae)


def needed_hookpoints(sources: list[Source]) -> dict[str | None, list[str]]:
    """Checkpoint -> its hookpoints to harvest (each once, in first-use order)."""
    out: dict[str | None, list[str]] = {}
    for ckpt, hook in sources:
        hooks = out.setdefault(ckpt, [])
        if hook not in hooks:
            hooks.append(hook)
    return out

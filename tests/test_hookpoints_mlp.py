"""`layers.N.mlp_in` / `layers.N.mlp_out` (what transcoders read and reconstruct) in every
supported family, checked against a direct computation: the residual stream the pre-MLP norm
reads (a pre-hook on the norm, not on the hookpoint's module) or `output_hidden_states`, pushed
through the block's norm and MLP submodules by hand, and tied back to hidden_states[N+1]."""
from __future__ import annotations

import pytest
import torch
from test_model_families import FAMILIES, MLP_PATH, V, build, neox_sequential, text_config

from pipeline.model.harvest import Harvester
from pipeline.model.hookpoints import find_blocks, resolve_hookpoint, valid_hookpoints

# family -> the module the block applies to the MLP's output before the residual add (None: none)
POST_MLP = {"gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm",
            "gemma3_multimodal": "post_feedforward_layernorm", "neox": "post_mlp_dropout",
            "neox_sequential": "post_mlp_dropout"}


def _randomize_norms(model) -> None:
    torch.manual_seed(1)
    with torch.no_grad():  # random norm gains: Gemma's zero-init norms would hide a missing one
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)


@pytest.mark.parametrize("family", FAMILIES + [neox_sequential], ids=lambda f: f.__name__)
def test_mlp_in_and_out_match_a_direct_computation(family):
    model = build(family)
    _randomize_norms(model)
    ids = torch.randint(0, V, (2, 5))
    block = find_blocks(model)[1]
    norm_name, _, parallel = MLP_PATH[family.__name__]
    norm = getattr(block, norm_name)
    seen = {}
    h = norm.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0].detach().clone()))
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    h.remove()
    got = Harvester(model, ["layers.1.mlp_in", "layers.1.mlp_out", "layers.1.mlp"])(ids)
    d = text_config(model).hidden_size
    assert got["layers.1.mlp_in"].shape == got["layers.1.mlp_out"].shape == (2, 5, d)
    mlp = resolve_hookpoint(model, "layers.1.mlp_in").module
    with torch.inference_mode():
        # parallel NeoX: the MLP's norm reads the block input, hidden_states[1] itself
        mid = hidden[1] if parallel else seen["mid"]
        if parallel:
            torch.testing.assert_close(seen["mid"], hidden[1])
        want_in = norm(mid)
        want_out = mlp(want_in)
        post = getattr(block, POST_MLP[family.__name__]) if family.__name__ in POST_MLP else (lambda t: t)
        update = post(got["layers.1.mlp_out"])
    torch.testing.assert_close(got["layers.1.mlp_in"], want_in)
    torch.testing.assert_close(got["layers.1.mlp_out"], want_out)
    # mlp_out is what the block adds to the residual stream after its post-MLP module
    torch.testing.assert_close(update, got["layers.1.mlp"])
    if not parallel:
        torch.testing.assert_close(mid + update, hidden[2])
    # the pre-MLP norm changes the stream: mlp_in is not the raw residual
    assert (got["layers.1.mlp_in"] - mid).abs().max() > 1e-2
    if family.__name__.startswith("gemma"):  # the post-feedforward norm makes mlp_out != mlp
        assert (got["layers.1.mlp_out"] - got["layers.1.mlp"]).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
@pytest.mark.parametrize("deepest", ["layers.1.mlp_in", "layers.1.mlp_out"])
def test_forward_stops_inside_the_block(family, deepest):
    """mlp_in deepest: the MLP never runs; mlp_out deepest: the MLP runs, nothing after it."""
    model = build(family)
    blocks = find_blocks(model)
    mlp = resolve_hookpoint(model, "layers.1.mlp_out").module
    calls = []
    for i, block in enumerate(blocks):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    mlp.register_forward_hook(lambda *a: calls.append("mlp1"))
    for name in POST_MLP.values():
        post = getattr(blocks[1], name, None)
        if post is not None:
            post.register_forward_hook(lambda *a: calls.append("post1"))
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("lm_head"))
    Harvester(model, ["embed", deepest])(torch.randint(0, V, (1, 5)))
    assert calls == ([0] if deepest.endswith("mlp_in") else [0, "mlp1"]), calls


def test_valid_hookpoints_list_mlp_in_and_out():
    model = build(FAMILIES[0])
    names = valid_hookpoints(model)
    assert {"layers.0.mlp_in", "layers.0.mlp_out", "layers.2.mlp_in", "layers.2.mlp_out"} <= set(names)
    order = [resolve_hookpoint(model, n).depth for n in ("layers.0.attn", "layers.0.mlp_in", "layers.0.mlp_out",
                                                         "layers.0.mlp", "layers.0", "layers.1.mlp_in")]
    assert order == sorted(order)

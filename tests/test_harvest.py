"""Harvested activations equal the model's own hidden states; nothing runs past the deepest hookpoint."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.harvest import Harvester
from pipeline.model.hookpoints import HookpointError, valid_hookpoints


def tiny_llama(layers=4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, n_positions=64)).eval()


def tiny_neox(layers=3):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    return GPTNeoXForCausalLM(cfg).eval()


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, tiny_neox])
def test_block_outputs_equal_hidden_states(build):
    model = build()
    n = model.config.num_hidden_layers
    ids = torch.randint(0, 64, (3, 11))
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
    # The last block's hidden_states entry has the final norm applied; compare the others.
    names = ["embed"] + [f"layers.{i}" for i in range(n - 1)]
    got = Harvester(model, names)(ids)
    torch.testing.assert_close(got["embed"], hidden[0])
    for i in range(n - 1):
        torch.testing.assert_close(got[f"layers.{i}"], hidden[i + 1], msg=f"layers.{i}")


def test_attn_and_mlp_hookpoints_equal_module_outputs():
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 9))
    seen = {}
    block = model.model.layers[1]
    h1 = block.mlp.register_forward_hook(lambda m, a, o: seen.__setitem__("mlp", o.detach().clone()))
    h2 = block.self_attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0].detach().clone()))
    with torch.inference_mode():
        model(ids)
    h1.remove(), h2.remove()
    got = Harvester(model, ["layers.1.mlp", "layers.1.attn"])(ids)
    torch.testing.assert_close(got["layers.1.mlp"], seen["mlp"])
    torch.testing.assert_close(got["layers.1.attn"], seen["attn"])


# Blocks that complete: all up to the deepest block; none when the deepest point is inside block 0.
@pytest.mark.parametrize("deepest,completed", [("layers.1", 2), ("layers.0.mlp", 0), ("embed", 0)])
def test_blocks_after_the_deepest_hookpoint_never_run(deepest, completed):
    model = tiny_llama()
    calls = []
    for i, block in enumerate(model.model.layers):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))
    model.model.norm.register_forward_hook(lambda *a: calls.append("norm"))
    Harvester(model, ["embed", deepest])(torch.randint(0, 64, (2, 5)))
    assert calls == list(range(completed)), calls


def test_unknown_hookpoint_lists_valid_ones():
    model = tiny_llama()
    with pytest.raises(HookpointError, match=r"layers\.0 \.\. layers\.3"):
        Harvester(model, ["layers.7"])
    with pytest.raises(HookpointError, match="unknown hookpoint 'blocks.2'"):
        Harvester(model, ["blocks.2"])
    assert "layers.3.mlp" in valid_hookpoints(model)

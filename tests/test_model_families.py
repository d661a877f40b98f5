"""Hookpoints resolve the same way in every supported model family, with tiny random-weight
models built from each family's config (nothing downloaded); models load from local folders,
the Hugging Face hub-cache layout and remote (fsspec) prefixes."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.harvest import Harvester
from pipeline.model.hookpoints import find_blocks

V = 64
COMMON = {"vocab_size": V, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**COMMON))


def mistral():
    from transformers import MistralConfig, MistralForCausalLM
    return MistralForCausalLM(MistralConfig(**COMMON, sliding_window=None))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    return Qwen2ForCausalLM(Qwen2Config(**COMMON))


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, head_dim=8))


def gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM
    return Gemma2ForCausalLM(Gemma2Config(**COMMON, head_dim=8, sliding_window=4))


def gemma3_text():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, head_dim=8, sliding_window=4))


def gemma3_multimodal():
    # Gemma 3 4B+ checkpoints are Gemma3ForConditionalGeneration: blocks under model.language_model.
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    text = dict(COMMON, head_dim=8, sliding_window=4)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                  "image_size": 28, "patch_size": 14}
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=64))


def neox():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64))


FAMILIES = [llama, mistral, qwen2, qwen3, gemma2, gemma3_text, gemma3_multimodal, gpt2, neox]


def build(family):
    torch.manual_seed(0)
    return family().eval()


def text_config(model):
    return getattr(model.config, "text_config", None) or model.config


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_block_outputs_equal_hidden_states(family):
    model = build(family)
    n = text_config(model).num_hidden_layers
    ids = torch.randint(0, V, (2, 7))
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    names = ["embed"] + [f"layers.{i}" for i in range(n - 1)]  # the last entry has the final norm applied
    got = Harvester(model, names)(ids)
    torch.testing.assert_close(got["embed"], hidden[0])
    for i in range(n - 1):
        torch.testing.assert_close(got[f"layers.{i}"], hidden[i + 1], msg=f"layers.{i}")


# How each family's block turns the residual stream after attention (`mid`) into its MLP update,
# written out from transformers' modeling code, and which norm reads `mid`. Parallel blocks
# (GPT-NeoX default) feed the MLP the block input instead.
def _llama_mlp(b, x):
    return b.mlp(b.post_attention_layernorm(x))


def _gemma_mlp(b, x):
    return b.post_feedforward_layernorm(b.mlp(b.pre_feedforward_layernorm(x)))


def _gpt2_mlp(b, x):
    return b.mlp(b.ln_2(x))


def _neox_mlp(b, x):
    return b.post_mlp_dropout(b.mlp(b.post_attention_layernorm(x)))


MLP_PATH = {  # family -> (the norm whose input is the MLP's residual input, the MLP update from it, parallel)
    "llama": ("post_attention_layernorm", _llama_mlp, False), "mistral": ("post_attention_layernorm", _llama_mlp, False),
    "qwen2": ("post_attention_layernorm", _llama_mlp, False), "qwen3": ("post_attention_layernorm", _llama_mlp, False),
    "gemma2": ("pre_feedforward_layernorm", _gemma_mlp, False), "gemma3_text": ("pre_feedforward_layernorm", _gemma_mlp, False),
    "gemma3_multimodal": ("pre_feedforward_layernorm", _gemma_mlp, False), "gpt2": ("ln_2", _gpt2_mlp, False),
    "neox": ("post_attention_layernorm", _neox_mlp, True), "neox_sequential": ("post_attention_layernorm", _neox_mlp, False),
}


def neox_sequential():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                            intermediate_size=64, max_position_embeddings=64,
                                            use_parallel_residual=False))


@pytest.mark.parametrize("family", FAMILIES + [neox_sequential], ids=lambda f: f.__name__)
def test_attn_and_mlp_hookpoints_are_the_residual_updates(family):
    """`layers.N.attn` / `layers.N.mlp` are what the sub-blocks add to the residual stream,
    checked against computations that do not use the hookpoints' modules: hidden_states
    differences, the residual the MLP side reads (an input, not the hooked output), and the
    MLP update recomputed from the block's submodules."""
    model = build(family)
    torch.manual_seed(1)
    with torch.no_grad():  # random norm gains: Gemma's zero-init norms would hide a missing one
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.5)
    ids = torch.randint(0, V, (2, 5))
    block = find_blocks(model)[1]
    norm_name, mlp_update, parallel = MLP_PATH[family.__name__]
    seen = {}
    h = getattr(block, norm_name).register_forward_pre_hook(lambda m, a: seen.__setitem__("in", a[0].detach().clone()))
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    h.remove()
    got = Harvester(model, ["layers.1.attn", "layers.1.mlp"])(ids)
    d = text_config(model).hidden_size
    attn, mlp = got["layers.1.attn"], got["layers.1.mlp"]
    assert attn.shape == mlp.shape == (2, 5, d)
    delta = hidden[2] - hidden[1]
    torch.testing.assert_close(attn + mlp, delta)
    with torch.inference_mode():
        if parallel:  # both sub-blocks read the block input
            torch.testing.assert_close(seen["in"], hidden[1])
            torch.testing.assert_close(mlp, mlp_update(block, hidden[1]))
        else:
            mid = seen["in"]  # the residual stream after attention
            torch.testing.assert_close(attn, mid - hidden[1])
            torch.testing.assert_close(mlp, hidden[2] - mid)
            torch.testing.assert_close(mlp, mlp_update(block, mid))
    assert attn.abs().mean() > 1e-3 and mlp.abs().mean() > 1e-3  # non-trivial updates


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.__name__)
def test_nothing_after_the_deepest_hookpoint_runs(family):
    model = build(family)
    calls = []
    for i, block in enumerate(find_blocks(model)):
        block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
    model.get_output_embeddings().register_forward_hook(lambda *a: calls.append("lm_head"))
    Harvester(model, ["embed", "layers.0.mlp", "layers.1"])(torch.randint(0, V, (1, 5)))
    assert calls == [0, 1], calls


# ---------------------------------------------------------------------------------------------
# Where models come from


def _save_tiny(folder):
    model = build(llama)
    model.save_pretrained(str(folder))
    return model


def test_hf_cache_layout(tmp_path, monkeypatch):
    """`hf-cache:org/name` and a models--org--name folder resolve offline to the snapshot."""
    from pipeline.model.loader import ModelError, resolve_model_dir

    hub = tmp_path / "hf" / "hub"
    repo = hub / "models--tiny-org--tiny-llama"
    rev = "0123456789abcdef0123456789abcdef01234567"
    _save_tiny(repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    (repo / "snapshots" / ("f" * 40)).mkdir()  # another revision, not the one main points at

    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    want = repo / "snapshots" / rev
    assert resolve_model_dir("hf-cache:tiny-org/tiny-llama") == want
    assert resolve_model_dir(str(repo)) == want
    assert resolve_model_dir(f"hf-cache:tiny-org/tiny-llama@{rev}") == want
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HF_HOME")
    assert resolve_model_dir("hf-cache:tiny-org/tiny-llama") == want
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        resolve_model_dir("hf-cache:tiny-org/other")
    with pytest.raises(ModelError, match="revision 'v9'"):
        resolve_model_dir("hf-cache:tiny-org/tiny-llama@v9")


def test_load_model_from_hf_cache_and_remote(tmp_path, monkeypatch):
    import fsspec

    from pipeline.config import ModelConfig
    from pipeline.model.loader import load_model

    src = tmp_path / "src"
    ref = _save_tiny(src)
    ids = torch.randint(0, V, (1, 6))
    with torch.inference_mode():
        want = ref(ids).logits

    url = f"memory://models-{tmp_path.name}/tiny-llama"
    mem = fsspec.filesystem("memory")
    for f in src.iterdir():
        mem.pipe(f"{url}/{f.name}", f.read_bytes())
    monkeypatch.setenv("SAE_HARVEST_CACHE", str(tmp_path / "cache"))
    model = load_model(ModelConfig(name="tiny", path=url, gguf_file=None, dtype="float32"))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, want)

"""Third-party SAE checkpoints load into `SAE` and encode exactly as their own libraries do.

Reference implementations:
- EleutherAI `sparsify` (`eai-sparsify`, in the test extra): compared directly against
  `SparseCoder.encode`. A re-implementation of its encode (copied from sparsify 1.3
  `sparse_coder.py` / `fused_encoder.py`) is compared too and always runs.
- SAELens (`sae-lens`): too heavy for the test extra (transformer-lens, wandb, ...), so the
  direct comparison against `TopKSAE.encode` is skipped when it is not installed; the
  re-implementation below (from sae-lens 6.54 `saes/sae.py` + `saes/topk_sae.py`) always runs.
- OpenAI `sparse_autoencoder` is not on PyPI: compared against `Autoencoder.encode` copied
  from github.com/openai/sparse_autoencoder `sparse_autoencoder/model.py` (LN, encode_pre_act,
  TopK), on a state_dict laid out exactly as upstream's `Autoencoder.state_dict()` writes it.

"Equal" means: the same set of active (value > 0) latent ids per row, and the dense latent
vectors equal to fp32 tolerance.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import require_module

from pipeline.remote import fetch_to_cache
from pipeline.sae.formats import SAEFormatError, load_sae, sae_info, transformer_lens_hookpoint
from pipeline.sae.sae import SAE

D, L, K, N = 24, 160, 8, 48


def _x(seed=1, n=N, d=D) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Offset + scale so the input normalizations have something to undo.
    return 3.0 * torch.randn(n, d, generator=g) + 0.5


def assert_same_latents(sae: SAE, x: torch.Tensor, ref_dense: torch.Tensor) -> None:
    values, ids = sae.encode(x)
    assert ids.dtype == torch.int32 and values.shape == ids.shape == (x.shape[0], sae.k)
    assert torch.all(values[:, :-1] >= values[:, 1:]), "values must be descending"
    dense = torch.zeros(x.shape[0], sae.n_latents).scatter_(1, ids.long(), values)
    for row in range(x.shape[0]):
        got = sorted(ids[row][values[row] > 0].tolist())
        want = sorted(torch.nonzero(ref_dense[row] > 0).flatten().tolist())
        assert got == want, f"row {row}: ids {got} != reference {want}"
    torch.testing.assert_close(dense, ref_dense.float(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# OpenAI sparse_autoencoder


def openai_LN(x: torch.Tensor, eps: float = 1e-5):
    # upstream model.py `LN`, verbatim
    mu = x.mean(dim=-1, keepdim=True)
    x = x - mu
    std = x.std(dim=-1, keepdim=True)
    x = x / (std + eps)
    return x, mu, std


def openai_encode(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """upstream Autoencoder.encode for a TopK(k, ReLU) checkpoint (normalize=True for TopK)."""
    x, _, _ = openai_LN(x)
    x = x - sd["pre_bias"]
    pre = F.linear(x, sd["encoder.weight"], sd["latent_bias"])
    topk = torch.topk(pre, k=sd["activation_state_dict"]["k"], dim=-1)
    values = torch.relu(topk.values)
    return torch.zeros_like(pre).scatter_(-1, topk.indices, values)


def openai_state_dict(seed=0, activation="TopK", k=K) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {
        "pre_bias": 0.1 * torch.randn(D, generator=g),
        "encoder.weight": torch.randn(L, D, generator=g) / D**0.5,
        "latent_bias": 0.1 * torch.randn(L, generator=g),
        "decoder.weight": torch.randn(D, L, generator=g),
        "stats_last_nonzero": torch.zeros(L, dtype=torch.long),
        "latents_activation_frequency": torch.ones(L),
        "latents_mean_square": torch.zeros(L),
        "activation": activation,
    }
    if activation == "TopK":
        sd["activation_state_dict"] = {"k": k, "postact_fn": "ReLU"}
    return sd


def test_openai_matches_upstream_encode(tmp_path):
    sd = openai_state_dict()
    folder = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders"
    folder.mkdir(parents=True)
    torch.save(sd, folder / "8.pt")
    sae = load_sae(folder / "8.pt")
    assert (sae.format, sae.d_in, sae.n_latents, sae.k) == ("openai", D, L, K)
    assert sae.hookpoint == "layers.8"  # resid_post_mlp = TransformerLens hook_resid_post = block output
    x = _x()
    assert_same_latents(sae, x, openai_encode(sd, x))
    # decode is upstream's decoder(latents) + pre_bias, in the normalized space
    values, ids = sae.encode(x)
    dense = torch.zeros(N, L).scatter_(1, ids.long(), values)
    torch.testing.assert_close(sae.decode(values, ids), dense @ sd["decoder.weight"].T + sd["pre_bias"],
                               rtol=1e-4, atol=1e-4)
    assert sae.sha256 == hashlib.sha256((folder / "8.pt").read_bytes()).hexdigest()


def test_openai_layernorm_uses_unbiased_std_plus_eps():
    # Guard the exact normalization: population std or eps inside the sqrt would differ here.
    x = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    sae = SAE(W_enc=torch.eye(4), b_enc=None, W_dec=torch.eye(4), b_dec=None, k=4, input_norm="openai_layernorm")
    got = sae.normalize(x)
    centred = x - x.mean()
    want = centred / (centred.pow(2).sum().div(3).sqrt() + 1e-5)
    torch.testing.assert_close(got, want)


def test_openai_relu_checkpoint_is_rejected(tmp_path):
    torch.save(openai_state_dict(activation="ReLU"), tmp_path / "0.pt")
    with pytest.raises(SAEFormatError, match="only TopK"):
        load_sae(tmp_path / "0.pt")


# ---------------------------------------------------------------------------------------------
# EleutherAI sparsify


def sparsify_encode(sd: dict, x: torch.Tensor, k: int, transcode=False) -> torch.Tensor:
    """sparsify 1.3 SparseCoder.encode + FusedEncoder.forward (activation='topk')."""
    if not transcode:
        x = x - sd["b_dec"]
    pre = F.relu(F.linear(x, sd["encoder.weight"], sd["encoder.bias"]))
    values, indices = torch.topk(pre, k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values)


def write_sparsify(folder: Path, seed=0, transcode=False, k=K) -> dict:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {"encoder.weight": torch.randn(L, D, generator=g) / D**0.5, "encoder.bias": 0.1 * torch.randn(L, generator=g),
          "W_dec": torch.randn(L, D, generator=g), "b_dec": 0.5 * torch.randn(D, generator=g)}
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "sae.safetensors"))
    cfg = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": L, "k": k,
           "multi_topk": False, "skip_connection": False, "transcode": transcode, "d_in": D}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return sd


@pytest.mark.parametrize("transcode", [False, True])
def test_sparsify_matches_reimplementation(tmp_path, transcode):
    module = "layers.3.mlp" if transcode else "layers.3"
    hookpoint = "layers.3.mlp_in" if transcode else "layers.3"
    sd = write_sparsify(tmp_path / "sae-tiny" / module, transcode=transcode)
    write_sparsify(tmp_path / "sae-tiny" / "layers.5", seed=1)
    sae = load_sae(tmp_path / "sae-tiny", hookpoint=hookpoint)
    assert (sae.format, sae.hookpoint, sae.k, sae.activation) == ("sparsify", hookpoint, K, "relu_topk")
    assert (sae.kind, sae.output) == (("transcoder", "layers.3.mlp_out") if transcode else ("sae", None))
    x = _x()
    assert_same_latents(sae, x, sparsify_encode(sd, x, K, transcode))
    # the subfolder form loads the same SAE
    assert load_sae(tmp_path / "sae-tiny" / module).sha256 == sae.sha256
    info = sae_info(tmp_path / "sae-tiny", hookpoint=hookpoint)
    assert (info.kind, info.hookpoint, info.output) == (sae.kind, sae.hookpoint, sae.output)


@pytest.mark.parametrize("module,hookpoint,output", [("layers.4.mlp", "layers.4.mlp_in", "layers.4.mlp_out"),
                                                     ("h.2.mlp", "layers.2.mlp_in", "layers.2.mlp_out"),
                                                     ("layers.0", "embed", "layers.0"),
                                                     ("layers.3", "layers.2", "layers.3")])
def test_sparsify_transcoder_hookpoints(tmp_path, module, hookpoint, output):
    """sparsify transcodes a module: its input is the hookpoint read, its output the one reconstructed."""
    write_sparsify(tmp_path / module, transcode=True)
    info = sae_info(tmp_path / module)
    assert (info.kind, info.hookpoint, info.output) == ("transcoder", hookpoint, output)


@pytest.mark.parametrize("folder,hookpoint", [("layers.3", "layers.3"), ("h.3", "layers.3"), ("h.2.mlp", "layers.2.mlp"),
                                               ("layers.3.self_attn", "layers.3.self_attn"), ("layers.4/seed1", "layers.4"),
                                               ("my-sae", None)])
def test_sparsify_hookpoint_is_its_module(tmp_path, folder, hookpoint):
    """sparsify names each folder after the module it hooked (GPT-2's `h.N` is our `layers.N`; the
    trainer's `<module>/seedN` for several seeds). A module we have no name for stays as it is, so it
    matches no hookpoint; a folder renamed by hand names none (None: nothing to check)."""
    write_sparsify(tmp_path / folder)
    assert sae_info(tmp_path / folder).hookpoint == hookpoint


def test_sparsify_transcoder_on_an_unmapped_module_fails(tmp_path):
    write_sparsify(tmp_path / "layers.1.self_attn", transcode=True)
    with pytest.raises(SAEFormatError, match="'layers.1.self_attn'.*only MLP modules"):
        load_sae(tmp_path / "layers.1.self_attn")


def assert_matches_sparsify(sae, coder) -> None:
    """Our encode (ids, values) and decode equal the sparsify coder's own on the same input."""
    from sparsify.utils import eager_decode

    x = _x()
    out = coder.encode(x)
    ref = torch.zeros(N, L).scatter_(1, out.top_indices, out.top_acts.detach())
    assert_same_latents(sae, x, ref)
    values, ids = sae.encode(x)
    # SparseCoder.decode with sparsify's CPU decoder (its Triton one needs a GPU)
    want = eager_decode(out.top_indices, out.top_acts, coder.W_dec.mT) + coder.b_dec
    torch.testing.assert_close(sae.decode(values, ids), want.detach(), rtol=1e-4, atol=1e-4)


def test_sparsify_transcoder_matches_library(tmp_path):
    """A transcoder built and saved by sparsify itself (TranscoderConfig: transcode=True, a skip
    connection as sparsify's transcoders usually have): same latents as SparseCoder.encode, and
    decode equals the library's decode (W_skip is decode-only and ignored, with a warning)."""
    sparsify = require_module("sparsify", "eai-sparsify", "pip install -e '.[test]'")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.TranscoderConfig(num_latents=L, k=K, skip_connection=True))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.W_dec.normal_(0, 0.3)
        coder.b_dec.normal_(0, 0.5)
        coder.W_skip.normal_(0, 0.1)
    coder.save_to_disk(tmp_path / "layers.2.mlp")
    assert json.loads((tmp_path / "layers.2.mlp" / "cfg.json").read_text())["transcode"] is True
    with pytest.warns(UserWarning, match="W_skip"):
        sae = load_sae(tmp_path, hookpoint="layers.2.mlp_in")
    assert (sae.kind, sae.hookpoint, sae.output, sae.b_pre) == ("transcoder", "layers.2.mlp_in", "layers.2.mlp_out", None)
    assert_matches_sparsify(sae, coder)


def test_sparsify_matches_library(tmp_path):
    sparsify = require_module("sparsify", "eai-sparsify", "pip install -e '.[test]'")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=L, k=K))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.5)
    coder.save_to_disk(tmp_path / "layers.2")
    sae = load_sae(tmp_path, hookpoint="layers.2")
    assert_matches_sparsify(sae, coder)


def test_multi_hookpoint_folder_needs_a_hookpoint(tmp_path):
    write_sparsify(tmp_path / "layers.0")
    write_sparsify(tmp_path / "layers.1", seed=1)
    with pytest.raises(SAEFormatError, match=r"several hookpoints \(layers.0, layers.1\).*hookpoint="):
        load_sae(tmp_path)


def test_sparsify_weights_are_memory_mapped(tmp_path):
    """A loaded checkpoint is backed by the file (page cache), not by a second anonymous copy."""
    from safetensors.torch import save_file

    n_lat, d = 1 << 16, 256  # 64 MiB per matrix
    folder = tmp_path / "layers.0"
    folder.mkdir()
    save_file({"encoder.weight": torch.ones(n_lat, d), "encoder.bias": torch.zeros(n_lat),
               "W_dec": torch.ones(n_lat, d), "b_dec": torch.zeros(d)}, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps({"k": 4, "d_in": d, "num_latents": n_lat}))

    def rss_anon_mb() -> float:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
        pytest.skip("no /proc/self/status RssAnon")

    before = rss_anon_mb()
    sae = load_sae(folder)
    total = float(sae.W_enc.sum() + sae.W_dec.sum())  # touch every page
    grown = rss_anon_mb() - before
    assert total == 2 * n_lat * d
    assert grown < 32, f"loading 128 MiB of weights grew anonymous memory by {grown:.0f} MiB"


# ---------------------------------------------------------------------------------------------
# SAELens topk


def saelens_encode(sd: dict, cfg: dict, x: torch.Tensor) -> torch.Tensor:
    """sae-lens 6.54 TopKSAE.encode: process_sae_in (run_time_activation_norm_fn_in, - b_dec *
    apply_b_dec_to_input), @ W_enc + b_enc, * ||W_dec|| if rescale_acts_by_decoder_norm,
    TopK (topk, then relu on the kept values)."""
    norm = cfg["normalize_activations"]
    if norm == "constant_norm_rescale":
        x = x * (cfg["d_in"] ** 0.5) / x.norm(dim=-1, keepdim=True)
    elif norm == "layer_norm":
        x, _, _ = openai_LN(x)
    x = x - sd["b_dec"] * cfg["apply_b_dec_to_input"]
    pre = x @ sd["W_enc"] + sd["b_enc"]
    if cfg["rescale_acts_by_decoder_norm"]:
        pre = pre * sd["W_dec"].norm(dim=-1)
    values, indices = torch.topk(pre, k=cfg["k"], dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter_(-1, indices, values.relu())


def write_saelens(folder: Path, seed=0, **overrides) -> tuple[dict, dict]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {"W_enc": torch.randn(D, L, generator=g) / D**0.5, "b_enc": 0.1 * torch.randn(L, generator=g),
          "W_dec": torch.randn(L, D, generator=g) * torch.rand(L, 1, generator=g), "b_dec": 0.5 * torch.randn(D, generator=g)}
    cfg = {"architecture": "topk", "d_in": D, "d_sae": L, "dtype": "float32", "device": "cpu", "k": K,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "rescale_acts_by_decoder_norm": False,
           "reshape_activations": "none",
           "metadata": {"sae_lens_version": "6.54.12", "hook_name": "blocks.4.hook_resid_post", "model_name": "tiny"}}
    cfg.update(overrides)
    folder.mkdir(parents=True)
    save_file(sd, str(folder / "sae_weights.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return sd, cfg


SAELENS_CASES = [
    {},
    {"apply_b_dec_to_input": False},
    {"normalize_activations": "layer_norm"},
    {"normalize_activations": "constant_norm_rescale"},
    {"rescale_acts_by_decoder_norm": True},
    {"normalize_activations": "constant_norm_rescale", "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False},
]


@pytest.mark.parametrize("overrides", SAELENS_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_saelens_matches_reimplementation(tmp_path, overrides):
    sd, cfg = write_saelens(tmp_path / "sae", **overrides)
    sae = load_sae(tmp_path / "sae")
    assert (sae.format, sae.k, sae.hookpoint) == ("saelens", K, "layers.4")
    x = _x()
    assert_same_latents(sae, x, saelens_encode(sd, cfg, x))


@pytest.mark.parametrize("overrides", SAELENS_CASES, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_saelens_matches_library(tmp_path, overrides):
    sae_lens = require_module("sae_lens", "sae-lens", "make setup installs it (REFERENCE_LIBS)")
    write_saelens(tmp_path / "sae", **overrides)
    ref_sae = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    sae = load_sae(tmp_path / "sae")
    x = _x()
    with torch.no_grad():
        ref = ref_sae.encode(x)
        assert_same_latents(sae, x, ref)
        values, ids = sae.encode(x)
        # decode in the normalized space: SAELens's decode before run_time_activation_norm_fn_out
        from sae_lens.saes.topk_sae import act_times_W_dec

        want = act_times_W_dec(ref, ref_sae.W_dec, ref_sae.cfg.rescale_acts_by_decoder_norm) + ref_sae.b_dec
    torch.testing.assert_close(sae.decode(values, ids), want, rtol=1e-4, atol=1e-4)


def test_saelens_expected_average_only_in(tmp_path):
    with pytest.raises(SAEFormatError, match="norm scaling factor"):
        write_saelens(tmp_path / "a", normalize_activations="expected_average_only_in")
        load_sae(tmp_path / "a")
    sd, cfg = write_saelens(tmp_path / "b", normalize_activations="expected_average_only_in", norm_scaling_factor=0.25)
    sae = load_sae(tmp_path / "b")
    # SAELens's fold_activation_norm_scaling_factor: W_enc *= f, W_dec /= f, b_dec /= f
    folded = {"W_enc": sd["W_enc"] * 0.25, "b_enc": sd["b_enc"], "W_dec": sd["W_dec"] / 0.25, "b_dec": sd["b_dec"] / 0.25}
    x = _x()
    assert_same_latents(sae, x, saelens_encode(folded, {**cfg, "normalize_activations": "none"}, x))


def test_saelens_unsupported_settings_fail_clearly(tmp_path):
    write_saelens(tmp_path / "w", normalize_activations="covariance_whitening")
    with pytest.raises(SAEFormatError, match="covariance_whitening.*not supported"):
        load_sae(tmp_path / "w")
    write_saelens(tmp_path / "j", architecture="jumprelu")
    with pytest.raises(SAEFormatError, match="'jumprelu' is not a top-k SAE"):
        load_sae(tmp_path / "j")


def test_saelens_pre_6_config(tmp_path):
    sd, cfg = write_saelens(tmp_path / "old", architecture="standard", activation_fn_str="topk",
                            activation_fn_kwargs={"k": 5}, k=None, hook_point="blocks.0.hook_resid_pre", metadata={})
    sae = load_sae(tmp_path / "old")
    assert (sae.k, sae.hookpoint) == (5, "embed")
    x = _x()
    assert_same_latents(sae, x, saelens_encode(sd, {**cfg, "k": 5}, x))


def test_transformer_lens_hook_names():
    assert transformer_lens_hookpoint("blocks.8.hook_resid_post") == "layers.8"
    assert transformer_lens_hookpoint("blocks.8.hook_resid_pre") == "layers.7"
    assert transformer_lens_hookpoint("blocks.3.hook_mlp_out") == "layers.3.mlp"
    assert transformer_lens_hookpoint("blocks.3.hook_attn_out") == "layers.3.attn"
    assert transformer_lens_hookpoint("blocks.3.hook_resid_mid") == "blocks.3.hook_resid_mid"  # no equivalent
    # SAELens on a Hugging Face model (HookedProxyLM): the module's output
    assert transformer_lens_hookpoint("model.layers.5") == "layers.5"
    assert transformer_lens_hookpoint("transformer.h.2") == "layers.2"
    assert transformer_lens_hookpoint("gpt_neox.layers.1.mlp") == "layers.1.mlp"
    assert transformer_lens_hookpoint("model.layers.5.self_attn") == "model.layers.5.self_attn"


# ---------------------------------------------------------------------------------------------
# Own format, sources, identity


def test_own_format_still_loads(tmp_path):
    from pipeline.sae.sae import random_sae

    random_sae(D, L, K, hookpoint="layers.1").save(tmp_path / "own" / "layers.1")
    sae = load_sae(tmp_path / "own", hookpoint="layers.1")
    assert (sae.format, sae.hookpoint, sae.n_latents) == ("sae-harvest", "layers.1", L)


def test_unknown_folder_is_rejected(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"nope")
    with pytest.raises(SAEFormatError, match="not a recognised SAE checkpoint"):
        load_sae(tmp_path)


def test_remote_prefix_is_fetched_verified_and_cached(tmp_path):
    import fsspec

    src = tmp_path / "src" / "layers.3"
    sd = write_sparsify(src)
    mem = fsspec.filesystem("memory")
    url = f"memory://bucket-{tmp_path.name}/saes/layers.3"
    for f in src.iterdir():
        mem.pipe(f"{url}/{f.name}", f.read_bytes())
    cache = tmp_path / "cache"
    sae = load_sae(url, cache_dir=cache)
    assert sae.source == url and sae.hookpoint == "layers.3"
    assert sae.sha256 == load_sae(src).sha256
    x = _x()
    assert_same_latents(sae, x, sparsify_encode(sd, x, K))

    # A corrupted cache entry is detected by its digest and fetched again.
    local = fetch_to_cache(url, cache)
    (local / "sae.safetensors").write_bytes(b"garbage")
    assert load_sae(url, cache_dir=cache).sha256 == sae.sha256

    # A remote sidecar digest that does not match stops the fetch.
    mem.pipe(f"{url}/cfg.json.sha256", b"0" * 64 + b"  cfg.json\n")
    (local / "cfg.json").write_bytes(b"{}")
    with pytest.raises(OSError, match="cfg.json failed its integrity check"):
        fetch_to_cache(url, cache)
    # An expected digest given by the caller is enforced too.
    mem.rm(f"{url}/cfg.json.sha256")
    with pytest.raises(OSError, match="integrity"):
        fetch_to_cache(url, tmp_path / "cache2", expected_sha256={"sae.safetensors": "f" * 64})


def test_remote_single_file(tmp_path):
    import fsspec

    sd = openai_state_dict(seed=3)
    torch.save(sd, tmp_path / "3.pt")
    url = f"memory://bucket-{tmp_path.name}/openai/3.pt"
    fsspec.filesystem("memory").pipe(url, (tmp_path / "3.pt").read_bytes())
    sae = load_sae(url, cache_dir=tmp_path / "cache")
    x = _x()
    assert_same_latents(sae, x, openai_encode(sd, x))


# ---------------------------------------------------------------------------------------------
# Crosscoders. Neither library is on PyPI with its crosscoder (PyPI's dictionary-learning 0.1.0
# predates it; the model-diff replication is a script repo), so their encodes are reproduced
# below from the sources, line for line where it matters, on state_dicts laid out as theirs are.

M = 3  # sources (layers / checkpoints)


def dl_normalize_activations(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """dictionary_learning NormalizableMixin.normalize_activations (keep_relative_variance=True, the
    default), github.com/jkminder/dictionary_learning dictionary.py @ 48debb2."""
    has_activation_normalizer = not torch.isnan(sd["activation_mean"]).any() and not torch.isnan(sd["activation_std"]).any()
    if has_activation_normalizer:
        x = x.clone()
        x = x - sd["activation_mean"]
        return x * sd["activation_global_scale"]
    return x


def dl_encoder_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """CrossCoderEncoder.forward (same file; also saprmarks/dictionary_learning PR 28 @ b487641)."""
    w = sd["encoder.weight"]
    bias = sd["encoder.bias"]
    f = torch.einsum("bld, ldf -> blf", x, w)
    return F.relu(f.sum(dim=1) + bias)


def dl_code_normalization(sd: dict, code_normalization: str) -> torch.Tensor:
    """CrossCoder.get_code_normalization (SAE, CROSSCODER, NONE)."""
    dw = sd["decoder.weight"]
    if code_normalization == "SAE":
        return dw.norm(dim=(0, 2)).unsqueeze(0)
    if code_normalization == "NONE":
        return torch.tensor(1.0)
    return dw.norm(dim=2).sum(dim=0, keepdim=True)  # CROSSCODER


def dl_crosscoder_encode(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """CrossCoder.encode: normalize_activations, then the encoder. x [B, M, d]."""
    return dl_encoder_forward(sd, dl_normalize_activations(sd, x))


def dl_batch_topk_encode(sd: dict, x: torch.Tensor, code_normalization: str) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopKCrossCoder.encode(use_threshold=True, return_active=True): (f, f * code_normalization)."""
    x = dl_normalize_activations(sd, x)
    post_relu_f = dl_encoder_forward(sd, x)
    code_norm = dl_code_normalization(sd, code_normalization)
    post_relu_f_scaled = post_relu_f * code_norm
    f = post_relu_f * (post_relu_f_scaled > sd["threshold"])
    return f, f * code_norm


def dl_decode(sd: dict, f: torch.Tensor) -> torch.Tensor:
    """CrossCoderDecoder.forward + denormalize_activations: [B, M, d] in the raw space."""
    x = torch.einsum("bf, lfd -> bld", f, sd["decoder.weight"]) + sd["decoder.bias"]
    if not torch.isnan(sd["activation_mean"]).any():
        x = x / (sd["activation_global_scale"] + 1e-8)
        x = x + sd["activation_mean"]
    return x


CODE_NORM_IDS = {"CROSSCODER": 1, "SAE": 2, "NONE": 4}


def dl_state_dict(seed=0, normalizer=True, batch_topk=False, code_normalization="CROSSCODER", k=K,
                  threshold=0.0) -> dict:
    """Keys, shapes and buffers as CrossCoder / BatchTopKCrossCoder.state_dict() writes them."""
    g = torch.Generator().manual_seed(seed)
    mean = 0.5 * torch.randn(M, D, generator=g) if normalizer else torch.full((M, D), float("nan"))
    std = (1 + torch.rand(M, D, generator=g)) if normalizer else torch.full((M, D), float("nan"))
    sd = {"target_rms": torch.tensor(1.0), "activation_mean": mean, "activation_std": std,
          "activation_global_scale": (1.0 / torch.sqrt((std ** 2).sum() + 1e-8)) if normalizer else torch.tensor(1.0),
          "encoder.weight": torch.randn(M, D, L, generator=g) / D ** 0.5,
          "encoder.bias": 0.05 * torch.randn(L, generator=g),
          "decoder.weight": torch.randn(M, L, D, generator=g) * torch.rand(M, L, 1, generator=g),
          "decoder.bias": 0.1 * torch.randn(M, D, generator=g),
          "code_normalization_id": torch.tensor(CODE_NORM_IDS[code_normalization])}
    if normalizer:  # a global scale of 1/sqrt(total var) shrinks the input a lot: scale up the encoder to match
        sd["encoder.weight"] = sd["encoder.weight"] * 20
    if batch_topk:
        sd["k"] = torch.tensor(k, dtype=torch.int)
        sd["threshold"] = torch.tensor(threshold, dtype=torch.float32)
    return sd


def _xm(seed=1, n=N) -> torch.Tensor:
    return _x(seed, n, M * D).reshape(n, M, D)


def assert_topk_of_dense(sae: SAE, x: torch.Tensor, ref_dense: torch.Tensor) -> None:
    """Our (ids, values) are the top-k of the library's dense encode: the same positive entries
    (zeros dropped), the same values."""
    values, ids = sae.encode(x)
    assert torch.all(values[:, :-1] >= values[:, 1:]), "values must be descending"
    ref_v, ref_i = ref_dense.topk(sae.k, dim=-1)
    for row in range(x.shape[0]):
        got = sorted(ids[row][values[row] > 0].tolist())
        want = sorted(ref_i[row][ref_v[row] > 0].tolist())
        assert got == want, f"row {row}: ids {got} != top-k of the reference {want}"
    torch.testing.assert_close(values, ref_v.clamp_min(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("normalizer", [True, False])
def test_dictionary_learning_crosscoder_matches_its_encode(tmp_path, normalizer):
    sd = dl_state_dict(normalizer=normalizer)
    torch.save(sd, tmp_path / "model_final.pt")
    sae = load_sae(tmp_path / "model_final.pt")
    assert (sae.format, sae.kind, sae.d_in, sae.n_latents, sae.n_blocks) == ("dictionary_learning", "crosscoder", M * D, L, M)
    assert sae.inputs == ["input0", "input1", "input2"] and sae.k == 32 and sae.meta["k_from"] == "default"
    x = _xm()
    dense = dl_crosscoder_encode(sd, x)
    assert ((dense > 0).sum(-1) > K).all(), "a ReLU dictionary: more active latents than k, so top-k matters"
    sae.k = K  # sae.k from the run config
    assert_topk_of_dense(sae, x.flatten(1), dense)
    # decode of the top-k: the library's decoder on the same sparse code, denormalized
    values, ids = sae.encode(x.flatten(1))
    f = torch.zeros(N, L).scatter_(1, ids.long(), values)
    torch.testing.assert_close(sae.decode(values, ids), dl_decode(sd, f).flatten(1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("code_normalization", ["CROSSCODER", "SAE", "NONE"])
def test_dictionary_learning_batch_topk_crosscoder_matches_its_encode(tmp_path, code_normalization):
    """BatchTopK at inference keeps f where f * code_norm > threshold; we keep the k largest of those
    scaled activations (its get_activations), selection and values, and zero the ones at or below
    the threshold: the top-k of its dense f * code_norm."""
    sd = dl_state_dict(batch_topk=True, code_normalization=code_normalization)
    x = _xm()
    _, scaled = dl_batch_topk_encode(sd, x, code_normalization)
    # a threshold that leaves some rows with fewer than k active latents and others with more
    sd["threshold"] = scaled[scaled > 0].quantile(1 - 1.5 * K / L)
    f, scaled = dl_batch_topk_encode(sd, x, code_normalization)
    n_active = (f > 0).sum(-1)
    assert (n_active < K).any() and (n_active > K).any(), n_active
    (tmp_path / "cc").mkdir()
    torch.save(sd, tmp_path / "cc" / "model_final.pt")
    (tmp_path / "cc" / "config.json").write_text(json.dumps(
        {"trainer": {"dict_class": "BatchTopKCrossCoder", "k": K, "activation_dim": D, "dict_size": L},
         "inputs": ["base/layers.2", "layers.2", "chat/layers.2"]}))
    sae = load_sae(tmp_path / "cc")
    assert (sae.k, sae.inputs, sae.threshold) == (K, ["base/layers.2", "layers.2", "chat/layers.2"], float(sd["threshold"]))
    assert_topk_of_dense(sae, x.flatten(1), scaled)
    values, ids = sae.encode(x.flatten(1))
    # where at most k pass the threshold, the top-k is the library's whole code
    few = n_active <= K
    got = torch.zeros(N, L).scatter_(1, ids.long(), values)
    torch.testing.assert_close(got[few], scaled[few], rtol=1e-4, atol=1e-5)
    # decode: the library decodes f (unscaled); ours decodes the scaled values with W_dec / code_norm
    f_top = torch.zeros(N, L).scatter_(1, ids.long(), values) / dl_code_normalization(sd, code_normalization)
    torch.testing.assert_close(sae.decode(values, ids), dl_decode(sd, f_top).flatten(1), rtol=1e-4, atol=1e-4)


def test_dictionary_learning_hub_layout_and_info(tmp_path):
    """PyTorchModelHubMixin's folder (config.json + model.safetensors); sae_info reads no weight."""
    from safetensors.torch import save_file

    sd = dl_state_dict(batch_topk=True)
    save_file({n: t.contiguous() for n, t in sd.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"activation_dim": D, "dict_size": L, "num_layers": M, "k": K}))
    info = sae_info(tmp_path)
    assert (info.format, info.kind, info.d_in, info.n_latents, info.k, info.inputs) == (
        "dictionary_learning", "crosscoder", M * D, L, K, ["input0", "input1", "input2"])
    sae = load_sae(tmp_path, with_decoder=False)
    assert sae.W_dec is None and sae.sha256 == info.sha256
    x = _xm()
    assert_topk_of_dense(sae, x.flatten(1), dl_batch_topk_encode(sd, x, "CROSSCODER")[1])


def test_dictionary_learning_bf16_and_bad_inputs(tmp_path):
    sd = dl_state_dict(batch_topk=True)
    torch.save(sd, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt", dtype="bfloat16")
    assert sae.W_enc.dtype == torch.bfloat16 and sae.W_enc.shape == (L, M * D) and sae.b_enc.dtype == torch.float32
    (tmp_path / "config.json").write_text(json.dumps({"inputs": ["layers.1"]}))
    with pytest.raises(SAEFormatError, match="must list 3 source names"):
        load_sae(tmp_path / "ae.pt")


# crosscoder-model-diff replication, github.com/ckkissane/crosscoder-model-diff-replication @ e221e8d


def mdiff_encode(sd: dict, x: torch.Tensor, apply_relu=True) -> torch.Tensor:
    """crosscoder.py CrossCoder.encode, on x already scaled per model as buffer.py does
    (x[:, m] * normalisation_factor[m])."""
    x_enc = torch.einsum("bmd,mdh->bh", x, sd["W_enc"])  # "batch n_models d_model, n_models d_model d_hidden -> batch d_hidden"
    if apply_relu:
        acts = F.relu(x_enc + sd["b_enc"])
    else:
        acts = x_enc + sd["b_enc"]
    return acts


def mdiff_decode(sd: dict, acts: torch.Tensor) -> torch.Tensor:
    """crosscoder.py CrossCoder.decode."""
    acts_dec = torch.einsum("bh,hmd->bmd", acts, sd["W_dec"])
    return acts_dec + sd["b_dec"]


def write_mdiff(folder: Path, factors=(0.4, 2.5), hf_layout=True, seed=0, **cfg_extra) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    sd = {"W_enc": torch.randn(2, D, L, generator=g) / D ** 0.5, "W_dec": torch.randn(L, 2, D, generator=g) * 0.1,
          "b_enc": 0.05 * torch.randn(L, generator=g), "b_dec": 0.1 * torch.randn(2, D, generator=g)}
    cfg = {"seed": 49, "d_in": D, "dict_size": L, "enc_dtype": "fp32", "model_name": "gemma-2-2b", "site": "resid_pre",
           "device": "cpu", "dec_init_norm": 0.08, "hook_point": "blocks.14.hook_resid_pre", "l1_coeff": 2, **cfg_extra}
    if factors is not None:
        cfg["norm_scaling_factors"] = list(factors)
    folder.mkdir(parents=True, exist_ok=True)
    if hf_layout:
        torch.save(sd, folder / "cc_weights.pt")
        (folder / "cfg.json").write_text(json.dumps(cfg))
    else:
        torch.save(sd, folder / "0.pt")
        (folder / "0_cfg.json").write_text(json.dumps(cfg))
    return sd, cfg


@pytest.mark.parametrize("hf_layout", [True, False])
def test_crosscoder_model_diff_matches_its_encode(tmp_path, hf_layout):
    sd, _ = write_mdiff(tmp_path / "blocks.14.hook_resid_pre", hf_layout=hf_layout, k=K)
    path = tmp_path / "blocks.14.hook_resid_pre"
    sae = load_sae(path if hf_layout else path / "0.pt")
    assert (sae.format, sae.kind, sae.d_in, sae.k, sae.hookpoint) == ("crosscoder_model_diff", "crosscoder", 2 * D, K, "layers.13")
    assert sae.inputs == ["model0/layers.13", "model1/layers.13"]
    x = _x(n=N, d=2 * D).reshape(N, 2, D)
    factors = torch.tensor([0.4, 2.5])
    x_scaled = x * factors[None, :, None]  # what its buffer feeds the crosscoder
    dense = mdiff_encode(sd, x_scaled)
    assert ((dense > 0).sum(-1) > K).all()
    assert_topk_of_dense(sae, x.flatten(1), dense)
    # decode into the raw (unscaled) space: its decode of the same code, divided by the factors
    values, ids = sae.encode(x.flatten(1))
    acts = torch.zeros(N, L).scatter_(1, ids.long(), values)
    want = mdiff_decode(sd, acts) / factors[None, :, None]
    torch.testing.assert_close(sae.decode(values, ids), want.flatten(1), rtol=1e-4, atol=1e-5)


def test_crosscoder_model_diff_needs_its_scaling_factors(tmp_path):
    write_mdiff(tmp_path / "cc", factors=None)
    with pytest.raises(SAEFormatError, match="norm_scaling_factors"):
        sae_info(tmp_path / "cc")
    write_mdiff(tmp_path / "named", inputs=["base/layers.13", "layers.13"])
    info = sae_info(tmp_path / "named")
    assert (info.inputs, info.k, info.meta["k_from"]) == (["base/layers.13", "layers.13"], 32, "default")


def test_own_format_round_trips_kind_inputs_and_threshold(tmp_path):
    sd = dl_state_dict(batch_topk=True)
    torch.save(sd, tmp_path / "ae.pt")
    sae = load_sae(tmp_path / "ae.pt")
    sae.save(tmp_path / "own")
    own = load_sae(tmp_path / "own")
    info = sae_info(tmp_path / "own")
    assert (own.kind, own.inputs, own.threshold, own.n_blocks) == ("crosscoder", sae.inputs, sae.threshold, M)
    assert (info.kind, info.inputs) == ("crosscoder", sae.inputs)
    x = _x(n=N, d=M * D)
    for a, b in zip(sae.encode(x), own.encode(x)):
        assert torch.equal(a, b)

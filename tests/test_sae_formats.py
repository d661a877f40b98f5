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
from pipeline.sae.formats import SAEFormatError, load_sae, transformer_lens_hookpoint
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
    sd = write_sparsify(tmp_path / "sae-tiny" / "layers.3", transcode=transcode)
    write_sparsify(tmp_path / "sae-tiny" / "layers.5", seed=1)
    sae = load_sae(tmp_path / "sae-tiny", hookpoint="layers.3")
    assert (sae.format, sae.hookpoint, sae.k, sae.activation) == ("sparsify", "layers.3", K, "relu_topk")
    x = _x()
    assert_same_latents(sae, x, sparsify_encode(sd, x, K, transcode))
    # the subfolder form loads the same SAE
    assert load_sae(tmp_path / "sae-tiny" / "layers.3").sha256 == sae.sha256


def test_sparsify_matches_library(tmp_path):
    sparsify = require_module("sparsify", "eai-sparsify", "pip install -e '.[test]'")
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=L, k=K))
    with torch.no_grad():
        coder.encoder.bias.normal_(0, 0.1)
        coder.b_dec.normal_(0, 0.5)
    coder.save_to_disk(tmp_path / "layers.2")
    sae = load_sae(tmp_path, hookpoint="layers.2")
    x = _x()
    out = coder.encode(x)
    ref = torch.zeros(N, L).scatter_(1, out.top_indices, out.top_acts.detach())
    assert_same_latents(sae, x, ref)
    values, ids = sae.encode(x)
    # SparseCoder.decode with sparsify's CPU decoder (its Triton one needs a GPU)
    from sparsify.utils import eager_decode

    want = eager_decode(out.top_indices, out.top_acts, coder.W_dec.mT) + coder.b_dec
    torch.testing.assert_close(sae.decode(values, ids), want.detach(), rtol=1e-4, atol=1e-4)


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

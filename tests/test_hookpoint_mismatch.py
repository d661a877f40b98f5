"""A dictionary applied at another hookpoint than the one its own metadata names stops the run
before any work (issue 27); `sae.allow_hookpoint_mismatch=true` is the only way past, and the
manifest records it. `{hookpoint}` paths find the folder sparsify writes for a transcoder (named
after its module: `layers.N.mlp` for `layers.N.mlp_in`).

Dictionaries are written by their own libraries where those are installed: sparsify's
`SparseCoder.save_to_disk` (eai-sparsify, in the test extra) and SAELens's `save_model` (sae-lens,
REFERENCE_LIBS), and our `SAE.save`. OpenAI's sparse_autoencoder and the two crosscoder libraries
are not on PyPI: their files are laid out as theirs are (as in tests/test_sae_formats.py). Every
format's test fails if the mismatch goes back to a warning. The model is a tiny random GPT-NeoX
built from its config, with a tokenizer trained on the spot.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TEXTS, build_tokenizer, require_module
from test_sae_formats import assert_same_latents

from pipeline.config import ClusterConfig, CorpusConfig, ModelConfig, RunConfig, SAEConfig, SinkConfig
from pipeline.runtime.preflight import ConfigMismatch, SAELoadError, prepare
from pipeline.sae.formats import load_sae, resolve_sae_path, sae_info
from pipeline.sae.sae import random_sae

D, L, K = 32, 64, 4
ALLOW = "sae.allow_hookpoint_mismatch=true"


@pytest.fixture(scope="module")
def neox_dir(tmp_path_factory) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    folder = tmp_path_factory.mktemp("tiny-neox")
    tok = build_tokenizer(folder, TEXTS)
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tok), hidden_size=D, num_hidden_layers=3, num_attention_heads=4,
                                     intermediate_size=2 * D, max_position_embeddings=64)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def sparsify_run(tmp_path_factory) -> tuple[Path, dict]:
    """A folder as sparsify's trainer leaves it, each coder saved by `SparseCoder.save_to_disk` into
    a folder named after its module: a transcoder on the MLP module of block 1, an SAE on block 2's
    output and one on block 2's MLP output."""
    sparsify = require_module("sparsify", "eai-sparsify", "pip install -e '.[test]'")
    folder = tmp_path_factory.mktemp("sparsify-run")
    torch.manual_seed(0)
    coders = {"layers.1.mlp": sparsify.SparseCoder(D, sparsify.TranscoderConfig(num_latents=L, k=K)),
              "layers.2": sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=L, k=K)),
              "layers.2.mlp": sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=L, k=K))}
    for module, coder in coders.items():
        with torch.no_grad():
            coder.encoder.bias.normal_(0, 0.1)
            coder.b_dec.normal_(0, 0.5)
        coder.save_to_disk(folder / module)
    assert json.loads((folder / "layers.1.mlp" / "cfg.json").read_text())["transcode"] is True
    return folder, coders


def without_mismatch_warning(fn):
    """fn() with no hookpoint-mismatch warning emitted (other libraries' warnings are not ours)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in seen if "trained on hookpoint" in str(w.message)], [str(w.message) for w in seen]
    return out


def run_cfg(neox_dir, corpus, out, path, hookpoints, **sae) -> RunConfig:
    return RunConfig(
        run_id="hp",
        model=ModelConfig(name="tiny-neox", path=str(neox_dir), gguf_file=None, dtype="float32", batch_size=4),
        sae=SAEConfig(name="x", path=str(path), hookpoints=list(hookpoints), **sae),
        corpus=CorpusConfig(name="tiny", paths=[str(corpus)], ctx_len=16, shard_size=4),
        sink=SinkConfig(root=str(out)),
        cluster=ClusterConfig(num_workers=1, cpus_per_worker=1, torch_threads=1, max_in_flight=1),
    )


# ---------------------------------------------------------------------------------------------
# The case: sparsify's own transcoder, applied at the MLP's output instead of its input


@pytest.mark.parametrize("form", ["folder", "template"])
def test_sparsify_transcoder_at_the_mlp_output_stops_the_run(neox_dir, tiny_corpus, sparsify_run, tmp_path, form):
    """sae.path=<dir> or <dir>/{hookpoint}, sae.hookpoints=[layers.1.mlp]: the folder sparsify wrote
    for the transcoder is found, and the run stops before anything is written, naming both
    hookpoints and the setting to change. It used to run to the end with a UserWarning."""
    from pipeline.runtime.driver import run

    folder, _ = sparsify_run
    path = folder if form == "folder" else f"{folder}/{{hookpoint}}"
    cfg = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", path, ["layers.1.mlp"])
    with pytest.raises(ConfigMismatch) as err:  # a warning instead of the stop fails here
        run(cfg)
    msg = str(err.value)
    assert msg.startswith("sae.hookpoints=[layers.1.mlp]: transcoder ")
    assert "trained on hookpoint 'layers.1.mlp_in'" in msg and "applied at 'layers.1.mlp' of model tiny-neox" in msg
    assert "sparsify transcoder of module layers.1.mlp" in msg and "reconstructs layers.1.mlp_out" in msg
    assert "write layers.1.mlp_in instead of layers.1.mlp in sae.hookpoints" in msg and ALLOW in msg
    assert not (tmp_path / "out").exists(), "work was done before the check"


def test_allowed_mismatch_runs_with_a_warning_and_the_manifest_records_it(neox_dir, tiny_corpus, sparsify_run, tmp_path):
    folder, _ = sparsify_run
    cfg = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", folder, ["layers.1.mlp"], allow_hookpoint_mismatch=True)
    with pytest.warns(UserWarning, match=r"trained on hookpoint 'layers\.1\.mlp_in' .*but is applied at 'layers\.1\.mlp'.*"
                                         r"running it there anyway \(sae\.allow_hookpoint_mismatch=true"):
        prep = prepare(cfg)
    entry = prep.manifest["saes"]["layers.1.mlp"]
    assert entry["hookpoint_mismatch"] == {"trained": "layers.1.mlp_in", "applied": "layers.1.mlp", "allowed_by": ALLOW}
    assert (entry["kind"], entry["hookpoint_trained"]) == ("transcoder", "layers.1.mlp_in")
    assert prep.manifest["config"]["sae"]["allow_hookpoint_mismatch"] is True
    # No mismatch, no record: the manifest's "saes" (an identity key) of matching runs is unchanged.
    ok = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", f"{folder}/{{hookpoint}}", ["layers.1.mlp_in"],
                 allow_hookpoint_mismatch=True)
    assert "hookpoint_mismatch" not in without_mismatch_warning(lambda: prepare(ok)).manifest["saes"]["layers.1.mlp_in"]


def test_the_override_is_a_setting():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import pipeline.__main__  # noqa: F401  (registers the run_schema structured config)

    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        default = OmegaConf.to_object(compose(config_name="config"))
        allowed = OmegaConf.to_object(compose(config_name="config", overrides=[ALLOW]))
    assert (default.sae.allow_hookpoint_mismatch, allowed.sae.allow_hookpoint_mismatch) == (False, True)


# ---------------------------------------------------------------------------------------------
# `{hookpoint}` finds sparsify's transcoder folder


def test_hookpoint_template_finds_the_sparsify_transcoder_folder(neox_dir, tiny_corpus, sparsify_run, tmp_path):
    """sae.path='<dir>/{hookpoint}', sae.hookpoints=[layers.1.mlp_in] (the sparsify preset's form):
    <dir>/layers.1.mlp_in does not exist, the folder sparsify wrote, layers.1.mlp, is used; the
    workers load that path (as dispatch.HarvestActor does) and encode as sparsify's own coder."""
    folder, coders = sparsify_run
    cfg = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", f"{folder}/{{hookpoint}}", ["layers.1.mlp_in", "layers.2"])
    prep = prepare(cfg)
    assert prep.sae_by_hook == {"layers.1.mlp_in": f"{folder}/layers.1.mlp", "layers.2": f"{folder}/layers.2"}
    entry = prep.manifest["saes"]["layers.1.mlp_in"]
    assert (entry["path"], entry["kind"], entry["output"], entry["hookpoint_trained"]) == (
        f"{folder}/layers.1.mlp", "transcoder", "layers.1.mlp_out", "layers.1.mlp_in")
    assert prep.manifest["dictionaries"]["layers.1.mlp_in"] == {"kind": "transcoder", "inputs": ["layers.1.mlp_in"],
                                                                "output": "layers.1.mlp_out"}
    sae = load_sae(prep.sae_by_hook["layers.1.mlp_in"], hookpoint="layers.1.mlp_in", with_decoder=False)
    x = 2.0 * torch.randn(40, D, generator=torch.Generator().manual_seed(3))
    out = coders["layers.1.mlp"].encode(x)
    assert_same_latents(sae, x, torch.zeros(40, L).scatter_(1, out.top_indices, out.top_acts.detach()))


def test_hookpoint_template_resolves_on_a_remote_prefix(sparsify_run, tmp_path):
    import fsspec

    folder, _ = sparsify_run
    mem = fsspec.filesystem("memory")
    base = f"memory://bucket-{tmp_path.name}/sparsify-run"
    for f in (folder / "layers.1.mlp").iterdir():
        mem.pipe(f"{base}/layers.1.mlp/{f.name}", f.read_bytes())
    path = resolve_sae_path(f"{base}/{{hookpoint}}", "layers.1.mlp_in")
    assert path == f"{base}/layers.1.mlp"
    info = sae_info(path, hookpoint="layers.1.mlp_in", cache_dir=tmp_path / "cache")
    assert (info.kind, info.hookpoint, info.output, info.source) == ("transcoder", "layers.1.mlp_in", "layers.1.mlp_out", path)


@pytest.mark.parametrize("hookpoint,note", [
    ("layers.1.mlp_out", "layers.1.mlp is a sparsify transcoder that reads layers.1.mlp_in and reconstructs "
                         "layers.1.mlp_out; its latents are listed under the hookpoint it reads: write layers.1.mlp_in "
                         "in sae.hookpoints"),
    ("layers.2.mlp_in", "layers.2.mlp is a sparsify SAE trained on layers.2.mlp: write layers.2.mlp in sae.hookpoints"),
])
def test_hookpoint_template_error_names_the_folder_found(neox_dir, tiny_corpus, sparsify_run, tmp_path, hookpoint, note):
    folder, _ = sparsify_run
    cfg = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", f"{folder}/{{hookpoint}}", [hookpoint])
    with pytest.raises(SAELoadError) as err:
        prepare(cfg)
    msg = str(err.value)
    assert msg.startswith(f"sae.path='{folder}/{{hookpoint}}', sae.hookpoints entry {hookpoint}: ")
    assert f"{folder}/{hookpoint} does not exist. {folder} holds layers.1.mlp, layers.2, layers.2.mlp" in msg
    assert note in msg


# ---------------------------------------------------------------------------------------------
# One dictionary per format, trained on layers.1 (as its metadata says), applied at layers.2


def write_own(folder: Path) -> tuple[Path, str]:
    random_sae(D, L, K, hookpoint="layers.1").save(folder / "own")
    return folder / "own", "cfg.json hookpoint"


def write_sparsify(folder: Path) -> tuple[Path, str]:
    sparsify = require_module("sparsify", "eai-sparsify", "pip install -e '.[test]'")
    sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=L, k=K)).save_to_disk(folder / "layers.1")
    return folder / "layers.1", "its folder name 'layers.1': sparsify names each folder after the module"


def write_saelens(folder: Path) -> tuple[Path, str]:
    sae_lens = require_module("sae_lens", "sae-lens", "make setup installs it (REFERENCE_LIBS)")
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    meta = SAEMetadata(hook_name="blocks.1.hook_resid_post", model_name="tiny-neox")
    TopKSAE(TopKSAEConfig(d_in=D, d_sae=L, k=K, metadata=meta)).save_model(folder / "saelens")
    assert sae_lens.__version__ and (folder / "saelens" / "sae_weights.safetensors").exists()
    return folder / "saelens", "cfg.json hook_name 'blocks.1.hook_resid_post'"


def write_openai(folder: Path) -> tuple[Path, str]:
    """upstream's Autoencoder.state_dict() at its paths.py location: resid_post_mlp, layer 1."""
    g = torch.Generator().manual_seed(0)
    sd = {"pre_bias": torch.zeros(D), "encoder.weight": torch.randn(L, D, generator=g), "latent_bias": torch.zeros(L),
          "decoder.weight": torch.randn(D, L, generator=g), "activation": "TopK",
          "activation_state_dict": {"k": K, "postact_fn": "ReLU"}}
    path = folder / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt"
    path.parent.mkdir(parents=True)
    torch.save(sd, path)
    return path, "its path, <location>/autoencoders/<layer>.pt as OpenAI's paths.py lays it out"


@pytest.mark.parametrize("write", [write_own, write_sparsify, write_saelens, write_openai], ids=lambda w: w.__name__[6:])
def test_each_format_applied_at_another_hookpoint_stops_the_run(neox_dir, tiny_corpus, tmp_path, write):
    path, source = write(tmp_path / "saes")
    assert sae_info(path).hookpoint == "layers.1"
    cfg = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", path, ["layers.2"])
    with pytest.raises(ConfigMismatch) as err:
        prepare(cfg)
    msg = str(err.value)
    assert f"SAE {path} was trained on hookpoint 'layers.1' ({source}" in msg
    assert "applied at 'layers.2' of model tiny-neox" in msg and "write layers.1 instead of layers.2" in msg and ALLOW in msg
    allowed = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", path, ["layers.2"], allow_hookpoint_mismatch=True)
    with pytest.warns(UserWarning, match="trained on hookpoint 'layers.1'"):
        entry = prepare(allowed).manifest["saes"]["layers.2"]
    assert entry["hookpoint_mismatch"] == {"trained": "layers.1", "applied": "layers.2", "allowed_by": ALLOW}
    # where it was trained, it runs
    without_mismatch_warning(lambda: prepare(run_cfg(neox_dir, tiny_corpus, tmp_path / "out", path, ["layers.1"])))


def test_saelens_on_a_hugging_face_module_and_an_unmapped_hook(neox_dir, tiny_corpus, tmp_path):
    """SAELens on a Hugging Face model names the module (`gpt_neox.layers.1`): that is layers.1. A
    TransformerLens hook with no hookpoint here (`hook_resid_mid`) matches none: stopped, saying so."""
    require_module("sae_lens", "sae-lens", "make setup installs it (REFERENCE_LIBS)")
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    for name, hook in (("hf", "gpt_neox.layers.1"), ("mid", "blocks.1.hook_resid_mid")):
        TopKSAE(TopKSAEConfig(d_in=D, d_sae=L, k=K, metadata=SAEMetadata(hook_name=hook))).save_model(tmp_path / name)
    without_mismatch_warning(lambda: prepare(run_cfg(neox_dir, tiny_corpus, tmp_path / "out", tmp_path / "hf", ["layers.1"])))
    with pytest.raises(ConfigMismatch, match=r"'blocks\.1\.hook_resid_mid' has no hookpoint here \(embed, layers\.N, "):
        prepare(run_cfg(neox_dir, tiny_corpus, tmp_path / "out", tmp_path / "mid", ["layers.1"]))


def write_dictionary_learning(folder: Path) -> Path:
    """A CrossCoder's state_dict (model_final.pt) with the trainer's config.json: trained at layer 1;
    the `inputs` a user wrote there read layers.1 and layers.2."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    torch.save({"encoder.weight": torch.randn(2, D, L, generator=g), "encoder.bias": torch.zeros(L),
                "decoder.weight": torch.randn(2, L, D, generator=g), "decoder.bias": torch.zeros(2, D)},
               folder / "model_final.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": {"layer": 1, "lm_name": "tiny-neox", "k": K},
                                                    "inputs": ["layers.1", "layers.2"]}))
    return folder


def write_model_diff(folder: Path) -> Path:
    """The model-diff replication's Hugging Face layout: cfg.json hook_point blocks.1.hook_resid_post."""
    g = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True)
    torch.save({"W_enc": torch.randn(2, D, L, generator=g), "W_dec": torch.randn(L, 2, D, generator=g),
                "b_enc": torch.zeros(L), "b_dec": torch.zeros(2, D)}, folder / "cc_weights.pt")
    (folder / "cfg.json").write_text(json.dumps({"hook_point": "blocks.1.hook_resid_post", "k": K,
                                                 "norm_scaling_factors": [1.0, 1.0], "inputs": ["layers.1", "layers.2"]}))
    return folder


@pytest.mark.parametrize("write,trained", [(write_dictionary_learning, "layer 1 (config.json layer=1)"),
                                           (write_model_diff, "layers.1 (cfg.json hook_point 'blocks.1.hook_resid_post')")],
                         ids=["dictionary_learning", "crosscoder_model_diff"])
def test_crosscoder_inputs_against_its_trained_hookpoint(neox_dir, tiny_corpus, tmp_path, write, trained):
    path = write(tmp_path / "xc")
    cfg = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", "", [], crosscoders={"xc": str(path)})
    with pytest.raises(ConfigMismatch) as err:
        prepare(cfg)
    msg = str(err.value)
    assert msg.startswith(f"sae.crosscoders.xc='{path}': crosscoder xc ({path}) was trained on {trained} but its "
                          f"inputs layers.2 (its config's 'inputs') read another hookpoint")
    assert ALLOW in msg
    allowed = run_cfg(neox_dir, tiny_corpus, tmp_path / "out", "", [], crosscoders={"xc": str(path)},
                      allow_hookpoint_mismatch=True)
    with pytest.warns(UserWarning, match="running it anyway"):
        entry = prepare(allowed).manifest["saes"]["crosscoder=xc"]
    assert entry["hookpoint_mismatch"] == {"trained": trained.split(" (")[0], "applied": ["layers.2"], "allowed_by": ALLOW}


# ---------------------------------------------------------------------------------------------
# With the right settings, through the real pipeline


@pytest.mark.slow
def test_sparsify_transcoder_by_hookpoint_template_end_to_end(neox_dir, tiny_corpus, sparsify_run, tmp_path, ray_local):
    """sae.path='<dir>/{hookpoint}', sae.hookpoints=[layers.1.mlp_in] on GPT-NeoX: the latents
    written are sparsify's own encode of the MLP module's input, captured by hand."""
    from transformers import AutoModelForCausalLM

    from pipeline.runtime.driver import run

    folder, coders = sparsify_run
    run(run_cfg(neox_dir, tiny_corpus, tmp_path / "out", f"{folder}/{{hookpoint}}", ["layers.1.mlp_in"]))
    root = tmp_path / "out" / "hp"
    model = AutoModelForCausalLM.from_pretrained(str(neox_dir), dtype=torch.float32).eval()
    seen = []
    model.gpt_neox.layers[1].mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].detach().clone()))
    ctx = pq.read_table(root / "contexts").to_pandas().sort_values("seq_id")
    with torch.inference_mode():
        for t in ctx.token_ids:
            model(torch.tensor([list(t)]))
    x = torch.cat(seen)
    lat = pq.read_table(root / "latents" / "hookpoint=layers.1.mlp_in").to_pandas().sort_values(["seq_id", "pos"])
    got_ids, got_acts = np.stack(lat.latent_ids.to_numpy()), np.stack(lat.acts.to_numpy()).astype(np.float64)
    assert len(lat) == len(x)
    coder = coders["layers.1.mlp"]
    with torch.inference_mode():
        ref = coder.encode(x)
        # Exact ids wherever the k-th and (k+1)-th pre-activations are apart (fp32 either side).
        pre = torch.relu(x.double() @ coder.encoder.weight.double().T + coder.encoder.bias.double()).topk(K + 1).values
    ref_ids, order = ref.top_indices.sort(dim=-1)
    ref_acts = ref.top_acts.gather(1, order)
    clear = (pre[:, K - 1] - pre[:, K]).numpy() > 1e-4
    assert clear.mean() > 0.9
    mine = np.sort(got_ids, axis=1)
    assert np.array_equal(mine[clear], ref_ids.numpy()[clear])
    by_id = np.take_along_axis(got_acts, np.argsort(got_ids, axis=1), axis=1)
    np.testing.assert_allclose(by_id[clear], ref_acts.numpy()[clear], rtol=2e-3, atol=2e-3)

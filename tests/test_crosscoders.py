"""Transcoders and crosscoders through the real pipeline (issue 17): local Ray, real files,
tiny random Llamas (two checkpoints of one config, different seeds), our own SAE format.

One run extracts, side by side:
    layers.1                a transcoder reading layers.1, reconstructing layers.2
    layers.2                a plain SAE
    crosscoder=ckpt         a crosscoder over layers.1 of checkpoints a and b
    crosscoder=layers       a crosscoder over layers.1 and layers.2 of the main model
and everything is checked against dense references built from `output_hidden_states`.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import build_tiny_llama
from test_browser_site import browser, page  # noqa: F401 (Chromium fixtures)
from test_faults import assert_exactly_once, data_checksums, run_failing_shard_2_after_its_parts
from test_pipeline_e2e import make_cfg

from pipeline.config import FaultConfig, SinkConfig
from pipeline.sae.sae import SAE, random_sae

pytestmark = pytest.mark.slow

D, L, K, FVU_SAMPLE = 32, 96, 8, 8
CROSSCODERS = {"ckpt": ["a/layers.1", "b/layers.1"], "layers": ["layers.1", "layers.2"]}
DICTS = ["layers.1", "layers.2", "crosscoder=ckpt", "crosscoder=layers"]


def random_dictionary(d_in: int, seed: int, **kw) -> SAE:
    g = torch.Generator().manual_seed(seed)
    return SAE(W_enc=torch.randn(L, d_in, generator=g) / d_in ** 0.5, b_enc=0.1 * torch.randn(L, generator=g),
               W_dec=torch.randn(L, d_in, generator=g) / d_in ** 0.5, b_dec=0.1 * torch.randn(d_in, generator=g),
               k=K, **kw)


@pytest.fixture(scope="module")
def ckpt_b_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A second checkpoint: the same config and tokenizer, another seed."""
    folder = tmp_path_factory.mktemp("ckpt-b")
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, folder / f.name)
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_llama(folder, vocab, seed=1)
    return folder


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicts")
    random_dictionary(D, 1, hookpoint="layers.1", kind="transcoder", output="layers.2").save(folder / "layers.1")
    random_sae(D, L, K, seed=2, hookpoint="layers.2").save(folder / "layers.2")
    for seed, (name, inputs) in enumerate(CROSSCODERS.items(), start=3):
        # Per-block normalization: each input rescaled on its own (SAELens constant_norm_rescale).
        random_dictionary(D * len(inputs), seed, kind="crosscoder", inputs=inputs,
                          input_norm="constant_norm_rescale").save(folder / f"xc-{name}")
    return folder


def xc_cfg(tiny_model_dir, tiny_corpus, dict_dir, ckpt_b_dir, out, run_id="xc", **sae):
    cfg = make_cfg(tiny_model_dir, tiny_corpus, dict_dir, out, run_id, shard_size=2)
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, checkpoints={"a": str(tiny_model_dir), "b": str(ckpt_b_dir)}),
        sae=dataclasses.replace(cfg.sae, crosscoders={n: str(dict_dir / f"xc-{n}") for n in CROSSCODERS},
                                fvu_sample=FVU_SAMPLE, **sae),
    )


@pytest.fixture(scope="module")
def xc_run(tiny_model_dir, tiny_corpus, dict_dir, ckpt_b_dir, tmp_path_factory, ray_local):
    from pipeline.runtime.driver import run

    out = tmp_path_factory.mktemp("xc-out")
    cfg = xc_cfg(tiny_model_dir, tiny_corpus, dict_dir, ckpt_b_dir, out)
    summary = run(cfg)
    assert summary.shards_done >= 6
    return cfg, summary, out / cfg.run_id


def hidden_states(model, token_ids) -> list[torch.Tensor]:
    """`output_hidden_states` of one context: index N+1 is layers.N (float64)."""
    with torch.inference_mode():
        return [h[0].double() for h in model(torch.tensor([list(token_ids)]), output_hidden_states=True).hidden_states]


def source_acts(run_root: Path, folders: dict[str | None, Path]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Every committed token's (seq_id, pos) in order, and each (checkpoint, layer)'s hidden state rows."""
    ctx = pq.read_table(run_root / "contexts").to_pandas().sort_values("seq_id")
    seq = np.concatenate([np.full(len(t), s) for s, t in zip(ctx.seq_id, ctx.token_ids)])
    pos = np.concatenate([np.arange(len(t)) for t in ctx.token_ids])
    acts: dict = {}
    from transformers import AutoModelForCausalLM

    for ckpt, folder in folders.items():
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        per_ctx = [hidden_states(model, t) for t in ctx.token_ids]
        for layer in (1, 2):
            acts[(ckpt, f"layers.{layer}")] = torch.cat([h[layer + 1] for h in per_ctx])
    return seq, pos, acts


@pytest.fixture(scope="module")
def reference(xc_run, tiny_model_dir, ckpt_b_dir):
    _, _, root = xc_run
    return source_acts(root, {None: tiny_model_dir, "a": tiny_model_dir, "b": ckpt_b_dir})


def concat_inputs(acts: dict, inputs: list[str]) -> torch.Tensor:
    from pipeline.runtime.sources import split_source

    return torch.cat([acts[split_source(i)] for i in inputs], dim=1)


def dense_encode(x: torch.Tensor, folder: Path, n_blocks: int, norm: bool):
    """The reference: normalize each block to norm sqrt(width), dense fp64 matmul, top-(k+1)."""
    from safetensors.torch import load_file

    w = load_file(str(folder / "sae.safetensors"))
    if norm:
        blocks = x.unflatten(-1, (n_blocks, -1))
        x = (blocks * (blocks.shape[-1] ** 0.5 / blocks.norm(dim=-1, keepdim=True))).flatten(-2)
    pre = x @ w["W_enc"].double().T + w["b_enc"].double()
    return pre.topk(K + 1, dim=-1)


def stored(root: Path, dict_id: str):
    from pipeline.outputs.layout import partition

    t = pq.read_table(root / "latents" / partition(dict_id)).to_pandas().sort_values(["seq_id", "pos"])
    return t, np.stack(t.latent_ids.to_numpy()), np.stack(t.acts.to_numpy()).astype(np.float64)


@pytest.mark.parametrize("name", list(CROSSCODERS))
def test_crosscoder_latents_equal_dense_reference(xc_run, reference, dict_dir, name):
    _, _, root = xc_run
    seq, pos, acts = reference
    inputs = CROSSCODERS[name]
    vals, ids = dense_encode(concat_inputs(acts, inputs), dict_dir / f"xc-{name}", len(inputs), norm=True)
    t, got_ids, got_acts = stored(root, f"crosscoder={name}")
    assert np.array_equal(t.seq_id.to_numpy(), seq) and np.array_equal(t.pos.to_numpy(), pos)
    # Exact ids wherever the reference's k-th and (k+1)-th values are apart (fp32 kernel vs fp64).
    clear = (vals[:, K - 1] - vals[:, K]).numpy() > 1e-4
    assert clear.mean() > 0.9
    assert np.array_equal(got_ids[clear], ids[:, :K].numpy()[clear])
    np.testing.assert_allclose(got_acts[clear], vals[:, :K].clamp_min(0).numpy()[clear], rtol=2e-3, atol=2e-3)


def test_checkpoints_really_differ(reference):
    """Otherwise the checkpoint crosscoder would not test that b's forward is used."""
    _, _, acts = reference
    assert not torch.allclose(acts[("a", "layers.1")], acts[("b", "layers.1")])


def test_transcoder_latents_are_written_under_its_input_hookpoint(xc_run, reference, dict_dir):
    _, _, root = xc_run
    _, _, acts = reference
    vals, ids = dense_encode(acts[(None, "layers.1")], dict_dir / "layers.1", 1, norm=False)
    _, got_ids, _ = stored(root, "layers.1")
    clear = (vals[:, K - 1] - vals[:, K]).numpy() > 1e-4
    assert clear.mean() > 0.9 and np.array_equal(got_ids[clear], ids[:, :K].numpy()[clear])


def test_manifest_lists_each_dictionary(xc_run):
    from pipeline.outputs.layout import dictionary_ids

    _, summary, root = xc_run
    m = json.loads((root / "manifest.json").read_text())
    assert sorted(m["dictionaries"]) == sorted(DICTS)
    assert dictionary_ids(m) == DICTS
    assert m["dictionaries"]["layers.1"] == {"kind": "transcoder", "inputs": ["layers.1"], "output": "layers.2"}
    assert m["dictionaries"]["layers.2"] == {"kind": "sae", "inputs": ["layers.2"]}
    for name, inputs in CROSSCODERS.items():
        assert m["dictionaries"][f"crosscoder={name}"] == {"kind": "crosscoder", "inputs": inputs}
        assert m["saes"][f"crosscoder={name}"]["d_in"] == D * len(inputs)
    assert set(m["model"]["checkpoints"]) == {"a", "b"} and all(c["sha256"] for c in m["model"]["checkpoints"].values())
    assert m["model"]["checkpoints"]["a"]["sha256"] == m["model"]["sha256"]
    assert summary.hookpoints == DICTS


def reference_fvu(y: np.ndarray, latents: tuple[np.ndarray, np.ndarray], folder: Path) -> float:
    from safetensors.torch import load_file

    w = load_file(str(folder / "sae.safetensors"))
    ids, vals = latents
    y_hat = (vals[:, :, None] * w["W_dec"].double().numpy()[ids]).sum(axis=1) + w["b_dec"].double().numpy()
    return float(((y - y_hat) ** 2).sum() / ((y - y.mean(axis=0)) ** 2).sum())


def test_fvu_check_per_input_block_and_against_the_transcoder_output(xc_run, reference, dict_dir):
    """Transcoder: decode vs layers.2 (its output); crosscoder: each block vs its own (normalized) input."""
    cfg, _, root = xc_run
    seq, _, acts = reference
    markers = [json.loads(p.read_text()) for p in sorted((root / "_commits").glob("*.json"))]
    for marker in markers:
        rows = np.flatnonzero((seq >= marker["seq_start"]) & (seq < marker["seq_start"] + marker["contexts"]))
        n = min(FVU_SAMPLE, len(rows))
        sample = rows[(np.arange(n) * len(rows)) // n]
        _, ids, vals = stored(root, "layers.1")
        got = marker["fvu"]["layers.1"]
        want = reference_fvu(acts[(None, "layers.2")].numpy()[sample], (ids[sample], vals[sample]), dict_dir / "layers.1")
        assert got["tokens"] == n and got["fvu"] == pytest.approx(want, rel=2e-3)  # stored acts are fp16
        for name, inputs in CROSSCODERS.items():
            _, ids, vals = stored(root, f"crosscoder={name}")
            x = concat_inputs(acts, inputs)[sample]
            blocks = x.unflatten(-1, (len(inputs), -1))
            x_n = (blocks * (D ** 0.5 / blocks.norm(dim=-1, keepdim=True))).numpy()
            from safetensors.torch import load_file

            w = load_file(str(dict_dir / f"xc-{name}" / "sae.safetensors"))
            x_hat = ((vals[sample][:, :, None] * w["W_dec"].double().numpy()[ids[sample]]).sum(axis=1)
                     + w["b_dec"].double().numpy()).reshape(n, len(inputs), D)
            rec = marker["fvu"][f"crosscoder={name}"]
            for i, src in enumerate(inputs):
                want = ((x_n[:, i] - x_hat[:, i]) ** 2).sum() / ((x_n[:, i] - x_n[:, i].mean(axis=0)) ** 2).sum()
                assert rec["inputs"][src] == pytest.approx(want, rel=2e-3)
    manifest = json.loads((root / "manifest.json").read_text())["fvu"]
    assert set(manifest["crosscoder=ckpt"]["inputs"]) == set(CROSSCODERS["ckpt"])


def test_worker_killed_mid_shard_is_redone_exactly_once(xc_run, tmp_path):
    from pipeline.runtime.driver import run

    cfg, _, root = xc_run
    marker = tmp_path / "crashed-once"
    faulty = dataclasses.replace(cfg, sink=SinkConfig(root=str(tmp_path / "out")),
                                 faults=FaultConfig(crash_shard=3, crash_point="after_parts", once_marker=str(marker)))
    run(faulty)
    assert marker.exists(), "the worker never died: the fault was not exercised"
    assert_exactly_once(tmp_path / "out" / cfg.run_id, DICTS)
    assert data_checksums(tmp_path / "out" / cfg.run_id) == data_checksums(root)


def test_crash_before_commit_then_resume_gives_identical_files(xc_run, tmp_path):
    from pipeline.runtime.driver import run

    cfg, _, root = xc_run
    out = SinkConfig(root=str(tmp_path / "out"))
    run_failing_shard_2_after_its_parts(cfg, out)
    resumed = tmp_path / "out" / cfg.run_id
    assert (resumed / "latents" / "crosscoder=ckpt" / "shard=000002" / "part-0.parquet").exists()
    assert not (resumed / "_commits" / "shard=000002.json").exists()
    summary = run(dataclasses.replace(cfg, sink=out))
    assert summary.shards_skipped > 0
    assert_exactly_once(resumed, DICTS)
    assert data_checksums(resumed) == data_checksums(root)


# -- preflight: before any work ----------------------------------------------------------------
def test_missing_crosscoder_hookpoints_stop_before_any_work(tiny_model_dir, tiny_corpus, dict_dir, ckpt_b_dir, tmp_path):
    from pipeline.runtime.driver import run
    from pipeline.runtime.preflight import ConfigMismatch

    bad = random_dictionary(D * 4, 9, kind="crosscoder", inputs=["layers.1", "layers.9", "b/layers.7.attn", "zz/layers.1"])
    bad.save(tmp_path / "bad")
    cfg = xc_cfg(tiny_model_dir, tiny_corpus, dict_dir, ckpt_b_dir, tmp_path / "out")
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, crosscoders={"bad": str(tmp_path / "bad")}))
    with pytest.raises(ConfigMismatch) as err:
        run(cfg)
    msg = str(err.value)
    assert "crosscoder bad" in msg and "3 of its 4 inputs" in msg
    assert "layers.9" in msg and "b/layers.7.attn" in msg and "zz/layers.1 (no checkpoint 'zz'" in msg
    assert "layers.1," not in msg.split("does not have:")[1].split(";")[0]  # the present one is not named
    assert not (tmp_path / "out").exists(), "work was done before the check"


def test_checkpoint_of_another_architecture_is_refused(tiny_model_dir, tiny_corpus, dict_dir, tmp_path):
    from pipeline.runtime.preflight import ConfigMismatch, prepare

    other = tmp_path / "wide"
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    build_tiny_llama(other, vocab, hidden=64)
    cfg = xc_cfg(tiny_model_dir, tiny_corpus, dict_dir, other, tmp_path / "out")
    with pytest.raises(ConfigMismatch, match=r"model.checkpoints.b=.*not the architecture.*hidden_size: 32 vs 64"):
        prepare(cfg)


def test_crosscoder_under_hookpoints_and_sae_under_crosscoders_are_refused(tiny_model_dir, tiny_corpus, dict_dir,
                                                                          ckpt_b_dir, tmp_path):
    from pipeline.runtime.preflight import ConfigMismatch, prepare

    cfg = xc_cfg(tiny_model_dir, tiny_corpus, dict_dir, ckpt_b_dir, tmp_path / "out")
    wrong = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, crosscoders={"x": str(dict_dir / "layers.2")}))
    with pytest.raises(ConfigMismatch, match=r"sae.crosscoders.x=.* is a sae .*not a crosscoder"):
        prepare(wrong)
    shutil.copytree(dict_dir / "xc-layers", tmp_path / "d" / "layers.2")
    shutil.copytree(dict_dir / "layers.1", tmp_path / "d" / "layers.1")
    wrong = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, path=str(tmp_path / "d") + "/{hookpoint}"))
    with pytest.raises(ConfigMismatch, match="is a crosscoder over .*list it under sae.crosscoders"):
        prepare(wrong)


# -- unit: the FVU record of a crosscoder merges per input ---------------------------------------
def test_fvu_merge_weights_each_input_by_tokens():
    from pipeline.sae.fvu import merge

    a = {"x": {"tokens": 2, "fvu": 0.5, "dead_fraction": 0.5, "inputs": {"p": 0.2, "q": 0.8}}}
    b = {"x": {"tokens": 6, "fvu": 0.1, "dead_fraction": 0.1, "inputs": {"p": 0.6, "q": 0.0}}}
    got = merge(merge({}, a), b)["x"]
    assert got["tokens"] == 8 and got["shards"] == 2
    assert got["inputs"] == {"p": pytest.approx(0.5), "q": pytest.approx(0.2)}
    assert got["fvu"] == pytest.approx(0.2)


# -- post-processing and the browser: decoder-norm shares per input ------------------------------
def direct_fractions(folder: Path, n_inputs: int) -> np.ndarray:
    from safetensors.torch import load_file

    w = load_file(str(folder / "sae.safetensors"))["W_dec"].double().numpy().reshape(L, n_inputs, D)
    norms = np.linalg.norm(w, axis=2)
    return norms / norms.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def post(xc_run, tmp_path_factory):
    from pipeline.config import PostprocessConfig
    from pipeline.outputs.browser import build_browser
    from pipeline.outputs.postprocess import postprocess
    from pipeline.outputs.sink import RunStore

    cfg, _, _ = xc_run
    store = RunStore(cfg.sink, cfg.run_id)
    summary = postprocess(store, PostprocessConfig(run_id=cfg.run_id, sink=cfg.sink, bucket_size=32))  # 3 buckets
    index = build_browser(store, tmp_path_factory.mktemp("xc-www"), max_latents=20, shard_rows=8)
    return store, summary, index


def test_latent_stats_have_decoder_norm_fractions_per_input(post, dict_dir):
    from pipeline.outputs.layout import DEC_NORM_FRAC, DEC_NORM_INPUTS, stats_key

    store, summary, _ = post
    for name, inputs in CROSSCODERS.items():
        t = pq.read_table(store.path(stats_key(f"crosscoder={name}")))
        assert json.loads(t.schema.metadata[DEC_NORM_INPUTS]) == inputs
        assert t["latent_id"].to_pylist() == list(range(L))
        got = np.stack(t[DEC_NORM_FRAC].to_numpy(zero_copy_only=False)).astype(np.float64)
        np.testing.assert_allclose(got, direct_fractions(dict_dir / f"xc-{name}", len(inputs)), rtol=1e-6, atol=1e-7)
        assert (t["n_active"].to_numpy() > 0).any()
    for hook in ("layers.1", "layers.2"):  # not a crosscoder: no column
        assert DEC_NORM_FRAC not in pq.read_table(store.path(stats_key(hook))).column_names
    # A crosscoder's decoder is wider than the unembedding: its logit effects say why they are skipped.
    assert summary["logit_effects"]["crosscoder=ckpt"] == "skipped"


def test_browser_shows_and_sorts_decoder_norm_shares(post, dict_dir, browser, page):  # noqa: F811
    from pipeline.outputs.layout import stats_key

    store, _, index = post
    hook, inputs = "crosscoder=ckpt", CROSSCODERS["ckpt"]
    i = DICTS.index(hook)
    direct = direct_fractions(dict_dir / "xc-ckpt", len(inputs))
    page.goto(index.as_uri())
    page.wait_for_selector(f"#table-{i} tbody tr")
    assert page.locator(f"#table-{i} th.norm").all_text_contents() == inputs  # (CSS upper-cases headers)
    page.click(f"#table-{i} th[data-col='101']")  # share of checkpoint b, descending
    page.wait_for_function(f"document.querySelectorAll('#table-{i} tbody tr').length === 20")
    ids = [int(t) for t in page.locator(f"#table-{i} tbody tr td:first-child").all_inner_texts()]
    col = len(page.locator(f"#table-{i} thead th").all_inner_texts()) - len(inputs) + 2  # 1-based, input b
    shown = [float(v) for v in page.locator(f"#table-{i} tbody tr td:nth-child({col}) .nval").all_inner_texts()]
    assert shown == sorted(shown, reverse=True)
    np.testing.assert_allclose(shown, direct[ids, 1], atol=6e-5)
    n_active = pq.read_table(store.path(stats_key(hook)))["n_active"].to_numpy()
    active = np.flatnonzero(n_active > 0)
    assert set(ids) == set(active[np.argsort(-n_active[active], kind="stable")][:20].tolist())
    # The latent page: one bar per input, with the numbers of the decoder itself.
    page.click(f"#table-{i} a[href$='/{ids[0]}.html']")
    page.wait_for_selector("#decoder-norms")
    assert page.locator("#decoder-norms th").all_text_contents() == inputs
    values = [float(v) for v in page.locator("#decoder-norms td.num").all_inner_texts()]
    np.testing.assert_allclose(values, direct[ids[0]], atol=6e-5)
    widths = page.locator("#decoder-norms td.bar span").evaluate_all("els => els.map(e => e.style.width)")
    assert [float(w.rstrip("%")) for w in widths] == pytest.approx(list(direct[ids[0]] * 100), abs=0.06)


def test_hydra_names_checkpoints_and_crosscoders():
    """The README's overrides compose into the typed config."""
    from test_hydra import _compose

    cfg = _compose(["experiment=none", "+model.checkpoints.step1k=/m/step1000", "+model.checkpoints.step143k=/m/s143",
                    "sae.hookpoints=[]", "+sae.crosscoders.births=/saes/xc"])
    assert cfg.model.checkpoints == {"step1k": "/m/step1000", "step143k": "/m/s143"}
    assert cfg.sae.crosscoders == {"births": "/saes/xc"} and cfg.sae.hookpoints == []


def test_mlp_transcoder_end_to_end(tiny_model_dir, tiny_corpus, tmp_path, ray_local):
    """A transcoder on the MLP (reads layers.1.mlp_in, reconstructs layers.1.mlp_out) through the real
    pipeline: latents against a dense encode of the MLP's input captured by hand, and the FVU check
    against the MLP's output captured by hand."""
    from transformers import AutoModelForCausalLM

    from pipeline.runtime.driver import run

    folder = tmp_path / "tc"
    random_dictionary(D, 7, hookpoint="layers.1.mlp_in", kind="transcoder",
                      output="layers.1.mlp_out").save(folder / "layers.1.mlp_in")
    cfg = make_cfg(tiny_model_dir, tiny_corpus, folder, tmp_path / "out", "tc", shard_size=2)
    cfg = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, hookpoints=["layers.1.mlp_in"],
                                                           fvu_sample=FVU_SAMPLE))
    run(cfg)
    root = tmp_path / "out" / "tc"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    mlp = model.model.layers[1].mlp
    seen: dict[str, list] = {"in": [], "out": []}

    def capture(module, args, out) -> None:  # returns None: the forward goes on unchanged
        seen["in"].append(args[0][0].double())
        seen["out"].append(out[0].double())

    mlp.register_forward_hook(capture)
    ctx = pq.read_table(root / "contexts").to_pandas().sort_values("seq_id")
    with torch.inference_mode():
        for t in ctx.token_ids:
            model(torch.tensor([list(t)]))
    x, y = torch.cat(seen["in"]), torch.cat(seen["out"])
    vals, ids = dense_encode(x, folder / "layers.1.mlp_in", 1, norm=False)
    _, got_ids, got_vals = stored(root, "layers.1.mlp_in")
    clear = (vals[:, K - 1] - vals[:, K]).numpy() > 1e-4
    assert clear.mean() > 0.9 and np.array_equal(got_ids[clear], ids[:, :K].numpy()[clear])
    seq = np.concatenate([np.full(len(t), s) for s, t in zip(ctx.seq_id, ctx.token_ids)])
    for p in sorted((root / "_commits").glob("*.json")):
        marker = json.loads(p.read_text())
        rows = np.flatnonzero((seq >= marker["seq_start"]) & (seq < marker["seq_start"] + marker["contexts"]))
        n = min(FVU_SAMPLE, len(rows))
        sample = rows[(np.arange(n) * len(rows)) // n]
        want = reference_fvu(y.numpy()[sample], (got_ids[sample], got_vals[sample]), folder / "layers.1.mlp_in")
        assert marker["fvu"]["layers.1.mlp_in"]["fvu"] == pytest.approx(want, rel=2e-3)
    m = json.loads((root / "manifest.json").read_text())
    assert m["dictionaries"]["layers.1.mlp_in"] == {"kind": "transcoder", "inputs": ["layers.1.mlp_in"],
                                                    "output": "layers.1.mlp_out"}

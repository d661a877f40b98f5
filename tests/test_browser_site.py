"""The latent browser site (index table, logit effects, delphi explanations) end to end:
a synthetic run through the real sink and post-processing (local Ray), a real tiny Llama checkpoint
and SAE on disk, delphi's own file format, and the pages driven in the system Chromium by Playwright.

Screenshots go to $BROWSER_SHOTS (default: the test's tmp folder)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_delphi_export import import_delphi_loader
from test_postprocess import CFG, HOOK, N_LATENTS, K, make_run

from pipeline.outputs.browser import build_browser
from pipeline.outputs.delphi_export import export_delphi
from pipeline.outputs.layout import logit_effects_key, logit_effects_state_key, stats_key
from pipeline.outputs.postprocess import postprocess
from pipeline.sae.sae import random_sae

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
D_MODEL = 32
EXPLAINED = {}  # latent -> explanation text, filled by the fixture


def chromium_or_skip() -> str:
    exe = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if exe is None or importlib_missing("playwright"):
        msg = "Chromium (/usr/bin/chromium) and the playwright package are needed for the browser tests"
        if os.environ.get("CI") == "true":
            pytest.fail(msg + " (CI=true: a missing component fails)")
        pytest.skip(msg)
    return exe


def importlib_missing(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is None


def tiny_model_with_gain(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama whose final RMSNorm weight is far from 1, so folding it in matters."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.save_pretrained(str(folder))
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(-2.0, 3.0, D_MODEL))
    model.save_pretrained(str(folder))
    return folder


def with_model_and_sae(store, model_dir: Path, sae_dir: Path | None) -> None:
    """Record the model and SAE in the manifest the way pipeline.runtime.preflight does."""
    manifest = store.read_json("manifest.json")
    manifest["config"] = {"model": {"name": "tiny", "path": str(model_dir), "gguf_file": None,
                                    "dtype": "float32", "batch_size": 4}}
    manifest["model"] = {"name": "tiny", "path": str(model_dir), "sha256": "test"}
    if sae_dir is not None:
        manifest["saes"][HOOK].update({"path": str(sae_dir), "format": "sae-harvest", "sha256": "sae-test"})
    store.write_json("manifest.json", manifest)


def write_delphi_output(cache: Path, out: Path, monkeypatch) -> dict[int, tuple[str, float]]:
    """Explanations and detection scores for a few latents, written exactly as delphi's
    __main__.py does (`explanations/{latent}.txt`, `scores/<scorer>/{latent}.txt`, orjson) for
    the latents delphi's own loader finds in our export."""
    loader = import_delphi_loader(monkeypatch)
    import importlib.util

    import delphi
    import orjson
    from delphi.latents.latents import Latent

    # delphi.scorers' package __init__ imports its LLM clients (vllm): load the module that
    # defines the score records by itself, as delphi's own file.
    path = Path(delphi.__file__).parent / "scorers" / "classifier" / "sample.py"
    spec = importlib.util.spec_from_file_location("delphi.scorers.classifier.sample", path)
    sample = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample)
    ClassifierOutput = sample.ClassifierOutput  # noqa: N806

    buffer = loader.TensorBuffer(str(sorted((cache / HOOK).glob("0_*.safetensors"))[0]), HOOK)
    latents, _, _ = buffer.load_data_per_latent()
    chosen = sorted(set(latents.tolist()))[:5]
    (out / "explanations").mkdir(parents=True)
    (out / "scores" / "detection").mkdir(parents=True)
    expected = {}
    for n, latent in enumerate(chosen):
        record = Latent(module_name=HOOK, latent_index=latent)
        text = f"the token “repr” in code, variant {n}"
        with open(out / "explanations" / f"{record}.txt", "wb") as f:
            f.write(orjson.dumps(text))
        # n+1 of 4 activating examples predicted right, both non-activating right: delphi's
        # balanced accuracy is ((n+1)/4 + 1) / 2.
        score = [ClassifierOutput(str_tokens=["a"], activations=[1.0], distance=0, activating=True,
                                  prediction=i <= n, probability=0.9, correct=i <= n) for i in range(4)]
        score += [ClassifierOutput(str_tokens=["b"], activations=[0.0], distance=-1, activating=False,
                                   prediction=False, probability=0.1, correct=True) for _ in range(2)]
        safe = str(record).replace("/", "--")
        with open(out / "scores" / "detection" / f"{safe}.txt", "wb") as f:
            f.write(orjson.dumps(score))
        expected[latent] = (text, ((min(n + 1, 4)) / 4 + 1) / 2)
    return expected


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir, ray_local):
    root = tmp_path_factory.mktemp("site")
    model_dir = tiny_model_with_gain(root / "model", tiny_model_dir)
    sae = random_sae(D_MODEL, N_LATENTS, K, seed=5, hookpoint=HOOK)
    sae.W_dec = sae.W_dec * torch.linspace(0.5, 2.0, N_LATENTS)[:, None]  # rows not unit-norm
    sae_dir = sae.save(root / "sae")
    store = make_run(root / "runs", "site", n_shards=3)
    with_model_and_sae(store, model_dir, sae_dir)
    postprocess(store, CFG)
    export_delphi(store, root / "delphi_cache")
    mp = pytest.MonkeyPatch()
    EXPLAINED.update(write_delphi_output(root / "delphi_cache", root / "delphi_out", mp))
    mp.undo()
    # 8 rows per index shard: 30 pages need 4 shards, loaded on demand.
    index = build_browser(store, root / "www", max_latents=30, explanations=root / "delphi_out", shard_rows=8)
    return store, index, model_dir, sae


def direct_effects(model_dir: Path, sae) -> torch.Tensor:
    """[L, vocab]: each decoder row through the model's own final norm weight and lm_head."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return (sae.W_dec.float() * model.model.norm.weight.detach()) @ model.lm_head.weight.detach().T


def test_logit_effects_match_the_model(site):
    from transformers import AutoModelForCausalLM

    store, _, model_dir, sae = site
    state = store.read_json(logit_effects_state_key(HOOK))
    assert "computed" in state and state["computed"]["latents"] > 30
    got = pq.read_table(store.path(logit_effects_key(HOOK, 0))).to_pylist()
    direct = direct_effects(model_dir, sae)
    for row in got:
        expect_v, expect_i = torch.topk(direct[row["latent_id"]], 10)
        assert row["top_ids"] == expect_i.tolist()
        np.testing.assert_allclose(row["top_logits"], expect_v.numpy(), rtol=1e-5, atol=1e-5)
        low_v, low_i = torch.topk(-direct[row["latent_id"]], 10)
        assert row["bottom_ids"] == low_i.tolist()
    # The model's own final norm and lm_head on the direction rank the tokens the same way: the
    # dropped 1/rms is one positive factor per direction.
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        own = model.lm_head(model.model.norm(sae.W_dec[got[0]["latent_id"]].float()[None]))[0]
    assert torch.topk(own, 10).indices.tolist() == got[0]["top_ids"]


def test_logit_effects_skipped_without_decoder(tmp_path, tiny_model_dir, ray_local):
    store = make_run(tmp_path / "runs", "nodec", n_shards=2)
    with_model_and_sae(store, tiny_model_dir, None)
    summary = postprocess(store, CFG)
    assert summary["logit_effects"] == {HOOK: "skipped"}
    assert "no SAE path" in store.read_json(logit_effects_state_key(HOOK))["skipped"]
    # A crosscoder-style dec_norm_frac column in latent_stats: its slot appears on the page.
    stats = pq.read_table(store.path(stats_key(HOOK)))
    norms = pa.array([[0.5, 0.3, 0.2]] * stats.num_rows, pa.list_(pa.float32()))
    meta = {**stats.schema.metadata, b"dec_norm_inputs": b'["layer 0", "layer 1", "layer 2"]'}
    pq.write_table(stats.append_column("dec_norm_frac", norms).replace_schema_metadata(meta), store.path(stats_key(HOOK)))
    index = build_browser(store, tmp_path / "www", max_latents=3)
    page = next((index.parent / "latents" / HOOK).glob("*.html")).read_text()
    assert "logits-skipped" in page and "no SAE path" in page
    assert 'id="decoder-norms"' in page and "layer 2" in page
    assert "logit effects not shown" in index.read_text()


def test_page_without_decoder_norms_has_no_slot(site):
    _, index, _, _ = site
    page = next((index.parent / "latents" / HOOK).glob("*.html")).read_text()
    assert 'id="decoder-norms"' not in page and 'id="logits-pos"' in page


# -- in Chromium ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    exe = chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page that records console errors and uncaught exceptions; the test fails on any."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    pg.on("pageerror", lambda e: errors.append(str(e)))
    yield pg
    ctx.close()
    assert errors == []


def shots_dir(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("BROWSER_SHOTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def table_ids(pg) -> list[int]:
    return [int(t) for t in pg.locator("#table-0 tbody tr td:first-child").all_inner_texts()]


def test_index_search_and_sort(site, page, tmp_path):
    store, index, _, _ = site
    page.goto(index.as_uri())
    page.wait_for_selector("#table-0 tbody tr")
    stats = pq.read_table(store.path(stats_key(HOOK))).to_pandas()
    active = stats[stats.n_active > 0].sort_values(["n_active", "latent_id"], ascending=[False, True])
    pages = active.latent_id.head(30).tolist()
    # First shard only (8 rows, page order) until something needs the rest.
    assert table_ids(page) == pages[:8]
    assert "first 8 loaded" in page.inner_text("#status-0")

    page.click("#table-0 th[data-col='2']")  # max act: descending first, loads all shards
    page.wait_for_function("document.querySelectorAll('#table-0 tbody tr').length === 30")
    by_max = stats.set_index("latent_id").loc[pages].sort_values("max_act", ascending=False, kind="stable")
    shown = page.locator("#table-0 tbody tr td:nth-child(3)").all_inner_texts()
    assert [float(v) for v in shown] == sorted((float(v) for v in shown), reverse=True)
    assert set(table_ids(page)) == set(pages)
    assert float(shown[0]) == pytest.approx(float(by_max.max_act.iloc[0]), rel=1e-3)
    page.click("#table-0 th[data-col='2']")  # again: ascending
    shown = [float(v) for v in page.locator("#table-0 tbody tr td:nth-child(3)").all_inner_texts()]
    assert shown == sorted(shown)
    page.click("#table-0 th[data-col='0']")
    assert table_ids(page) == sorted(pages)

    # Filter by token text: the rows are exactly the latents that fire on or promote it.
    first_tokens = page.locator("#table-0 tbody tr:first-child td:nth-child(4) .chip").all_inner_texts()
    needle = max(first_tokens, key=len).replace("·", " ").strip()
    page.fill("#filter-0", needle)
    page.wait_for_function("document.getElementById('status-0').textContent.indexOf(' of ') >= 0")
    rows = page.locator("#table-0 tbody tr")
    assert rows.count() >= 1
    for r in range(rows.count()):
        chips = rows.nth(r).locator("td:nth-child(4) .chip, td:nth-child(5) .chip").all_inner_texts()
        expl = rows.nth(r).locator("td:nth-child(6)").inner_text()
        assert any(needle.lower() in c.replace("·", " ").lower() for c in chips) or needle.lower() in expl.lower()
    # "repr" is in every explanation the test wrote: the explained latents, and only those, match.
    page.fill("#filter-0", "repr")
    page.wait_for_function(f"document.querySelectorAll('#table-0 tbody tr').length === {len([e for e in EXPLAINED if e in pages])}")
    assert set(table_ids(page)) == {e for e in EXPLAINED if e in pages}
    page.fill("#filter-0", "")
    page.wait_for_function("document.querySelectorAll('#table-0 tbody tr').length === 30")
    page.screenshot(path=str(shots_dir(tmp_path) / "index.png"), full_page=False)


def test_open_latent_shows_direct_logit_tokens_and_explanation(site, page, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    store, index, model_dir, sae = site
    page.goto(index.as_uri())
    page.wait_for_selector("#table-0 tbody tr")
    explained = next(e for e in EXPLAINED if page.locator(f"#table-0 a[href$='/{e}.html']").count())
    page.click(f"#table-0 a[href$='/{explained}.html']")
    page.wait_for_selector("#logits-pos")
    assert page.url.endswith(f"latents/{HOOK}/{explained}.html")

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    direct = direct_effects(model_dir, sae)[explained]
    for kind, sign in (("pos", 1), ("neg", -1)):
        ids = [int(i) for i in page.locator(f"#logits-{kind} td.tokcell").evaluate_all("els => els.map(e => e.dataset.id)")]
        assert ids == torch.topk(sign * direct, 10).indices.tolist()
        shown = page.locator(f"#logits-{kind} td.tokcell .chip").all_inner_texts()
        expect = [tok.decode([i]).replace("\n", "⏎").replace(" ", "·") or "∅" for i in ids]
        assert shown == expect
        values = [float(v) for v in page.locator(f"#logits-{kind} td.num").all_inner_texts()]
        np.testing.assert_allclose(values, (sign * torch.topk(sign * direct, 10).values).numpy(), atol=1e-3)

    text, score = EXPLAINED[explained]
    assert page.inner_text("#explanation .expl") == text
    assert f"detection {score:.2f}" in page.inner_text("#explanation")
    assert page.locator("#decoder-norms").count() == 0
    assert "top examples" in page.content()
    page.screenshot(path=str(shots_dir(tmp_path) / "latent.png"), full_page=True)

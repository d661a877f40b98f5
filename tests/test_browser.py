"""The latent browser rendered by a real headless Chromium: the screenshot must show content
(not a blank page) and the DOM must hold the latent ids and decoded example text."""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import require, require_module
from test_postprocess import CFG, HOOK, make_run

from pipeline.outputs.browser import build_browser
from pipeline.outputs.postprocess import postprocess

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,900"]


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    require("chromium", exe is not None, "apt-get install -y chromium")
    return exe


def render(url: str, screenshot: Path | None = None) -> str:
    with tempfile.TemporaryDirectory() as profile:
        extra = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        out = subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
                             capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_model_dir, ray_local):
    root = tmp_path_factory.mktemp("browse")
    store = make_run(root, "br", n_shards=3)
    # Record the tiny model in the manifest the way pipeline.runtime.driver does, so pages decode real tokens.
    manifest = store.read_json("manifest.json")
    manifest["config"] = {"model": {"name": "tiny", "path": str(tiny_model_dir), "gguf_file": None,
                                    "dtype": "float32", "batch_size": 4}}
    store.write_json("manifest.json", manifest)
    postprocess(store, CFG)
    index = build_browser(store, root / "site", max_latents=7)
    return store, index


def test_index_renders_with_histogram_and_search(site, tmp_path):
    from PIL import Image

    _, index = site
    dom = render(index.as_uri())
    pages = json.loads(dom.split("var PAGES=")[1].split(";")[0])
    assert len(pages[HOOK]) == 7
    for latent in pages[HOOK]:
        assert f"latents/{HOOK}/{latent}.html" in dom
    assert "<svg" in dom and "<rect" in dom and "density" in dom

    shot = tmp_path / "index.png"
    render(index.as_uri(), shot)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (900, 1200)
    blue = (pixels[..., 2] > 150) & (pixels[..., 0] < 120)  # the histogram bars (#3b6fd8)
    dark = pixels.sum(axis=2) < 200  # text
    assert blue.sum() > 200 and dark.sum() > 500 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 20


def test_latent_page_shows_stats_and_decoded_shaded_examples(site, tmp_path, tiny_model_dir):
    from PIL import Image
    from transformers import AutoTokenizer

    store, index = site
    latent = json.loads(render(index.as_uri()).split("var PAGES=")[1].split(";")[0])[HOOK][0]
    page = index.parent / "latents" / HOOK / f"{latent}.html"
    dom = render(page.as_uri())
    assert f"latent {latent}" in dom and "top examples" in dom and "random examples" in dom
    assert "n_active" in dom and "rgba(230,80,30" in dom

    # The first top example's text, decoded with the run's tokenizer, is on the page.
    import html

    import pyarrow.parquet as pq

    from pipeline.outputs.windows import read_windows

    ex = read_windows(store, HOOK, pq.read_table(Path(store.root) / "examples" / f"hookpoint={HOOK}")).to_pandas()
    first = ex[(ex.latent_id == latent) & (ex.kind == "top") & (ex["rank"] == 0)].iloc[0]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    pieces = [html.escape(tok.decode([int(t)])) for t in first.token_ids]
    assert all(p in dom for p in pieces if p.strip())

    shot = tmp_path / "latent.png"
    render(page.as_uri(), shot)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    shaded = (pixels[..., 0] > 200) & (pixels[..., 1] < 200) & (pixels[..., 2] < 170)  # orange token shading
    assert shaded.sum() > 50 and (pixels.sum(axis=2) < 200).sum() > 500


def test_search_box_and_latent_links_work_in_a_real_browser(site):
    """Driven through Playwright on the system Chromium (Playwright's own browser download is not
    used): type into the search box, follow a link from the index, and no console errors."""
    sync_api = require_module("playwright.sync_api", "playwright", "pip install -e '.[test]'")
    _, index = site
    ids = json.loads(index.read_text().split("var PAGES=")[1].split(";")[0])[HOOK]
    assert len(ids) >= 3
    missing = next(i for i in range(10**6, 10**6 + len(ids) + 1) if i not in ids)
    errors: list[str] = []
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
            page.goto(index.as_uri())
            box = page.locator(f"[id='q-{HOOK}']")  # the id holds a '.', so no #css shorthand

            # A latent without a page: a message, and the browser stays on the index.
            box.type(str(missing))
            box.press("Enter")
            msg = page.locator(f"[id='msg-{HOOK}']")
            sync_api.expect(msg).to_have_text(f"latent {missing} has no page (dead, no examples, or beyond the page cap)")
            assert page.url == index.as_uri()

            # A latent with a page, typed with stray spaces: Enter opens its page.
            box.fill("")
            box.type(f" {ids[1]} ")
            with page.expect_navigation():
                box.press("Enter")
            assert page.url.endswith(f"/latents/{HOOK}/{ids[1]}.html"), page.url
            assert page.locator("h1").inner_text() == f"{HOOK} · latent {ids[1]}"
            assert page.get_by_text("top examples").count() > 0

            # Back on the index, the `open` button works too, and so do the index's links.
            page.go_back()
            page.locator(f"[id='q-{HOOK}']").fill(str(ids[0]))
            with page.expect_navigation():
                page.get_by_role("button", name="open").first.click()
            assert page.url.endswith(f"/latents/{HOOK}/{ids[0]}.html"), page.url
            page.go_back()
            with page.expect_navigation():
                page.click(f"a[href='latents/{HOOK}/{ids[2]}.html']")
            assert page.locator("h1").inner_text() == f"{HOOK} · latent {ids[2]}"
        finally:
            browser.close()
    assert not errors, errors

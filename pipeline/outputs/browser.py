"""A static HTML latent browser for a post-processed run: open `index.html` from disk, no server.

    python -m pipeline.outputs.browser run_id=demo out=./browser [sink=s3] [sink.root=...] [max_latents=200]

index.html: per hookpoint a density histogram (inline SVG) and a search box (latent id -> page).
latents/<hookpoint>/<id>.html: statistics, the activation histogram over the fixed bins, and the
top / quantile / random examples with tokens shaded by that latent's activation. Only latents
with examples get a page, at most `max_latents` per hookpoint (most active first). Tokens are
decoded with the run's tokenizer (ModelConfig from the manifest) when it loads, else shown as ids.
"""
from __future__ import annotations

import html
import json
import logging
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.cli import command
from pipeline.config import BrowserConfig, ModelConfig
from pipeline.outputs.layout import EXAMPLES_SCHEMA, MANIFEST_KEY, bucket_marker_key, examples_key, stats_key
from pipeline.outputs.postprocess import read_json_or_none
from pipeline.outputs.sink import RunStore

log = logging.getLogger(__name__)

STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse}
td,th{padding:2px 10px;text-align:right;border-bottom:1px solid #eee}
.ex{font-family:monospace;white-space:pre-wrap;margin:4px 0;padding:4px;border:1px solid #ddd;line-height:1.7}
.tok{border-radius:2px}.kind{color:#666;font-size:12px;margin-right:6px}a{color:#1a56c4}"""


def load_run_tokenizer(manifest: dict):
    """The run's tokenizer, or None (then tokens show as ids)."""
    try:
        from pipeline.model.loader import load_tokenizer

        return load_tokenizer(ModelConfig(**manifest["config"]["model"]))
    except Exception as err:  # noqa: BLE001 - a run made elsewhere may not have its model here
        log.warning(f"[browser] tokenizer not available ({type(err).__name__}: {err}); showing token ids")
        return None


def token_strings(tokenizer, ids: list[int]) -> list[str]:
    if tokenizer is None:
        return [f"#{i} " for i in ids]
    return [tokenizer.decode([i]) for i in ids]


def svg_bars(counts: list[float], labels: tuple[str, str], width: int = 520, height: int = 140, title: str = "") -> str:
    n = max(len(counts), 1)
    top = max(max(counts, default=0), 1)
    bw = width / n
    bars = "".join(
        f'<rect x="{i * bw:.1f}" y="{height - 20 - (c / top) * (height - 30):.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{(c / top) * (height - 30):.1f}" fill="#3b6fd8"><title>{c:g}</title></rect>'
        for i, c in enumerate(counts)
    )
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
            f'aria-label="{html.escape(title)}">{bars}'
            f'<line x1="0" y1="{height - 20}" x2="{width}" y2="{height - 20}" stroke="#888"/>'
            f'<text x="0" y="{height - 5}" font-size="11">{html.escape(labels[0])}</text>'
            f'<text x="{width}" y="{height - 5}" font-size="11" text-anchor="end">{html.escape(labels[1])}</text></svg>')


def example_html(kind: str, rank: int, seq_id: int, toks: list[str], acts: np.ndarray, scale: float) -> str:
    spans = []
    for t, a in zip(toks, acts):
        alpha = min(float(a) / scale, 1.0) if scale > 0 else 0.0
        style = f' style="background:rgba(230,80,30,{alpha:.2f})"' if a > 0 else ""
        spans.append(f'<span class="tok"{style} title="{float(a):.3f}">{html.escape(t)}</span>')
    return f'<div class="ex"><span class="kind">{kind} #{rank} · seq {seq_id}</span>{"".join(spans)}</div>'


def latent_page(hook: str, stats: dict, examples, tokenizer, edges_log2: tuple[float, float]) -> str:
    lid = stats["latent_id"]
    rows = "".join(f"<tr><th>{k}</th><td>{v:.6g}</td></tr>" if isinstance(v, float) else f"<tr><th>{k}</th><td>{v}</td></tr>"
                   for k, v in stats.items() if k not in ("quantiles", "histogram"))
    quant = ", ".join(f"{q:.3g}" for q in stats["quantiles"])
    hist = svg_bars(stats["histogram"], (f"2^{edges_log2[0]:g}", f"2^{edges_log2[1]:g}"), title="activation histogram")
    scale = float(stats["max_act"]) or 1.0
    sections = []
    for kind in ("top", "quantile", "random"):
        part = examples[examples["kind"] == kind].sort_values("rank")
        body = "".join(example_html(kind, int(r.rank), int(r.seq_id), token_strings(tokenizer, list(r.token_ids)),
                                    np.asarray(r.acts), scale) for r in part.itertuples())
        sections.append(f"<h2>{kind} examples ({len(part)})</h2>{body or '<p>none</p>'}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{hook} latent {lid}</title>"
            f"<style>{STYLE}</style></head><body><p><a href='../../index.html'>← index</a></p>"
            f"<h1>{html.escape(hook)} · latent {lid}</h1><table>{rows}</table><p>quantiles: {quant}</p>"
            f"<h2>activation histogram</h2>{hist}{''.join(sections)}</body></html>")


def read_examples(store: RunStore, hook: str) -> pa.Table:
    """Every bucket's examples of one hookpoint (buckets are those with a completion marker)."""
    tables, bucket = [], 0
    while read_json_or_none(store, bucket_marker_key(hook, bucket)) is not None:
        tables.append(store.read_part(examples_key(hook, bucket)))
        bucket += 1
    return pa.concat_tables(tables) if tables else EXAMPLES_SCHEMA.empty_table()


SEARCH_JS = """function go(hook){var v=document.getElementById('q-'+hook).value.trim();
var ids=PAGES[hook];var m=document.getElementById('msg-'+hook);
if(ids.indexOf(parseInt(v,10))>=0){location.href='latents/'+hook+'/'+parseInt(v,10)+'.html';}
else{m.textContent='latent '+v+' has no page (dead, no examples, or beyond the page cap)';}return false;}"""


def build_browser(store: RunStore, out: str | Path, max_latents: int = 200, tokenizer="auto") -> Path:
    out = Path(out)
    manifest = store.read_json(MANIFEST_KEY)
    if tokenizer == "auto":
        tokenizer = load_run_tokenizer(manifest)
    pages: dict[str, list[int]] = {}
    sections = []
    for hook in manifest["hookpoints"]:
        table = store.read_part(stats_key(hook))
        meta = table.schema.metadata or {}
        lo2, hi2, _ = (float(x) for x in meta.get(b"histogram_edges_log2", b"-8,8,32").decode().split(","))
        stats = table.to_pandas()
        ex_table = read_examples(store, hook)
        with_examples = set(pc.unique(ex_table["latent_id"]).to_pylist())
        chosen = stats[stats.latent_id.isin(with_examples)].sort_values(["n_active", "latent_id"], ascending=[False, True])
        chosen = chosen.head(max_latents)
        wanted = pa.array(chosen.latent_id.tolist(), type=pa.int32())
        examples = ex_table.filter(pc.is_in(ex_table["latent_id"], value_set=wanted)).to_pandas()
        folder = out / "latents" / hook
        folder.mkdir(parents=True, exist_ok=True)
        for row in chosen.to_dict("records"):
            row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
            row = {k: (float(v) if isinstance(v, np.floating) else int(v) if isinstance(v, (np.integer, np.bool_)) else v)
                   for k, v in row.items()}
            page = latent_page(hook, row, examples[examples.latent_id == row["latent_id"]], tokenizer, (lo2, hi2))
            (folder / f"{row['latent_id']}.html").write_text(page, encoding="utf-8")
        pages[hook] = sorted(int(i) for i in chosen.latent_id)

        # Density histogram over log10(density) of the live latents; dead ones counted apart.
        live = stats.density[stats.density > 0].to_numpy()
        logd = np.log10(live) if len(live) else np.zeros(0)
        lo, hi = (math.floor(logd.min()), math.ceil(logd.max()) or 0) if len(logd) else (-6, 0)
        counts, _ = np.histogram(logd, bins=30, range=(lo, max(hi, lo + 1)))
        svg = svg_bars(counts.tolist(), (f"1e{lo}", f"1e{max(hi, lo + 1)}"), title=f"density histogram {hook}")
        links = " ".join(f"<a href='latents/{hook}/{i}.html'>{i}</a>" for i in pages[hook])
        n_dead = int(stats.is_dead.sum())
        sections.append(
            f"<h2>{html.escape(hook)}</h2><p>{len(stats)} latents, {n_dead} dead, {len(pages[hook])} pages</p>"
            f"<p>latent density (log10, live latents)</p>{svg}"
            f"<form onsubmit=\"return go('{hook}')\"><input id='q-{hook}' placeholder='latent id'>"
            f"<button>open</button> <span id='msg-{hook}'></span></form><p>{links}</p>")
    index = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(store.run_id)} latents</title>"
             f"<style>{STYLE}</style><script>var PAGES={json.dumps(pages)};{SEARCH_JS}</script></head>"
             f"<body><h1>run {html.escape(store.run_id)}</h1>{''.join(sections)}</body></html>")
    (out / "index.html").write_text(index, encoding="utf-8")
    log.info(f"[{store.run_id}] browser: {sum(map(len, pages.values()))} latent pages in {out}/index.html")
    return out / "index.html"


def _main(cfg: BrowserConfig) -> None:
    build_browser(RunStore(cfg.sink, cfg.run_id), cfg.out, cfg.max_latents)


main = command("browser", BrowserConfig, _main)


if __name__ == "__main__":
    main()

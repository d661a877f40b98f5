"""A static HTML latent browser for a post-processed run: open `index.html` from disk, no server.

    python -m pipeline.outputs.browser run_id=demo out=./browser [sink=s3] [sink.root=...] [max_latents=200]

index.html: per hookpoint a density histogram (inline SVG) and a search box (latent id -> page).
latents/<hookpoint>/<id>.html: statistics, the activation histogram over the fixed bins, and the
top / quantile / random examples with tokens shaded by that latent's activation. Statistics and
examples are streamed (row group by row group, bucket by bucket); only the pages' rows are kept. Only latents
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
import pyarrow.parquet as pq

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


def read_examples(store: RunStore, hook: str, latents: np.ndarray | None = None) -> pa.Table:
    """Examples of one hookpoint (buckets with a completion marker), bucket by bucket; with `latents`,
    only those latents' rows are kept, so memory is one bucket's part plus what is kept."""
    tables, bucket = [], 0
    wanted = None if latents is None else pa.array(np.asarray(latents, np.int32))
    while read_json_or_none(store, bucket_marker_key(hook, bucket)) is not None:
        t = store.read_part(examples_key(hook, bucket))
        tables.append(t if wanted is None else t.filter(pc.is_in(t["latent_id"], value_set=wanted)))
        bucket += 1
    return pa.concat_tables(tables) if tables else EXAMPLES_SCHEMA.empty_table()


def latents_with_examples(store: RunStore, hook: str, n_latents: int) -> np.ndarray:
    """A bool per latent: has at least one example. Reads only the latent_id column, bucket by bucket."""
    has, bucket = np.zeros(n_latents, bool), 0
    while read_json_or_none(store, bucket_marker_key(hook, bucket)) is not None:
        has[store.read_part(examples_key(hook, bucket), ["latent_id"])["latent_id"].to_numpy()] = True
        bucket += 1
    return has


def iter_stats(store: RunStore, hook: str, columns: list[str]):
    """latent_stats of one hookpoint, one row group at a time."""
    with store.fs.open(store.path(stats_key(hook)), "rb") as f:
        yield from pq.ParquetFile(f).iter_batches(columns=columns)


def scan_stats(store: RunStore, hook: str, has_examples: np.ndarray, max_latents: int):
    """One streamed pass: counts, the log10-density range of live latents, and the page latents
    (with examples, most active first, then by id), keeping at most max_latents candidates."""
    n_total, n_dead, lo, hi = 0, 0, np.inf, -np.inf
    best_id, best_n = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for batch in iter_stats(store, hook, ["latent_id", "n_active", "density", "is_dead"]):
        ids, n = batch.column("latent_id").to_numpy().astype(np.int64), batch.column("n_active").to_numpy()
        density = batch.column("density").to_numpy()
        n_total += len(ids)
        n_dead += int(np.asarray(batch.column("is_dead").to_numpy(zero_copy_only=False)).sum())
        live = density[density > 0]
        if len(live):
            lo, hi = min(lo, float(np.log10(live).min())), max(hi, float(np.log10(live).max()))
        keep = has_examples[ids]
        best_id, best_n = np.concatenate([best_id, ids[keep]]), np.concatenate([best_n, n[keep]])
        order = np.lexsort((best_id, -best_n))[:max_latents]
        best_id, best_n = best_id[order], best_n[order]
    return n_total, n_dead, (lo, hi), best_id


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
        with store.fs.open(store.path(stats_key(hook)), "rb") as f:
            meta = pq.ParquetFile(f).schema_arrow.metadata or {}
        lo2, hi2, _ = (float(x) for x in meta.get(b"histogram_edges_log2", b"-8,8,32").decode().split(","))
        has = latents_with_examples(store, hook, int(manifest["saes"][hook]["n_latents"]))
        n_total, n_dead, (dmin, dmax), chosen_ids = scan_stats(store, hook, has, max_latents)
        wanted = pa.array(chosen_ids.astype(np.int32))
        chosen = pa.concat_tables(
            [pa.Table.from_batches([b]).filter(pc.is_in(b.column("latent_id"), value_set=wanted))
             for b in iter_stats(store, hook, None)]).to_pandas()
        chosen = chosen.set_index("latent_id").loc[chosen_ids.tolist()].reset_index()  # page order
        examples = read_examples(store, hook, chosen_ids).to_pandas()
        folder = out / "latents" / hook
        folder.mkdir(parents=True, exist_ok=True)
        for row in chosen.to_dict("records"):
            row = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in row.items()}
            row = {k: (float(v) if isinstance(v, np.floating) else int(v) if isinstance(v, (np.integer, np.bool_)) else v)
                   for k, v in row.items()}
            page = latent_page(hook, row, examples[examples.latent_id == row["latent_id"]], tokenizer, (lo2, hi2))
            (folder / f"{row['latent_id']}.html").write_text(page, encoding="utf-8")
        pages[hook] = sorted(int(i) for i in chosen_ids)

        # Density histogram over log10(density) of the live latents (a second streamed pass); dead ones counted apart.
        lo, hi = (math.floor(dmin), math.ceil(dmax) or 0) if np.isfinite(dmin) else (-6, 0)
        counts = np.zeros(30, np.int64)
        for batch in iter_stats(store, hook, ["density"]):
            d = batch.column("density").to_numpy()
            counts += np.histogram(np.log10(d[d > 0]), bins=30, range=(lo, max(hi, lo + 1)))[0]
        svg = svg_bars(counts.tolist(), (f"1e{lo}", f"1e{max(hi, lo + 1)}"), title=f"density histogram {hook}")
        links = " ".join(f"<a href='latents/{hook}/{i}.html'>{i}</a>" for i in pages[hook])
        sections.append(
            f"<h2>{html.escape(hook)}</h2><p>{n_total} latents, {n_dead} dead, {len(pages[hook])} pages</p>"
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

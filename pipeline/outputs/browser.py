"""A static HTML latent browser for a post-processed run: open `index.html` from disk, no server.

    python -m pipeline.outputs.browser run_id=demo out=./browser [max_latents=200] [explanations=DELPHI_OUT]

index.html, per hookpoint: counts (latents, dead, active, with a page), a density histogram, and a
table with one row per latent that has a page: id, density, max activation, the five most frequent
activating tokens in its examples, its top promoted tokens (logit effects), and the delphi
explanation and score when given. Click a header to sort by that column; type in the filter box
to keep the latents that fire on or promote a token containing that text (or whose explanation
contains it). The table is sharded into `index/<hookpoint>/shard-NNNNN.js` files of
`index_shard_rows` rows: the first is loaded with the page, the rest only when a sort, a filter
or paging needs them, and only 100 rows are in the DOM at a time.

Why .js shards and not .json + fetch(): Chromium refuses fetch()/XHR of file:// URLs (each file
is its own opaque origin), and the browser must work when a user double-clicks index.html.
A <script src> of a sibling file is allowed from file://, so each shard is a script that calls
`LATENT_INDEX_ADD(hook, shard, rows)`. The same site works unchanged over http (python -m http.server).

latents/<hookpoint>/<id>.html: summary numbers, the explanation (delphi), the tokens the latent
promotes and suppresses (pipeline/outputs/logit_effects.py; the page says why when they were
skipped), a crosscoder's decoder-norm share per input (checkpoint or layer) as bars, from
latent_stats' `dec_norm_frac` column (also one sortable index column per input), the activation histogram over the fixed bins, quantiles,
and the top / quantile / random examples with tokens shaded by this latent's activation.

Pages go to the most active latents, at most `max_latents` per hookpoint
(`logit_effects.page_latents`, the same order post-processing computes logit effects in).
Work is one bucket of page latents at a time (its stats rows and logit effects), so memory
follows the bucket size and the number of pages, not the SAE width. The examples are stored by
reference: their windows are cut once for all pages (pipeline/outputs/windows.py, each contexts
and latents shard read once).
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
from pipeline.outputs.layout import (
    DEC_NORM_FRAC,
    DEC_NORM_INPUTS,
    MANIFEST_KEY,
    dictionary_ids,
    examples_key,
    logit_effects_key,
    logit_effects_state_key,
    stats_key,
)
from pipeline.outputs.logit_effects import page_latents
from pipeline.outputs.postprocess import read_json_or_none
from pipeline.outputs.sink import RunStore
from pipeline.outputs.windows import is_by_reference, read_windows

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "browser_assets"
DECODER_NORMS = DEC_NORM_FRAC  # a crosscoder's latent_stats column: decoder-norm share per input
N_TOKENS_INDEX = 5


def load_run_tokenizer(manifest: dict):
    """The run's tokenizer, or None (then tokens show as ids)."""
    try:
        from pipeline.model.loader import load_tokenizer

        return load_tokenizer(ModelConfig(**manifest["config"]["model"]))
    except Exception as err:  # noqa: BLE001 - a run made elsewhere may not have its model here
        log.warning(f"[browser] tokenizer not available ({type(err).__name__}: {err}); showing token ids")
        return None


class Vocab:
    """Token id -> display string, each id decoded once."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}
        self.spans, self.ready = np.full(0, None, object), np.zeros(0, bool)

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = f"#{i} " if self.tokenizer is None else self.tokenizer.decode([i])
        return s

    def many(self, ids) -> list[str]:
        return [self(int(i)) for i in ids]

    def quiet_spans(self, ids: np.ndarray) -> np.ndarray:
        """The example spans (object array) of these token ids where the latent is not active (most
        of a window), each id's built once and kept in a dense array indexed by id."""
        top = int(ids.max(initial=-1)) + 1
        if top > len(self.spans):
            grow = max(top, 2 * len(self.spans)) - len(self.spans)
            self.spans = np.concatenate([self.spans, np.full(grow, None, object)])
            self.ready = np.concatenate([self.ready, np.zeros(grow, bool)])
        if not self.ready[ids].all():  # a bool gather: the site's ids are usually all built already
            uniq = np.unique(ids)
            for i in uniq[~self.ready[uniq]].tolist():
                self.spans[i] = f'<span class="tok" title="0.000">{esc(self(i))}</span>'
            self.ready[uniq] = True
        return self.spans[ids]


# -- small HTML pieces --------------------------------------------------------------------------
def esc(s: object) -> str:
    return html.escape(str(s))


def chip(tok: str, cls: str = "") -> str:
    """A token as a chip: spaces and newlines made visible."""
    shown = tok.replace("\n", "⏎").replace(" ", "·") or "∅"
    return f'<span class="chip {cls}">{esc(shown)}</span>'


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
            f'aria-label="{esc(title)}">{bars}'
            f'<line x1="0" y1="{height - 20}" x2="{width}" y2="{height - 20}" stroke="#888"/>'
            f'<text x="0" y="{height - 5}" font-size="11">{esc(labels[0])}</text>'
            f'<text x="{width}" y="{height - 5}" font-size="11" text-anchor="end">{esc(labels[1])}</text></svg>')


def token_spans(toks: np.ndarray, acts: np.ndarray, scale: float, vocab: Vocab) -> np.ndarray:
    """Each token's span, shaded by this latent's activation: cached spans for the inactive tokens
    (most of a window, one array lookup), formatted ones for the few active."""
    spans = vocab.quiet_spans(toks)
    for j in np.flatnonzero(acts != 0).tolist():
        a, t = float(acts[j]), int(toks[j])
        style = f' style="background:rgba(230,80,30,{min(a / scale, 1.0) if scale > 0 else 0.0:.2f})"' if a > 0 else ""
        spans[j] = f'<span class="tok"{style} title="{a:.3f}">{esc(vocab(t))}</span>'
    return spans


def logit_html(effects: dict | None, skipped: str | None, vocab: Vocab) -> str:
    if effects is None:
        why = skipped or "not computed for this latent (post-processing computes them for the most active " \
                         "latents, logit_effects.max_latents)"
        return f'<section id="logits"><h2>logit effects</h2><p class="muted" id="logits-skipped">not available: {esc(why)}</p></section>'

    def column(kind: str, ids, vals) -> str:
        top = max((abs(float(v)) for v in vals), default=1.0) or 1.0
        rows = "".join(
            f'<tr class="{kind}"><td class="tokcell" data-id="{int(i)}">{chip(vocab(int(i)), kind)}</td>'
            f'<td class="bar"><span style="width:{abs(float(v)) / top * 100:.0f}%"></span></td>'
            f'<td class="num">{float(v):+.3f}</td></tr>' for i, v in zip(ids, vals))
        title = "promoted" if kind == "pos" else "suppressed"
        return f'<div class="lcol"><h3>{title}</h3><table class="logits" id="logits-{kind}">{rows}</table></div>'

    return ('<section id="logits"><h2>logit effects <span class="muted small">W_dec · diag(norm gain) · W_U</span></h2>'
            f'<div class="cols">{column("pos", effects["top_ids"], effects["top_logits"])}'
            f'{column("neg", effects["bottom_ids"], effects["bottom_logits"])}</div></section>')


def decoder_norm_html(norms: list[float] | None, labels: list[str]) -> str:
    """A crosscoder latent's decoder-norm share per input (checkpoint or layer), as bars of the
    whole (they sum to 1): absent for a dictionary without the `dec_norm_frac` column."""
    if norms is None:
        return ""
    rows = "".join(f'<tr><th>{esc(labels[i] if i < len(labels) else i)}</th><td class="bar">'
                   f'<span style="width:{v * 100:.1f}%"></span></td><td class="num">{v:.4f}</td></tr>'
                   for i, v in enumerate(norms))
    return ('<section id="decoder-norms"><h2>decoder-norm share per input <span class="muted small">'
            '||W_dec[l, input]|| / Σ ||W_dec[l, ·]||</span></h2>'
            f'<table class="logits">{rows}</table></section>')


def explanation_html(expl: dict | None) -> str:
    if not expl:
        return ""
    scores = " ".join(f'<span class="score">{esc(k)} {v:.2f}</span>' for k, v in sorted(expl["scores"].items()))
    return (f'<section id="explanation"><p class="expl">{esc(expl["text"])}</p>'
            f'<p class="muted small">delphi explanation {scores}</p></section>')


def latent_page(hook: str, stats: dict, examples: pa.Table, vocab: Vocab, edges_log2: tuple[float, float],
                effects: dict | None, skipped: str | None, expl: dict | None, norm_labels: list[str]) -> str:
    lid = stats["latent_id"]
    shown = ("n_active", "density", "max_act", "mean_act")
    cards = "".join(f'<div class="card"><div class="lab">{k}</div><div class="val">{stats[k]:.4g}</div></div>'
                    if isinstance(stats[k], float) else
                    f'<div class="card"><div class="lab">{k}</div><div class="val">{stats[k]:,}</div></div>' for k in shown)
    rows = "".join(f"<tr><th>{k}</th><td>{v:.6g}</td></tr>" if isinstance(v, float) else f"<tr><th>{k}</th><td>{v}</td></tr>"
                   for k, v in stats.items() if k not in ("quantiles", "histogram", DECODER_NORMS))
    quant = ", ".join(f"{q:.3g}" for q in stats["quantiles"])
    hist = svg_bars(stats["histogram"], (f"2^{edges_log2[0]:g}", f"2^{edges_log2[1]:g}"), title="activation histogram")
    scale = float(stats["max_act"]) or 1.0
    kinds, ranks, seqs = examples["kind"].to_pylist(), examples["rank"].to_pylist(), examples["seq_id"].to_pylist()
    tok_lists, act_lists = examples["token_ids"].combine_chunks(), examples["acts"].combine_chunks()
    off, a_off = tok_lists.offsets.to_numpy(), act_lists.offsets.to_numpy()  # the same lengths per row
    spans = token_spans(tok_lists.values.to_numpy()[off[0]:off[-1]], act_lists.values.to_numpy()[a_off[0]:a_off[-1]],
                        scale, vocab).tolist()
    off = (off - off[0]).tolist()
    sections = []
    for kind in ("top", "quantile", "random"):
        idx = sorted((r, i) for i, k in enumerate(kinds) if k == kind for r in (ranks[i],))
        body = "".join(f'<div class="ex"><span class="kind">{kind} #{r} · seq {seqs[i]}</span>'
                       f'{"".join(spans[off[i]:off[i + 1]])}</div>' for r, i in idx)
        sections.append(f"<h2>{kind} examples ({len(idx)})</h2>{body or '<p class=muted>none</p>'}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(hook)} latent {lid}</title>"
            f"<link rel='stylesheet' href='../../style.css'></head><body>"
            f"<nav><a href='../../index.html'>← index</a></nav>"
            f"<h1>{esc(hook)} · latent {lid}</h1>{explanation_html(expl)}<div class='cards'>{cards}</div>"
            f"{logit_html(effects, skipped, vocab)}{decoder_norm_html(stats.get(DECODER_NORMS), norm_labels)}"
            f"<div class='cols'><section><h2>activation histogram</h2>{hist}<p class='muted small'>quantiles: {quant}</p>"
            f"</section><section><h2>statistics</h2><table class='stats'>{rows}</table></section></div>"
            f"{''.join(sections)}</body></html>")


# -- inputs ---------------------------------------------------------------------------------------
def activating_tokens(examples: pa.Table, latents: np.ndarray, n: int = N_TOKENS_INDEX) -> dict[int, list[int]]:
    """Per latent, its n most frequent tokens at positions where it is active in its examples
    (ties to the lower token id); vectorized over one bucket's examples."""
    if examples.num_rows == 0:
        return {}
    tok_lists, act_lists = examples["token_ids"].combine_chunks(), examples["acts"].combine_chunks()
    toks = tok_lists.values.to_numpy().astype(np.int64)
    acts = act_lists.values.to_numpy()
    lengths = np.diff(tok_lists.offsets.to_numpy())
    lat = np.repeat(examples["latent_id"].to_numpy().astype(np.int64), lengths)
    keep = acts > 0
    keys, counts = np.unique((lat[keep] << 32) | toks[keep], return_counts=True)
    k_lat, k_tok = keys >> 32, keys & 0xFFFFFFFF
    order = np.lexsort((k_tok, -counts, k_lat))
    k_lat, k_tok = k_lat[order], k_tok[order]
    out: dict[int, list[int]] = {}
    starts = np.searchsorted(k_lat, latents)
    ends = np.searchsorted(k_lat, latents, side="right")
    for latent, s, e in zip(latents.tolist(), starts.tolist(), ends.tolist()):
        out[latent] = k_tok[s:min(e, s + n)].tolist()
    return out


def read_explanations(folder: str | Path | None, hook: str, latents: np.ndarray) -> dict[int, dict]:
    """delphi's files for these latents: explanations/<hook>_latent<N>.txt (a JSON string) and
    scores/<scorer>/<hook>_latent<N>.txt (a JSON list of ClassifierOutput: `activating`,
    `prediction`); the score shown is delphi's balanced accuracy (log/result_analysis.py)."""
    if not folder:
        return {}
    root = Path(folder)
    if not (root / "explanations").is_dir():
        raise FileNotFoundError(f"explanations={folder}: no explanations/ folder (delphi's output folder expected)")
    scorers = sorted(p for p in (root / "scores").iterdir() if p.is_dir()) if (root / "scores").is_dir() else []
    name = hook.replace("/", "--")
    out: dict[int, dict] = {}
    for latent in latents.tolist():
        path = root / "explanations" / f"{name}_latent{latent}.txt"
        if not path.exists():
            continue
        try:
            text = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not delphi's JSON-encoded explanation ({err})") from err
        scores = {}
        for scorer in scorers:
            spath = scorer / f"{name}_latent{latent}.txt"
            if spath.exists():
                scores[scorer.name] = balanced_accuracy(json.loads(spath.read_text(encoding="utf-8")), spath)
        out[latent] = {"text": str(text), "scores": {k: v for k, v in scores.items() if v is not None}}
    return out


def balanced_accuracy(outputs: list[dict], path: Path) -> float | None:
    """delphi's `accuracy` (compute_confusion + compute_classification_metrics, threshold 0.5)."""
    try:
        valid = [o for o in outputs if o.get("prediction") is not None]
        act = np.array([bool(o["activating"]) for o in valid])
        pred = np.array([float(o["prediction"]) >= 0.5 for o in valid])
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a delphi classifier score file ({err})") from err
    pos, neg = act.sum(), (~act).sum()
    if pos + neg == 0:
        return None
    tpr = (pred & act).sum() / pos if pos else 0.0
    tnr = (~pred & ~act).sum() / neg if neg else 0.0
    return float((tpr + tnr) / 2)


def read_logit_effects(store: RunStore, hook: str, bucket: int, latents: np.ndarray) -> dict[int, dict]:
    if not store.exists(logit_effects_key(hook, bucket)):
        return {}
    t = store.read_part(logit_effects_key(hook, bucket))
    t = t.filter(pc.is_in(t["latent_id"], value_set=pa.array(latents, pa.int32())))
    return {r["latent_id"]: r for r in t.to_pylist()}


# -- the site -------------------------------------------------------------------------------------
def index_js_name(hook: str) -> str:
    return hook.replace("/", "--")


def write_index_shards(folder: Path, hook: str, rows: list[list], shard_rows: int) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    n = max(1, -(-len(rows) // shard_rows))
    for s in range(n):
        body = json.dumps(rows[s * shard_rows:(s + 1) * shard_rows], separators=(",", ":"), ensure_ascii=False)
        (folder / f"shard-{s:05d}.js").write_text(f"LATENT_INDEX_ADD({json.dumps(hook)},{s},{body});\n", encoding="utf-8")
    return n


def density_svg(density: np.ndarray, hook: str) -> str:
    live = density[density > 0]
    logd = np.log10(live) if len(live) else np.zeros(0)
    lo, hi = (math.floor(logd.min()), math.ceil(logd.max()) or 0) if len(logd) else (-6, 0)
    counts, _ = np.histogram(logd, bins=30, range=(lo, max(hi, lo + 1)))
    return svg_bars(counts.tolist(), (f"1e{lo}", f"1e{max(hi, lo + 1)}"), title=f"density histogram {hook}")


def stats_rows(store: RunStore, hook: str, ids: np.ndarray) -> list[dict]:
    """latent_stats rows of `ids` (sorted), reading only the row groups that hold them: row i is latent i."""
    with store.fs.open(store.path(stats_key(hook)), "rb") as f:
        pf = pq.ParquetFile(f)
        starts = np.cumsum([0] + [pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = np.searchsorted(starts, ids, side="right") - 1
        rows = []
        for g in np.unique(groups).tolist():
            part = pf.read_row_group(g)
            rows += part.take(pa.array(ids[groups == g] - starts[g])).to_pylist()
    return rows


def page_examples(store: RunStore, hook: str, pages: np.ndarray, buckets: np.ndarray) -> dict[int, pa.Table]:
    """Per bucket, the page latents' examples with their windows (`token_ids`, `acts`): the rows of
    every bucket first (by reference, a few narrow columns), then ONE windows.read_windows call over
    all of them, so each contexts / latents shard is read once for the whole site. Memory: the
    pages' windows (about 90 x window x 8 bytes per page). Parts from before issue 23 keep theirs."""
    refs, out = [], {}
    for b in np.unique(buckets).tolist():
        ex = store.read_part(examples_key(hook, b))
        ex = ex.filter(pc.is_in(ex["latent_id"], value_set=pa.array(pages[buckets == b], pa.int32())))
        if is_by_reference(ex.schema):
            refs.append((b, ex))
        else:
            out[b] = ex
    if refs:
        cols = ["latent_id", "kind", "rank", "seq_id", "pos"]
        both = pa.concat_tables([ex.select(cols) for _, ex in refs]).replace_schema_metadata(refs[0][1].schema.metadata)
        both = read_windows(store, hook, both)
        at = 0
        for b, ex in refs:
            out[b] = both.slice(at, ex.num_rows)
            at += ex.num_rows
    return out


def build_hook(store: RunStore, out: Path, hook: str, max_latents: int, vocab: Vocab, explanations,
               bucket_size: int, shard_rows: int) -> tuple[list[int], dict]:
    # Whole columns only for what ranks pages (two numbers per latent); the pages' full rows
    # (quantiles, histogram) are read per bucket below from the row groups that hold them.
    table = store.read_part(stats_key(hook), ["n_active", "density"])
    with store.fs.open(store.path(stats_key(hook)), "rb") as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    lo2, hi2, _ = (float(x) for x in meta.get(b"histogram_edges_log2", b"-8,8,32").decode().split(","))
    norm_labels = json.loads(meta.get(DEC_NORM_INPUTS, b"[]").decode())
    n_active = table["n_active"].to_numpy()
    density = table["density"].to_numpy()
    order = page_latents(n_active, max_latents)  # page order: most active first
    pages = np.sort(order)
    state = read_json_or_none(store, logit_effects_state_key(hook)) or {}
    skipped = state.get("skipped") or (None if state else "post-processing wrote no logit effects for this run")
    if skipped:
        log.warning(f"[{store.run_id}] browser: logit effects for {hook} not shown: {skipped}")
    expls = read_explanations(explanations, hook, pages)
    folder = out / "latents" / hook
    folder.mkdir(parents=True, exist_ok=True)
    rows: dict[int, list] = {}
    buckets = pages // bucket_size
    examples = page_examples(store, hook, pages, buckets)
    for ex in examples.values():  # every token of the site's windows: its quiet span built once, here
        vocab.quiet_spans(ex["token_ids"].combine_chunks().values.to_numpy())
    for b in np.unique(buckets).tolist():
        ids = pages[buckets == b]
        stats = stats_rows(store, hook, ids)
        ex = examples[b].sort_by("latent_id")
        lat_col = ex["latent_id"].to_numpy()
        starts, ends = np.searchsorted(lat_col, ids), np.searchsorted(lat_col, ids, side="right")
        effects = {} if skipped else read_logit_effects(store, hook, b, ids)
        act_toks = activating_tokens(ex, ids)
        for latent, s, e, st in zip(ids.tolist(), starts.tolist(), ends.tolist(), stats):
            eff, expl = effects.get(latent), expls.get(latent)
            page = latent_page(hook, st, ex.slice(s, e - s), vocab, (lo2, hi2), eff, skipped, expl, norm_labels)
            (folder / f"{latent}.html").write_text(page, encoding="utf-8")
            promoted = vocab.many(eff["top_ids"][:N_TOKENS_INDEX]) if eff else []
            score = max(expl["scores"].values()) if expl and expl["scores"] else None
            rows[latent] = [latent, float(st["density"]), float(st["max_act"]), vocab.many(act_toks.get(latent, [])),
                            promoted, expl["text"] if expl else "", score]
            if st.get(DECODER_NORMS) is not None:  # a crosscoder: sortable per input in the index
                rows[latent].append([round(float(v), 4) for v in st[DECODER_NORMS]])
    ordered = [rows[i] for i in order.tolist()]
    n_shards = write_index_shards(out / "index" / index_js_name(hook), hook, ordered, shard_rows)
    n_dead = int((n_active == 0).sum())
    info = {"hook": hook, "dir": index_js_name(hook), "shards": n_shards, "rows": len(ordered),
            "latents": int(len(n_active)), "dead": n_dead, "active": int(len(n_active) - n_dead),
            "logits": skipped is None, "logits_note": skipped or "", "explanations": bool(expls), "norms": norm_labels,
            "svg": density_svg(density, hook)}
    return [int(i) for i in pages], info


def index_html(run_id: str, infos: list[dict], pages: dict[str, list[int]]) -> str:
    sections = []
    for i, info in enumerate(infos):
        hook = info["hook"]
        no_page = info["active"] - info["rows"]
        note = "" if info["logits"] else f"<p class='muted small' id='logits-note-{i}'>logit effects not shown: {esc(info['logits_note'])}</p>"
        sections.append(
            f"<section class='hook' data-hook='{i}'><h2>{esc(hook)}</h2>"
            f"<div class='cols'><div><div class='cards'>"
            f"<div class='card'><div class='lab'>latents</div><div class='val'>{info['latents']:,}</div></div>"
            f"<div class='card'><div class='lab'>dead</div><div class='val'>{info['dead']:,}</div></div>"
            f"<div class='card'><div class='lab'>active, no page</div><div class='val'>{no_page:,}</div></div>"
            f"<div class='card'><div class='lab'>pages</div><div class='val'>{info['rows']:,}</div></div></div>{note}"
            f"<form class='open' onsubmit=\"return go('{esc(hook)}')\"><input id='q-{esc(hook)}' placeholder='open latent id'>"
            f"<button>open</button> <span id='msg-{esc(hook)}' class='muted small'></span></form></div>"
            f"<div><p class='muted small'>latent density (log10, live latents)</p>{info['svg']}</div></div>"
            f"<div class='controls'><input class='filter' id='filter-{i}' placeholder='filter by token or explanation, e.g. repr' "
            f"autocomplete='off'><span class='status muted small' id='status-{i}'></span></div>"
            f"<table class='index' id='table-{i}'><thead><tr>"
            f"<th data-col='0'>latent</th><th data-col='1'>density</th><th data-col='2'>max act</th>"
            f"<th data-col='3'>fires on</th><th data-col='4'>promotes</th>"
            + ("<th data-col='5'>explanation</th><th data-col='6'>score</th>" if info["explanations"] else "")
            # A crosscoder's decoder-norm share per input: column 100 + j sorts by input j (browser.js).
            + "".join(f"<th data-col='{100 + j}' class='norm'>{esc(lab)}</th>" for j, lab in enumerate(info["norms"]))
            + f"</tr></thead><tbody></tbody></table><div class='pager' id='pager-{i}'></div></section>")
    meta = [{k: v for k, v in info.items() if k != "svg"} for info in infos]
    first = "".join(f"<script src='index/{info['dir']}/shard-00000.js'></script>" for info in infos if info["rows"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(run_id)} latents</title>"
            f"<link rel='stylesheet' href='style.css'>"
            f"<script>var PAGES={json.dumps(pages)};\nvar HOOKS={json.dumps(meta)};</script>"
            f"<script src='browser.js'></script>{first}</head>"
            f"<body><h1>run {esc(run_id)}</h1>{''.join(sections)}</body></html>")


def build_browser(store: RunStore, out: str | Path, max_latents: int = 200, tokenizer="auto",
                  explanations: str | Path | None = None, shard_rows: int = 2000) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = store.read_json(MANIFEST_KEY)
    if tokenizer == "auto":
        tokenizer = load_run_tokenizer(manifest)
    vocab = Vocab(tokenizer)
    bucket_size = _bucket_size(store, manifest)
    pages, infos = {}, []
    for hook in dictionary_ids(manifest):
        pages[hook], info = build_hook(store, out, hook, max_latents, vocab, explanations, bucket_size, shard_rows)
        infos.append(info)
    for name in ("style.css", "browser.js"):
        (out / name).write_text((ASSETS / name).read_text(encoding="utf-8"), encoding="utf-8")
    (out / "index.html").write_text(index_html(store.run_id, infos, pages), encoding="utf-8")
    log.info(f"[{store.run_id}] browser: {sum(map(len, pages.values()))} latent pages in {out}/index.html")
    return out / "index.html"


def _bucket_size(store: RunStore, manifest: dict) -> int:
    """The bucket size post-processing used (recorded in every bucket marker)."""
    from pipeline.outputs.layout import bucket_marker_key

    marker = read_json_or_none(store, bucket_marker_key(dictionary_ids(manifest)[0], 0))
    if marker is None:
        raise FileNotFoundError(f"{store.url}: not post-processed (no bucket markers); run pipeline.outputs.postprocess first")
    return int(marker["settings"]["bucket_size"])


def _main(cfg: BrowserConfig) -> None:
    build_browser(RunStore(cfg.sink, cfg.run_id), cfg.out, cfg.max_latents, explanations=cfg.explanations,
                  shard_rows=cfg.index_shard_rows)


main = command("browser", BrowserConfig, _main)


if __name__ == "__main__":
    main()

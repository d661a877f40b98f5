"""Examples by reference (issue 23): the one window reader (pipeline/outputs/windows.py) against the
per-example cutting the examples table stored before issue 23, kept here as the reference, on a
real tiny run (corpus -> Ray actors -> Parquet -> post-processing); examples parts in the old
format; the README's DuckDB recipe; each contexts / latents shard read once."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_pipeline_e2e import HOOKS
from test_postprocess_golden import CFG, real_run  # noqa: F401 - the module's run fixture

from pipeline.config import SinkConfig
from pipeline.outputs.layout import EXAMPLES_SCHEMA, examples_key
from pipeline.outputs.sink import RunStore
from pipeline.outputs.windows import cut_windows, is_by_reference, read_windows

pytestmark = pytest.mark.slow


def committed_parts(run: Path, prefix: str) -> list[Path]:
    out = []
    for marker in sorted((run / "_commits").glob("shard=*.json")):
        out += [run / f["path"] for f in json.loads(marker.read_text())["files"] if f["path"].startswith(prefix)]
    return out


def reference_windows(run: Path, hook: str, ex: pa.Table, W: int) -> tuple[pa.Array, pa.Array]:
    """The pre-issue-23 cutting, one example at a time in Python: context tokens [start, start + W)
    with start = clamp(pos - W // 2, 0, max(len - W, 0)), and the latent's activations at those
    positions (active pairs only, 0 elsewhere), as the old examples part stored them."""
    tokens = {}
    for p in committed_parts(run, "contexts/"):
        t = pq.read_table(p)
        tokens.update(zip(t["seq_id"].to_pylist(), t["token_ids"].to_pylist()))
    active = {}
    for p in committed_parts(run, f"latents/hookpoint={hook}/"):
        t = pq.read_table(p).to_pydict()
        for s, q, ids, acts in zip(t["seq_id"], t["pos"], t["latent_ids"], t["acts"]):
            for i, a in zip(ids, acts):
                if a > 0:
                    active[(i, s, q)] = max(a, active.get((i, s, q), 0.0))
    out_tok, out_act = [], []
    for lat, s, q in zip(ex["latent_id"].to_pylist(), ex["seq_id"].to_pylist(), ex["pos"].to_pylist()):
        toks = tokens[s]
        start = min(max(q - W // 2, 0), max(len(toks) - W, 0))
        out_tok.append(toks[start:start + W])
        out_act.append([float(np.float32(active.get((lat, s, start + i), 0.0))) for i in range(len(out_tok[-1]))])
    return pa.array(out_tok, pa.list_(pa.int32())), pa.array(out_act, pa.list_(pa.float32()))


def parts(run: Path, hook: str) -> list[Path]:
    return sorted((run / "examples" / f"hookpoint={hook}").rglob("part-0.parquet"))


@pytest.mark.parametrize("hook", HOOKS)
def test_reader_windows_are_byte_identical_to_the_old_per_example_cut(real_run, hook):  # noqa: F811
    run, _ = real_run
    store = RunStore(SinkConfig(root=str(run.parent)), run.name)
    for path in parts(run, hook):
        part = pq.read_table(path)
        assert part.schema.names == EXAMPLES_SCHEMA.names and is_by_reference(part.schema)
        meta = part.schema.metadata
        assert (meta[b"window"], meta[b"window_before"], meta[b"window_after"]) == (b"6", b"3", b"2")
        got = read_windows(store, hook, part)
        want_tok, want_act = reference_windows(run, hook, part, CFG.window)
        for name, want in (("token_ids", want_tok), ("acts", want_act)):
            have = got[name].combine_chunks()
            assert have.equals(want), (path, name)
            assert have.offsets.to_numpy().tobytes() == want.offsets.to_numpy().tobytes()
            assert have.values.to_numpy().tobytes() == want.values.to_numpy().tobytes()
        assert part.num_rows > 0 and got.num_rows == part.num_rows
        # the stored act is the window's act at the example's position
        start, acts = got["start"].to_numpy(), got["acts"].to_pylist()
        pos = got["pos"].to_numpy()
        assert [a[p - s] for a, p, s in zip(acts, pos, start)] == got["act"].to_pylist()


def test_reader_reads_each_needed_shard_once_in_any_row_order(real_run, monkeypatch):  # noqa: F811
    run, _ = real_run
    store = RunStore(SinkConfig(root=str(run.parent)), run.name)
    hook = HOOKS[0]
    ex = pa.concat_tables([pq.read_table(p) for p in parts(run, hook)])
    ex = ex.take(pa.array(np.random.default_rng(0).permutation(ex.num_rows)))  # rows in no shard order
    reads: list[str] = []
    real = RunStore.read_committed_part

    def counting(self, shard, key, *args, **kwargs):
        reads.append(key)
        return real(self, shard, key, *args, **kwargs)

    monkeypatch.setattr(RunStore, "read_committed_part", counting)
    got = read_windows(store, hook, ex, shard_size=int(store.read_json("manifest.json")["shard_size"]))
    monkeypatch.undo()
    assert len(reads) == len(set(reads))  # each contexts / latents part at most once
    shards = {int(s) // 3 for s in ex["seq_id"].to_pylist()}  # tiny run: shard_size 3
    assert {k.split("shard=")[1][:6] for k in reads} == {f"{s:06d}" for s in shards}
    want_tok, want_act = reference_windows(run, hook, ex, CFG.window)
    assert got["token_ids"].combine_chunks().equals(want_tok) and got["acts"].combine_chunks().equals(want_act)


def test_clipped_windows_for_the_demo(real_run):  # noqa: F811
    """shift=False (the demo's printout): `before` / `after` tokens around pos, cut at the edges."""
    run, _ = real_run
    store = RunStore(SinkConfig(root=str(run.parent)), run.name)
    ctx = pq.read_table(committed_parts(run, "contexts/")[0])
    seq = np.repeat(ctx["seq_id"].to_numpy(), 3)
    lens = np.repeat([len(t) for t in ctx["token_ids"].to_pylist()], 3)
    pos = np.stack([np.zeros(len(ctx), int), np.full(len(ctx), 5), lens[::3] - 1], 1).reshape(-1)
    start, offsets, tokens, acts = cut_windows(store, seq, pos, 3, before=4, after=1, shift=False)
    assert acts is None
    by_seq = dict(zip(ctx["seq_id"].to_pylist(), ctx["token_ids"].to_pylist()))
    for i, (s, p) in enumerate(zip(seq.tolist(), pos.tolist())):
        want = by_seq[s][max(0, p - 4):p + 2]
        assert tokens[offsets[i]:offsets[i + 1]].tolist() == want and start[i] == max(0, p - 4)


def test_parts_written_before_issue_23_are_read_as_stored(real_run, tmp_path):  # noqa: F811
    """An old examples part (token_ids and acts per row, no act) is detected and its stored windows
    used; the browser's pages from it equal those from the by-reference part."""
    from pipeline.outputs.browser import build_browser

    run, _ = real_run
    copy = tmp_path / run.name
    shutil.copytree(run, copy)
    store = RunStore(SinkConfig(root=str(tmp_path)), run.name)
    hook = HOOKS[0]
    new_site = build_browser(store, tmp_path / "new", max_latents=40, tokenizer=None).parent
    key = examples_key(hook, 0)
    part = pq.read_table(copy / key)
    tok, act = reference_windows(copy, hook, part, CFG.window)
    old = part.drop_columns(["act"]).append_column("token_ids", tok).append_column("acts", act)
    pq.write_table(old, copy / key)
    assert not is_by_reference(old.schema) and read_windows(store, hook, old).equals(old)
    old_site = build_browser(store, tmp_path / "old", max_latents=40, tokenizer=None).parent
    pages = sorted((new_site / "latents" / hook).glob("*.html"))
    assert len(pages) == 40 and any(int(p.stem) < CFG.bucket_size for p in pages)
    for p in pages:
        assert (old_site / "latents" / hook / p.name).read_text() == p.read_text(), p.name
    for p in sorted((new_site / "index").rglob("*.js")):
        assert (old_site / p.relative_to(new_site)).read_text() == p.read_text()


def readme_windows_sql() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(b for b in readme.split("```sql\n")[1:] if "parquet_kv_metadata" in b).split("```")[0]


@pytest.mark.parametrize("hook", HOOKS)
def test_readme_duckdb_recipe_gives_the_readers_windows(real_run, hook):  # noqa: F811
    import duckdb

    run, _ = real_run
    store = RunStore(SinkConfig(root=str(run.parent)), run.name)
    sql = readme_windows_sql().replace("out/demo", str(run)).replace("layers.12", hook)
    got = duckdb.connect().sql(sql).to_arrow_table()
    ex = pa.concat_tables([pq.read_table(p) for p in parts(run, hook)])
    want = read_windows(store, hook, ex).sort_by([("latent_id", "ascending"), ("kind", "ascending"), ("rank", "ascending")])
    assert got.num_rows == want.num_rows > 0
    for col in ("latent_id", "kind", "rank", "seq_id", "pos", "act", "start", "token_ids", "acts"):
        assert got[col].to_pylist() == want[col].to_pylist(), col

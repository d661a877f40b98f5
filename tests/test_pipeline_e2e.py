"""The whole product path on one machine: corpus files -> local Ray actors -> Parquet -> read back.

Real components: a tiny random-weight Llama saved to disk, a tokenizer trained in conftest,
corpus files, a local Ray instance, the project's own SAE format.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ClusterConfig, CorpusConfig, ModelConfig, RunConfig, SAEConfig, SinkConfig
from pipeline.outputs.layout import CONTEXTS_SCHEMA, latents_schema

pytestmark = pytest.mark.slow

HOOKS = ["layers.1", "layers.2"]


def make_cfg(model_dir, corpus_dir, sae_dir, out_dir, run_id="r1", shard_size=3, cluster=None,
             **corpus_overrides) -> RunConfig:
    """The tiny model + tiny corpus + random SAEs at HOOKS, on two local CPU workers."""
    return RunConfig(
        run_id=run_id,
        model=ModelConfig(name="tiny-llama", path=str(model_dir), gguf_file=None, dtype="float32", batch_size=4),
        sae=SAEConfig(name="random", path=str(sae_dir) + "/{hookpoint}", hookpoints=list(HOOKS)),
        corpus=CorpusConfig(name="tiny", paths=[str(corpus_dir)], ctx_len=16, shard_size=shard_size,
                            **corpus_overrides),
        sink=SinkConfig(root=str(out_dir)),
        # reuse_workers: a test's later runs take the workers its first run started (conftest ends
        # them after the test); a run that loads something else starts its own.
        cluster=ClusterConfig(**{"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1, "max_in_flight": 1,
                                 "reuse_workers": True, **(cluster or {})}),
    )


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def first_run(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path_factory, ray_local):
    from pipeline.runtime.driver import run

    out = tmp_path_factory.mktemp("out")
    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, out)
    summary = run(cfg)
    return cfg, summary, out / cfg.run_id


def test_output_matches_design_schema(first_run):
    cfg, summary, root = first_run
    assert summary.shards_done > 1 and summary.tokens > 0
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["hookpoints"] == HOOKS
    assert manifest["ctx_len"] == 16 and manifest["model"]["sha256"] and all(s["sha256"] for s in manifest["saes"].values())
    commits = sorted((root / "_commits").glob("shard=*.json"))
    assert len(commits) == summary.shards_done
    for commit in commits:
        entry = json.loads(commit.read_text())
        for f in entry["files"]:
            data = (root / f["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    ctx = pq.read_table(root / "contexts")
    assert ctx.schema.remove_metadata().equals(CONTEXTS_SCHEMA.append(pa.field("shard", ctx.schema.field("shard").type)))
    for hook in HOOKS:
        lat = pq.read_table(root / "latents" / f"hookpoint={hook}")
        base = lat.drop_columns(["shard"]).schema.remove_metadata()
        assert base.equals(latents_schema(8)), base


def test_every_token_appears_exactly_once_per_hookpoint(first_run):
    cfg, summary, root = first_run
    ctx = pq.read_table(root / "contexts").to_pandas()
    expected = {(int(s), p) for s, toks in zip(ctx.seq_id, ctx.token_ids) for p in range(len(toks))}
    assert sum(len(t) for t in ctx.token_ids) == summary.tokens
    for hook in HOOKS:
        lat = pq.read_table(root / "latents" / f"hookpoint={hook}", columns=["seq_id", "pos"]).to_pandas()
        pairs = list(zip(lat.seq_id.astype(int), lat.pos.astype(int)))
        assert len(pairs) == len(set(pairs)) == len(expected)
        assert set(pairs) == expected
    assert (ctx.seq_id // cfg.corpus.shard_size).tolist() == ctx["shard"].astype(str).str[-6:].astype(int).tolist()


def test_reads_back_with_pandas_and_duckdb(first_run):
    import duckdb

    _, summary, root = first_run
    lat = pq.read_table(root / "latents" / "hookpoint=layers.1").to_pandas()
    assert len(lat) == summary.tokens and len(lat.latent_ids.iloc[0]) == 8
    con = duckdb.connect()
    n, max_id = con.execute(
        f"SELECT count(*), max(list_max(latent_ids)) FROM read_parquet('{root}/latents/hookpoint=layers.1/*/*.parquet')"
    ).fetchone()
    assert n == summary.tokens and 0 <= max_id < 96
    (n_ctx,) = con.execute(f"SELECT count(*) FROM read_parquet('{root}/contexts/*/*.parquet')").fetchone()
    assert n_ctx == len(pq.read_table(root / "contexts"))


def test_latents_equal_direct_encode_of_the_models_hidden_states(first_run, tiny_model_dir, tiny_sae_dir):
    from transformers import AutoModelForCausalLM

    from pipeline.sae.formats import load_sae

    _, _, root = first_run
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ctx = pq.read_table(root / "contexts").to_pandas().sort_values("seq_id")
    row = ctx.iloc[1]
    ids = torch.tensor([list(row.token_ids)])
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states
    for hook, layer in (("layers.1", 2), ("layers.2", 3)):
        sae = load_sae(Path(tiny_sae_dir) / hook)
        values, latent_ids = sae.encode(hidden[layer][0])
        lat = pq.read_table(root / "latents" / f"hookpoint={hook}").to_pandas()
        lat = lat[lat.seq_id == row.seq_id].sort_values("pos")
        assert np.array_equal(np.stack(lat.latent_ids.to_numpy()), latent_ids.numpy())
        np.testing.assert_allclose(np.stack(lat.acts.to_numpy()).astype(np.float32),
                                   values.half().float().numpy(), rtol=1e-3, atol=1e-3)


def test_rerun_does_no_work_and_changes_no_file(first_run):
    from pipeline.runtime.driver import run

    cfg, _, root = first_run
    before = snapshot(root)
    again = run(cfg)
    assert again.shards_done == 0 and again.shards_skipped > 0 and again.tokens == 0
    assert snapshot(root) == before


def test_same_config_twice_gives_identical_latents(first_run):
    from pipeline.runtime.driver import run

    cfg, _, root = first_run
    other = RunConfig(**{**cfg.__dict__, "run_id": "r2"})
    run(other)
    for sub in ["contexts"] + [f"latents/hookpoint={h}" for h in HOOKS]:
        a = sorted((root / sub).rglob("*.parquet"))
        b = sorted((root.parent / "r2" / sub).rglob("*.parquet"))
        assert [p.relative_to(root) for p in a] == [p.relative_to(root.parent / "r2") for p in b]
        for pa_, pb in zip(a, b):
            assert pq.read_table(pa_).equals(pq.read_table(pb)), pa_


def readme_committed_latents_sql() -> str:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(b for b in readme.split("```sql\n")[1:] if "_commits" in b).split("```")[0]


def test_uncommitted_parts_are_ignored_by_readers(first_run):
    """A complete, readable part without its commit marker (a worker died between writing its
    parts and committing) is seen by a plain glob, and by neither read_committed nor the
    README's DuckDB recipe."""
    import shutil

    import duckdb

    from pipeline.outputs.sink import RunStore

    cfg, summary, root = first_run
    hook_dir = root / "latents" / "hookpoint=layers.1"
    stray = hook_dir / "shard=999999"
    stray.mkdir(parents=True)
    shutil.copy(hook_dir / "shard=000000" / "part-0.parquet", stray / "part-0.parquet")
    stray_rows = pq.read_metadata(stray / "part-0.parquet").num_rows
    try:
        committed = RunStore(cfg.sink, cfg.run_id).read_committed("latents", "layers.1")
        assert committed.num_rows == summary.tokens
        con = duckdb.connect()
        glob = f"{root}/latents/hookpoint=layers.1/*/*.parquet"
        (naive,) = con.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0]
        assert naive == summary.tokens + stray_rows  # the hazard the recipe exists for
        sql = readme_committed_latents_sql().replace("out/demo", str(root)).replace("layers.12", "layers.1")
        got = con.sql(f"select * from ({sql}) order by seq_id, pos").to_arrow_table()
        want = committed.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
        assert got.column_names == want.column_names + ["hookpoint", "shard"]  # DuckDB adds hive partitions
        assert got.select(want.column_names).to_pylist() == want.to_pylist()
        assert set(got.column("shard").to_pylist()) == {f"{s:06d}" for s in range(summary.shards_done)}
    finally:
        shutil.rmtree(stray)


def harvest_actors() -> dict[str, str]:
    """Every harvest actor this Ray has had, by id: its state in Ray's own record (the GCS)."""
    from ray._private.state import actors

    return {a["ActorID"]: a["State"] for a in actors().values() if a["ActorClassName"] == "HarvestActor"}


@pytest.mark.own_workers  # counts the actors it starts
def test_a_later_run_takes_the_workers_an_earlier_one_kept(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path,
                                                           ray_local):
    """cluster.reuse_workers (on in `make_cfg`): the next run in this driver that loads the same
    model and dictionaries binds the kept workers to itself instead of starting new ones, and writes
    exactly what new workers wrote; post-processing in this driver ends them first, since they hold
    the CPUs its tasks need (without that it waits for ever: hence the thread)."""
    import threading

    from pipeline.config import PostprocessConfig
    from pipeline.outputs.postprocess import postprocess
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.driver import run

    before = set(harvest_actors())
    run(make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path / "a", "first"))
    started = set(harvest_actors()) - before
    assert len(started) == 2
    second = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path / "b", "second")
    assert run(second).shards_done > 0
    now = harvest_actors()
    assert set(now) - before == started and all(now[a] == "ALIVE" for a in started), "new workers were started"

    done = threading.Event()
    threading.Thread(target=lambda: (postprocess(RunStore(second.sink, "second"),
                                                 PostprocessConfig(run_id="second", sink=second.sink, bucket_size=32)),
                                     done.set()), daemon=True).start()
    assert done.wait(timeout=180), "post-processing never got the CPUs the kept workers hold"
    assert all(harvest_actors()[a] == "DEAD" for a in started)

    # What the kept workers wrote for "second" is what new ones wrote for "first" (the run id is not
    # in the data: test_same_config_twice_gives_identical_latents).
    for sub in ["contexts"] + [f"latents/hookpoint={h}" for h in HOOKS]:
        kept_parts = sorted((tmp_path / "b" / "second" / sub).rglob("*.parquet"))
        new_parts = sorted((tmp_path / "a" / "first" / sub).rglob("*.parquet"))
        assert len(kept_parts) == len(new_parts) > 0, sub
        for a, b in zip(kept_parts, new_parts):
            assert pq.read_table(a).equals(pq.read_table(b)), a

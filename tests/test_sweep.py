"""Sweeps and the token cache.

Fast: the cache replays exactly plan_shards' shards (cold, warm, under max_tokens, with
quarantined lines), and sweep members get distinct run ids.
Slow: a real 2-member Hydra sweep (`-m`, basic launcher, members run one after another in this
process, each calling run()) on the tiny model: two run folders, and the second member
tokenized nothing (every corpus file was a token-cache hit).
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest

from pipeline.__main__ import member_run_id
from pipeline.config import CorpusConfig
from pipeline.data import token_cache
from pipeline.data.corpus import resolve_corpus
from pipeline.data.packing import plan_shards
from pipeline.data.token_cache import cached_plan_shards


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture()
def corpus(tiny_corpus, tmp_path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, folder)
    with open(folder / "c.jsonl", "w") as f:  # a quarantined line between good documents
        f.write(json.dumps({"text": "first good document " * 5}) + "\n{not json\n")
        f.write(json.dumps({"text": "second good document " * 5}) + "\n")
    return folder


def _plan(fn, files, cfg, tok, first_shard=0):
    quarantined = []
    shards = list(fn(files, cfg, tok, tok.eos_token_id, on_quarantine=quarantined.append, first_shard=first_shard))
    flat = [(s.shard_id, s.seq_start, s.file_index, s.file_url,
             [(c.doc_id, c.doc_offset, c.token_ids.tolist()) for c in s.contexts]) for s in shards]
    for s in shards:
        assert all(c.token_ids.dtype == np.int32 for c in s.contexts)
    return flat, [asdict(q) for q in quarantined]


@pytest.mark.parametrize("max_tokens", [None, 150, 10_000])
def test_cache_replays_exactly_the_shard_plan(corpus, tokenizer, tmp_path, max_tokens):
    cfg = CorpusConfig(paths=[str(corpus)], ctx_len=16, shard_size=3, max_tokens=max_tokens,
                       token_cache=str(tmp_path / "tokens"))
    files = resolve_corpus(cfg)
    expected, expected_q = _plan(plan_shards, files, cfg, tokenizer, first_shard=5)
    assert expected and (max_tokens == 150 or expected_q)
    before = dict(token_cache.stats)
    cold = _plan(cached_plan_shards, files, cfg, tokenizer, first_shard=5)
    warm = _plan(cached_plan_shards, files, cfg, tokenizer, first_shard=5)
    assert cold == warm == (expected, expected_q)
    n_files = len({s[2] for s in expected})
    assert token_cache.stats["hits"] - before["hits"] == n_files  # the warm pass tokenized nothing
    # A smaller budget reuses the entries; a larger one than a partial entry holds re-tokenizes.
    if max_tokens == 150:
        bigger = replace(cfg, max_tokens=400)
        assert _plan(cached_plan_shards, files, bigger, tokenizer) == _plan(plan_shards, files, bigger, tokenizer)


def test_cache_key_changes_with_what_changes_tokens(corpus, tokenizer, tmp_path):
    cfg = CorpusConfig(paths=[str(corpus)], ctx_len=16, shard_size=3, token_cache=str(tmp_path / "tokens"))
    files = resolve_corpus(cfg)
    _plan(cached_plan_shards, files, cfg, tokenizer)
    for changed in (replace(cfg, ctx_len=8), replace(cfg, shard_size=2)):
        assert _plan(cached_plan_shards, files, changed, tokenizer) == _plan(plan_shards, files, changed, tokenizer)
    (corpus / "b.txt").write_text("an edited file must not be served from the old entry " * 3)
    files = resolve_corpus(cfg)
    assert _plan(cached_plan_shards, files, cfg, tokenizer) == _plan(plan_shards, files, cfg, tokenizer)
    assert not list((tmp_path / "tokens").glob(".*"))  # no temp entries left behind


def test_sweep_members_get_distinct_readable_run_ids():
    swept = {"sae", "sae.hookpoints"}
    task = ["model.path=/m", "sae=demo", "sae.hookpoints=[layers.4]", "run_id=sw"]
    assert member_run_id("sw", task, swept) == "sw--sae.hookpoints=layers.4,sae=demo"
    other = member_run_id("sw", ["model.path=/m", "sae=demo", "sae.hookpoints=[layers.8]"], swept)
    assert other == "sw--sae.hookpoints=layers.8,sae=demo"
    assert "/" not in member_run_id("sw", ["corpus.paths=[s3://b/x/*.jsonl]"], {"corpus.paths"})
    assert member_run_id("sw", ["hydra.verbose=true"], set()) == "sw"


@pytest.mark.slow
def test_two_member_sweep_writes_two_runs_and_tokenizes_once(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path,
                                                              ray_local, monkeypatch):
    import pipeline.__main__ as app
    import pipeline.runtime.driver

    # No stand-in for the planner: the token cache's hit/miss counters below are only touched if
    # run() really plans through the cache (pipeline.data.token_cache.cached_plan_shards).
    out, tokens = tmp_path / "out", tmp_path / "tokens"
    args = [
        "-m", "experiment=none", "run_id=sw", f"model.path={tiny_model_dir}", "model.gguf_file=null",
        "model.dtype=float32", "model.batch_size=4", f"sae.path='{tiny_sae_dir}/{{hookpoint}}'",
        "sae.hookpoints=[layers.1],[layers.2]", "corpus=files", f"corpus.paths=[{tiny_corpus}]",
        "corpus.ctx_len=16", "corpus.shard_size=3", f"corpus.token_cache={tokens}", f"sink.root={out}",
        "cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.torch_threads=1",
    ]
    monkeypatch.setattr(sys, "argv", ["pipeline", *args])
    monkeypatch.setattr(token_cache, "stats", {"hits": 0, "misses": 0})
    seen = []
    real_run = pipeline.runtime.driver.run

    def spy(cfg, *a, **kw):
        before = dict(token_cache.stats)
        summary = real_run(cfg, *a, **kw)
        seen.append((cfg.run_id, token_cache.stats["hits"] - before["hits"],
                     token_cache.stats["misses"] - before["misses"], summary.shards_done))
        return summary

    monkeypatch.setattr(pipeline.runtime.driver, "run", spy)
    try:
        app.main()
    except SystemExit as err:  # Hydra exits only on errors
        pytest.fail(f"sweep exited with {err.code}")

    n_files = len(resolve_corpus(CorpusConfig(paths=[str(tiny_corpus)])))
    ids = ["sw--sae.hookpoints=layers.1", "sw--sae.hookpoints=layers.2"]
    assert [s[0] for s in seen] == ids
    assert seen[0][2] == n_files and seen[1][1] == n_files and seen[1][2] == 0  # member 2: all hits
    for run_id, hook in zip(ids, ["layers.1", "layers.2"]):
        root = out / run_id
        manifest = json.loads((root / "manifest.json").read_text())
        assert manifest["status"] == "complete" and manifest["hookpoints"] == [hook]
        assert len(list((root / "_commits").glob("shard=*.json"))) == seen[0][3] > 0
        assert (root / "latents" / f"hookpoint={hook}").is_dir()
        summary = json.loads((root / "summary.json").read_text())
        assert summary["run_id"] == run_id and summary["shards_new"] == seen[0][3] and summary["tokens"] > 0


def test_run_summary_is_written_only_when_something_happened(tmp_path):
    from pipeline.config import SinkConfig
    from pipeline.outputs.sink import RunStore
    from pipeline.runtime.summary import RunSummary, summary_record, write_run_summary

    store = RunStore(SinkConfig(root=str(tmp_path)), "r")
    idle = RunSummary("r", store.url, shards_skipped=4, seconds=0.5, hookpoints=["layers.1"])
    assert write_run_summary(store, summary_record(idle)) is None and not (tmp_path / "r").exists()
    busy = RunSummary("r", store.url, shards_done=2, tokens=1000, seconds=2.0, quarantined=1, hookpoints=["layers.1"])
    key = write_run_summary(store, summary_record(busy))
    record = json.loads((tmp_path / "r" / key).read_text())
    assert record == json.loads((tmp_path / "r" / "summary.json").read_text())
    assert record["shards_new"] == 2 and record["shards_skipped"] == 0 and record["quarantined"] == 1
    assert record["tokens_per_second"] == 500.0 and record["status"] == "complete" and key.startswith("_runs/")


@pytest.mark.slow
def test_nightly_preset_exits_nonzero_when_a_document_is_quarantined(tiny_model_dir, tiny_sae_dir, corpus, tmp_path,
                                                                     ray_local, monkeypatch):
    import pipeline.__main__ as app

    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [
        "pipeline", "experiment=nightly", "cluster=local", "sink=local", f"sink.root={out}",
        "cluster.num_workers=1", "cluster.cpus_per_worker=1", "cluster.torch_threads=1",
        f"model.path={tiny_model_dir}", "model.gguf_file=null", "model.dtype=float32", "model.batch_size=4",
        f"sae.path='{tiny_sae_dir}/{{hookpoint}}'", "sae.hookpoints=[layers.1]", f"corpus.paths=[{corpus}]",
        "corpus.ctx_len=16", "corpus.shard_size=3", f"corpus.token_cache={tmp_path / 'tokens'}",
    ])
    with pytest.raises(SystemExit) as exit_info:
        app.main()
    assert exit_info.value.code not in (None, 0) and "quarantined" in str(exit_info.value.code)
    summary = json.loads((out / "nightly" / "summary.json").read_text())
    assert summary["quarantined"] >= 1 and summary["shards_new"] > 0
    assert len(list((out / "nightly" / "_runs").glob("*.json"))) == 1


def test_a_failed_run_exits_nonzero_and_records_why(tmp_path):
    import os
    import subprocess

    out = subprocess.run([sys.executable, "-m", "pipeline", "experiment=nightly", "cluster=local", "sink=local",
                          f"sink.root={tmp_path}", f"corpus.paths=[{tmp_path / 'missing'}/*.jsonl]"],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert out.returncode != 0, out.stdout
    summary = json.loads((tmp_path / "nightly" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failures"] == 1 and "missing" in summary["error"]

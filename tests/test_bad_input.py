"""Bad input stops the run before any work with an error naming the file or setting, or, for a
single unreadable document, quarantines it (recorded in the manifest) and loses nothing else."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ClusterConfig, CorpusConfig, ModelConfig, RunConfig, SAEConfig, SinkConfig
from pipeline.sae.sae import random_sae


def cfg_for(model_dir, corpus_paths, sae_path, out, hooks=("layers.1",), run_id="bad") -> RunConfig:
    return RunConfig(
        run_id=run_id,
        model=ModelConfig(name="tiny-llama", path=str(model_dir), gguf_file=None, dtype="float32", batch_size=4),
        sae=SAEConfig(path=str(sae_path), hookpoints=list(hooks)),
        corpus=CorpusConfig(paths=[str(p) for p in corpus_paths], ctx_len=16, shard_size=4),
        sink=SinkConfig(root=str(out)),
        cluster=ClusterConfig(num_workers=1, cpus_per_worker=1, torch_threads=1),
    )


def assert_no_output(out: Path) -> None:
    assert not any(out.rglob("*.parquet")) and not any(out.rglob("manifest.json"))


def test_missing_corpus_path(tiny_model_dir, tiny_sae_dir, tmp_path):
    from pipeline.data.corpus import CorpusError
    from pipeline.runtime.driver import run

    missing = tmp_path / "nope" / "corpus.jsonl"
    with pytest.raises(CorpusError, match="nope/corpus.jsonl"):
        run(cfg_for(tiny_model_dir, [missing], tiny_sae_dir / "layers.1", tmp_path / "out"))
    assert_no_output(tmp_path / "out")


def test_empty_corpus(tiny_model_dir, tiny_sae_dir, tmp_path):
    from pipeline.data.corpus import CorpusError
    from pipeline.runtime.driver import run

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(CorpusError, match="empty"):
        run(cfg_for(tiny_model_dir, [tmp_path / "empty.txt"], tiny_sae_dir / "layers.1", tmp_path / "out"))
    assert_no_output(tmp_path / "out")


def test_unknown_hookpoint_lists_valid_ones(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path):
    from pipeline.model.hookpoints import HookpointError
    from pipeline.runtime.driver import run

    with pytest.raises(HookpointError, match=r"layers\.9.*layers\.0 \.\. layers\.3"):
        run(cfg_for(tiny_model_dir, [tiny_corpus], tiny_sae_dir / "layers.1", tmp_path / "out", hooks=("layers.9",)))
    assert_no_output(tmp_path / "out")


def test_sae_width_differs_from_model(tiny_model_dir, tiny_corpus, tmp_path):
    from pipeline.runtime.driver import run
    from pipeline.runtime.preflight import ConfigMismatch

    random_sae(48, 64, 4).save(tmp_path / "wide")
    with pytest.raises(ConfigMismatch, match=r"d_in=48.*hidden_size=32"):
        run(cfg_for(tiny_model_dir, [tiny_corpus], tmp_path / "wide", tmp_path / "out"))
    assert_no_output(tmp_path / "out")


@pytest.mark.slow
def test_non_utf8_document_is_quarantined_and_the_rest_is_kept(tiny_model_dir, tiny_sae_dir, tmp_path, ray_local):
    import pyarrow.parquet as pq

    from pipeline.runtime.driver import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    good = [json.dumps({"text": f"document number {i} is fine"}).encode() for i in range(6)]
    lines = good[:3] + [b'{"text": "broken \xff\xfe bytes"}'] + good[3:]
    (corpus / "docs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (corpus / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (corpus / "ok.txt").write_text("plain text that is perfectly readable " * 4)
    cfg = cfg_for(tiny_model_dir, [corpus], tiny_sae_dir / "layers.1", tmp_path / "out")
    summary = run(cfg)
    manifest = json.loads((tmp_path / "out" / "bad" / "manifest.json").read_text())
    where = {(Path(q["file"]).name, q["location"]) for q in manifest["quarantined"]}
    assert ("docs.jsonl", "line 4") in where
    assert any(name == "latin1.txt" for name, _ in where)
    assert summary.quarantined == len(manifest["quarantined"]) == 2
    ctx = pq.read_table(tmp_path / "out" / "bad" / "contexts").to_pandas()
    docs = set(ctx.doc_id)
    assert all(any(f"docs.jsonl:{n}" in d for d in docs) for n in (1, 2, 3, 5, 6, 7))
    assert any(d.endswith("ok.txt") for d in docs)


@pytest.mark.slow
def test_huge_single_document_is_streamed(tiny_model_dir, tiny_sae_dir, tmp_path, ray_local):
    import pyarrow.parquet as pq

    from pipeline.runtime.driver import run

    corpus = tmp_path / "huge"
    corpus.mkdir()
    (corpus / "one.txt").write_text("all work and no play makes a dull model " * 20_000)  # ~800 kB, one document
    cfg = cfg_for(tiny_model_dir, [corpus], tiny_sae_dir / "layers.1", tmp_path / "out", run_id="huge")
    cfg.corpus.read_chars = 4096  # pieces far smaller than the document
    cfg.corpus.max_tokens = 3000
    summary = run(cfg)
    ctx = pq.read_table(tmp_path / "out" / "huge" / "contexts").to_pandas()
    assert set(ctx.doc_id) == {str(corpus / "one.txt")}  # one document, every context from it
    assert summary.tokens >= 3000 and ctx.doc_offset.is_monotonic_increasing


def test_unknown_hookpoint_stops_before_the_demo_sae_is_fitted(tiny_model_dir, tiny_corpus, tmp_path):
    import shutil

    from pipeline.config import TrainSAEConfig
    from pipeline.model.hookpoints import HookpointError
    from pipeline.runtime.driver import run

    # Config and tokenizer but no weights: loading the model (to fit an SAE) would fail with
    # another error, so a HookpointError proves the check ran before any model was loaded.
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    for weights in model_dir.glob("*.safetensors"):
        weights.unlink()
    cfg = cfg_for(model_dir, [tiny_corpus], "", tmp_path / "out", hooks=("layers.12",))
    cfg.sae = SAEConfig(path="", hookpoints=["layers.12"], train=TrainSAEConfig(cache_dir=str(tmp_path / "sae-cache")))
    with pytest.raises(HookpointError, match="layers.12"):
        run(cfg)
    assert not (tmp_path / "sae-cache").exists()
    assert_no_output(tmp_path / "out")

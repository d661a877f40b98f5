"""Bad input stops the run before any work with an error naming the file or setting, or, for a
single unreadable document, quarantines it (recorded in the manifest) and loses nothing else."""
from __future__ import annotations

import json
import re
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


# Run in a fresh process so VmHWM (peak RSS) measures only this: plan shards (the driver's own
# path, pipeline.data.token_cache) from one document, stopping at corpus.max_tokens.
_STREAM_ONE_DOC = """
import json, sys
from transformers import AutoTokenizer
from pipeline.config import CorpusConfig
from pipeline.data.corpus import resolve_corpus
from pipeline.data.token_cache import cached_plan_shards

def hwm():
    return next(int(l.split()[1]) << 10 for l in open("/proc/self/status") if l.startswith("VmHWM:"))

corpus, model_dir = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(model_dir)
cfg = CorpusConfig(paths=[corpus], ctx_len=16, shard_size=64, read_chars=1 << 16, max_tokens=50_000, token_cache=None)
files = resolve_corpus(cfg)
before = hwm()
doc_ids, tokens = set(), 0
for shard in cached_plan_shards(files, cfg, tok, tok.eos_token_id):
    doc_ids |= {c.doc_id for c in shard.contexts}
    tokens += sum(len(c.token_ids) for c in shard.contexts)
print(json.dumps({"before": before, "after": hwm(), "doc_ids": sorted(doc_ids), "tokens": tokens}))
"""


@pytest.mark.slow
def test_huge_single_document_is_streamed(tiny_model_dir, tiny_sae_dir, tmp_path, ray_local):
    import os
    import subprocess
    import sys

    import pyarrow.parquet as pq

    from pipeline.runtime.driver import run

    # 1. Memory: a 1 GiB single-document file (one 1 MiB block of whole words, repeated; ~2 s).
    corpus = tmp_path / "huge"
    corpus.mkdir()
    doc = corpus / "one.txt"
    phrase = "all work and no play makes a dull model "
    block = (phrase * ((1 << 20) // len(phrase))).encode()
    with open(doc, "wb") as f:
        for _ in range(1024):
            f.write(block)
    size = doc.stat().st_size
    assert size >= 1000 << 20
    out = subprocess.run([sys.executable, "-c", _STREAM_ONE_DOC, str(corpus), str(tiny_model_dir)],
                         capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["doc_ids"] == [str(doc)] and got["tokens"] >= 50_000
    # Bound: streaming may raise the process's peak RSS by at most 160 MiB. Measured: ~101 MiB,
    # the same for an 8 MiB and a 1 GiB document (one tokenizer batch of 1 Mi chars with its
    # fast-tokenizer encodings, a 1 MiB raw chunk, one shard). A reader that held the 1 GiB
    # document (as bytes or str) would add >= 1024 MiB: 6.4x the bound.
    growth = got["after"] - got["before"]
    assert growth < 160 << 20, f"peak RSS grew by {growth >> 20} MiB streaming a {size >> 20} MiB document"
    # No bound on the whole process: its imports alone are ~360 MiB with the CPU build of torch and
    # ~800 MiB with the CUDA build that PyPI gives a fresh Linux machine (seen on a clean-HOME clone).
    doc.unlink()

    # 2. End to end: a document far larger than a piece, through the real run.
    doc.write_text(phrase * 20_000)  # ~800 kB, one document
    cfg = cfg_for(tiny_model_dir, [corpus], tiny_sae_dir / "layers.1", tmp_path / "out", run_id="huge")
    cfg.corpus.read_chars = 4096  # pieces far smaller than the document
    cfg.corpus.max_tokens = 3000
    summary = run(cfg)
    ctx = pq.read_table(tmp_path / "out" / "huge" / "contexts").to_pandas()
    assert set(ctx.doc_id) == {str(doc)}  # one document, every context from it
    assert summary.tokens >= 3000 and ctx.doc_offset.is_monotonic_increasing


# ---------------------------------------------------------------------------------------------
# Corpus files that cannot be read as configured, and over-long documents


def test_corrupt_parquet_file_stops_before_work(tiny_model_dir, tiny_sae_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.corpus import CorpusError
    from pipeline.runtime.driver import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["a fine document"] * 3}), corpus / "good.parquet")
    blob = (corpus / "good.parquet").read_bytes()
    (corpus / "broken.parquet").write_bytes(blob[: len(blob) // 2])  # footer gone: truncated upload
    with pytest.raises(CorpusError, match=r"broken\.parquet is not a readable Parquet file"):
        run(cfg_for(tiny_model_dir, [corpus], tiny_sae_dir / "layers.1", tmp_path / "out"))
    assert_no_output(tmp_path / "out")


def test_parquet_file_without_the_text_column_stops_before_work(tiny_model_dir, tiny_sae_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.corpus import CorpusError
    from pipeline.runtime.driver import run

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pq.write_table(pa.table({"text": ["a fine document"] * 3}), corpus / "a.parquet")
    pq.write_table(pa.table({"body": ["text under another name"] * 3}), corpus / "b.parquet")
    with pytest.raises(CorpusError, match=r"b\.parquet has no column 'text' \(corpus\.text_field\); columns: \['body'\]"):
        run(cfg_for(tiny_model_dir, [corpus], tiny_sae_dir / "layers.1", tmp_path / "out"))
    assert_no_output(tmp_path / "out")


def test_jsonl_line_over_max_doc_bytes_is_quarantined_without_being_held(tmp_path):
    import tracemalloc

    from pipeline.data.corpus import Quarantined, TextPiece, read_documents, resolve_corpus

    limit = 1 << 20
    huge = 48 << 20  # 48x the limit
    with open(tmp_path / "docs.jsonl", "wb") as f:
        f.write(b'{"text": "first document"}\n')
        f.write(b'{"text": "' + b"x" * huge + b'"}\n')
        f.write(b'{"text": "third document"}\n')
    cfg = CorpusConfig(paths=[str(tmp_path / "docs.jsonl")], max_doc_bytes=limit)
    (file,) = resolve_corpus(cfg)
    tracemalloc.start()
    items = list(read_documents(file, cfg))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    docs = [(x.doc_id, x.text) for x in items if isinstance(x, TextPiece)]
    q = [x for x in items if isinstance(x, Quarantined)]
    url = str(tmp_path / "docs.jsonl")
    assert docs == [(f"{url}:1", "first document"), (f"{url}:3", "third document")]  # the rest is kept
    assert [(x.file, x.location) for x in q] == [(url, "line 2")]
    assert f"longer than {limit} bytes (corpus.max_doc_bytes)" in q[0].reason
    # Never held whole: the reader holds at most the limit plus one 1 MiB read chunk (~2 MiB,
    # with copies ~4 MiB); holding the line would take >= 48 MiB.
    assert peak < 8 << 20, peak


# ---------------------------------------------------------------------------------------------
# SAE checkpoints that cannot be loaded: a clear error naming sae.path before any work


def test_missing_sae_path_names_the_setting(tiny_model_dir, tiny_corpus, tmp_path):
    from pipeline.runtime.driver import run
    from pipeline.runtime.preflight import SAELoadError

    missing = tmp_path / "no-such-sae"
    with pytest.raises(SAELoadError, match=rf"sae\.path='{re.escape(str(missing))}'.*{re.escape(str(missing))} does not exist"):
        run(cfg_for(tiny_model_dir, [tiny_corpus], missing, tmp_path / "out"))
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("how", ["truncated_header", "directory_not_file"])
def test_unreadable_sae_names_the_setting(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path, how):
    import shutil

    from pipeline.runtime.driver import run
    from pipeline.runtime.preflight import SAELoadError

    # Tests run as root, so chmod 000 would not stop a read: two unreadable forms root cannot read.
    sae = tmp_path / "sae"
    shutil.copytree(tiny_sae_dir / "layers.1", sae)
    weights = sae / "sae.safetensors"
    if how == "truncated_header":
        weights.write_bytes(weights.read_bytes()[:20])  # an interrupted download
    else:
        weights.unlink()
        weights.mkdir()
    with pytest.raises(SAELoadError, match=rf"sae\.path='{re.escape(str(sae))}': cannot load the SAE for layers\.1 from {re.escape(str(sae))}"):
        run(cfg_for(tiny_model_dir, [tiny_corpus], sae, tmp_path / "out"))
    assert_no_output(tmp_path / "out")


class _RunsCode:
    """Pickles to a call of os.system: loading it with weights_only=False would create `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_in_pt_checkpoint_is_refused(tiny_model_dir, tiny_corpus, tmp_path):
    import torch

    from pipeline.runtime.driver import run
    from pipeline.runtime.preflight import SAELoadError
    from pipeline.sae.formats import SAEFormatError, load_sae

    marker = tmp_path / "pwned"
    d, n = 32, 64
    state = {  # a valid OpenAI TopK state_dict, plus one entry that runs code when unpickled
        "activation": "TopK", "activation_state_dict": {"k": 4, "postact_fn": "ReLU"},
        "encoder.weight": torch.randn(n, d), "decoder.weight": torch.randn(d, n),
        "pre_bias": torch.zeros(d), "latent_bias": torch.zeros(n), "stats_last_nonzero": _RunsCode(marker),
    }
    path = tmp_path / "resid_post_mlp_v5_32k" / "autoencoders" / "1.pt"
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    with pytest.raises(SAEFormatError, match=r"1\.pt: refused to load.*weights_only=True"):
        load_sae(path)
    with pytest.raises(SAELoadError, match=rf"sae\.path='{re.escape(str(path))}'.*refused to load"):
        run(cfg_for(tiny_model_dir, [tiny_corpus], path, tmp_path / "out"))
    assert not marker.exists()
    assert_no_output(tmp_path / "out")


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

"""Corpus resolution and streaming reads: formats, locations, errors, quarantine, bounded memory."""
import hashlib
import json
import os
import random
import tracemalloc
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from pipeline.config import CorpusConfig
from pipeline.data.corpus import (
    CorpusError,
    CorpusFile,
    Quarantined,
    TextPiece,
    ensure_default_corpus,
    read_documents,
    resolve_corpus,
    split_text,
)

WORDS = ["the", "of", "and", "a", "to", "in", "is", "you", "that", "it", "he", "was", "for", "on", "are", "as", "with", "his", "they", "I", "at", "be", "this", "have", "from"]


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS + ["naïve", "café", "—", "日本語"]) for _ in range(n_words))


def read_all(files, cfg, storage_options=None):
    """{doc_id: text} re-assembled from pieces, plus the quarantine list; checks piece flags."""
    docs, quarantined, open_doc = {}, [], None
    for f in files:
        for item in read_documents(f, cfg, storage_options):
            if isinstance(item, Quarantined):
                quarantined.append(item)
                continue
            assert isinstance(item, TextPiece)
            assert len(item.text) <= cfg.read_chars
            if item.first:
                assert open_doc is None and item.doc_id not in docs
                docs[item.doc_id] = ""
                open_doc = item.doc_id
            assert item.doc_id == open_doc
            docs[item.doc_id] += item.text
            if item.last:
                open_doc = None
    assert open_doc is None
    return docs, quarantined


@pytest.fixture
def corpus_dir(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "corpus"
    (root / "sub" / "deeper").mkdir(parents=True)
    want = {}
    for name in ["a.txt", "sub/b.md", "sub/deeper/c.rst"]:
        text = make_text(rng, rng.randint(50, 400)) + "\n\n" + make_text(rng, 30) + "\r\n"
        (root / name).write_text(text, encoding="utf-8", newline="")
        want[str(root / name)] = text
    lines = []
    for i in range(7):
        text = make_text(rng, rng.randint(1, 300))
        lines.append(json.dumps({"id": f"doc-{i}", "text": text, "extra": [1, 2]}))
        want[f"doc-{i}"] = text
    (root / "sub" / "d.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    texts = [make_text(rng, rng.randint(1, 200)) for _ in range(2500)]
    pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), root / "e.parquet", row_group_size=700)
    for r, t in enumerate(texts):
        want[str(r)] = t  # integer ids become strings
    (root / "notes.csv").write_text("not corpus")  # unknown extension: ignored in folders
    (root / ".hidden.txt").write_text("hidden")
    (root / "_SUCCESS").write_text("")
    return root, want


def test_folder_reads_back_every_format(corpus_dir):
    root, want = corpus_dir
    cfg = CorpusConfig(paths=[str(root)], id_field="id", read_chars=97)
    files = resolve_corpus(cfg)
    assert [f.url for f in files] == sorted(f.url for f in files)
    assert {os.path.basename(f.url): f.format for f in files} == {
        "a.txt": "text", "b.md": "text", "c.rst": "text", "d.jsonl": "jsonl", "e.parquet": "parquet"}
    docs, quarantined = read_all(files, cfg)
    assert quarantined == []
    assert docs == want


def test_jsonl_default_ids_are_url_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"text": "one"}\n\n{"text": "three", "id": 5}\n{"text": ""}\n{"text": "five"}')
    cfg = CorpusConfig(paths=[str(p)])
    docs, q = read_all(resolve_corpus(cfg), cfg)
    assert docs == {f"{p}:1": "one", f"{p}:3": "three", f"{p}:5": "five"}  # blank + empty text skipped
    cfg_id = CorpusConfig(paths=[str(p)], id_field="id")
    docs, q = read_all(resolve_corpus(cfg_id), cfg_id)
    assert docs == {"5": "three"}
    assert sorted(x.location for x in q) == ["line 1", "line 5"]  # missing id quarantined


def test_glob_file_url_dedup_and_explicit_format(corpus_dir):
    root, want = corpus_dir
    cfg = CorpusConfig(paths=[str(root / "**" / "*.txt"), f"file://{root}/a.txt", str(root / "a.txt"),
                              str(root / "sub" / "*.jsonl")], id_field="id")
    files = resolve_corpus(cfg)
    assert [os.path.basename(f.url) for f in files] == ["a.txt", "d.jsonl"]  # hidden files: not matched
    assert all(os.path.isabs(f.url) for f in files)
    docs, _ = read_all(files, cfg)
    assert docs[str(root / "a.txt")] == want[str(root / "a.txt")]
    assert docs["doc-3"] == want["doc-3"]
    # An explicit format reads any extension; folders then only hold that format's files.
    (root / "raw.dat").write_text("plain words here")
    cfg = CorpusConfig(paths=[str(root / "raw.dat")], format="text")
    assert read_all(resolve_corpus(cfg), cfg)[0] == {str(root / "raw.dat"): "plain words here"}
    cfg = CorpusConfig(paths=[str(root)], format="jsonl")
    assert [os.path.basename(f.url) for f in resolve_corpus(cfg)] == ["d.jsonl"]


def test_memory_url_with_storage_options():
    fs = fsspec.filesystem("memory")
    base = f"/corpus-{uuid.uuid4().hex}"
    fs.pipe(f"{base}/p/1.jsonl", b'{"text": "alpha beta"}\n')
    fs.pipe(f"{base}/p/2.txt", "gamma δ".encode())
    fs.pipe(f"{base}/q/3.jsonl", b'{"text": "not matched"}\n')
    try:
        cfg = CorpusConfig(paths=[f"memory://{base}/p/*"])
        files = resolve_corpus(cfg, storage_options={"skip_instance_cache": False})
        assert [f.url for f in files] == [f"memory://{base}/p/1.jsonl", f"memory://{base}/p/2.txt"]
        docs, _ = read_all(files, cfg, storage_options={})
        assert docs == {f"memory://{base}/p/1.jsonl:1": "alpha beta", f"memory://{base}/p/2.txt": "gamma δ"}
        cfg = CorpusConfig(paths=[f"memory://{base}"])  # a "folder" on any filesystem
        assert len(resolve_corpus(cfg)) == 3
    finally:
        fs.rm(base, recursive=True)


def test_errors_name_the_path_or_setting(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    (tmp_path / "ok.txt").write_text("fine")
    with pytest.raises(CorpusError, match=r"nope\.jsonl does not exist \(corpus\.paths\[1\]\)"):
        resolve_corpus(CorpusConfig(paths=[str(tmp_path), missing]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match=r"empty has no files .*corpus\.paths\[0\]"):
        resolve_corpus(CorpusConfig(paths=[str(tmp_path / "empty")]))
    with pytest.raises(CorpusError, match=r"\*\.rst matches no files \(corpus\.paths\[0\]\)"):
        resolve_corpus(CorpusConfig(paths=[str(tmp_path / "*.rst")]))
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.jsonl").write_text("")
    with pytest.raises(CorpusError, match=r"empty corpus.*e1\.txt"):
        resolve_corpus(CorpusConfig(paths=[str(tmp_path / "e1.txt"), str(tmp_path / "e2.jsonl")]))
    (tmp_path / "x.bin").write_text("abc")
    with pytest.raises(CorpusError, match=r"x\.bin.*corpus\.format"):
        resolve_corpus(CorpusConfig(paths=[str(tmp_path / "x.bin")]))
    with pytest.raises(CorpusError, match="corpus.format"):
        resolve_corpus(CorpusConfig(paths=[str(tmp_path)], format="csv"))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "t.parquet")
    cfg = CorpusConfig(paths=[str(tmp_path / "t.parquet")])
    with pytest.raises(CorpusError, match=r"t\.parquet has no column 'text' \(corpus\.text_field\)"):
        list(read_documents(resolve_corpus(cfg)[0], cfg))


def test_invalid_utf8_text_file_is_quarantined_whole(tmp_path):
    rng = random.Random(1)
    good = make_text(rng, 100)
    (tmp_path / "good.txt").write_text(good, encoding="utf-8")
    # The bad byte sits past the reader's first 1 MiB chunk, after multi-byte characters.
    prefix = ("é" * 700_000).encode()  # 1.4 MB of 2-byte characters
    (tmp_path / "bad.txt").write_bytes(prefix + b"ok \xff more")
    cfg = CorpusConfig(paths=[str(tmp_path)], read_chars=1000)
    docs, q = read_all(resolve_corpus(cfg), cfg)
    assert docs == {str(tmp_path / "good.txt"): good}  # nothing at all from bad.txt
    assert len(q) == 1 and q[0].file == str(tmp_path / "bad.txt")
    assert q[0].location == f"byte {len(prefix) + 3}"
    # A character cut off by the end of the file is invalid too.
    (tmp_path / "bad.txt").write_bytes(b"abc \xe6\x97")
    q = [x for x in read_documents(CorpusFile(str(tmp_path / "bad.txt"), "text", 6, ""), cfg)]
    assert [(type(x), x.location) for x in q] == [(Quarantined, "byte 4")]


def test_bad_jsonl_lines_are_quarantined_with_line_numbers(tmp_path):
    lines = [
        b'{"text": "first fine"}',
        b'{"text": "caf\xe9 latin-1"}',  # invalid UTF-8
        b'{"text": "unterminated',
        b"",
        b'["a", "list"]',
        b'{"body": "no text field"}',
        b'{"text": 42}',
        b'{"text": null}',
        b'{"text": "last fine"}',
    ]
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\n".join(lines) + b"\n")
    cfg = CorpusConfig(paths=[str(p)])
    docs, q = read_all(resolve_corpus(cfg), cfg)
    assert docs == {f"{p}:1": "first fine", f"{p}:9": "last fine"}
    got = {x.location: x.reason for x in q}
    assert sorted(got) == ["line 2", "line 3", "line 5", "line 6", "line 7", "line 8"]
    assert "UTF-8" in got["line 2"] and "JSON" in got["line 3"] and "object" in got["line 5"]
    assert "corpus.text_field" in got["line 6"] and "int" in got["line 7"]
    assert all(x.file == str(p) for x in q)


def test_parquet_null_text_and_ids(tmp_path):
    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"doc": ["a", "b", "c", None], "text": ["x y", None, "z", "w"]}), p)
    cfg = CorpusConfig(paths=[str(p)], id_field="doc")
    docs, q = read_all(resolve_corpus(cfg), cfg)
    assert docs == {"a": "x y", "c": "z"}
    assert [(x.location, "corpus.id_field" in x.reason or "text" in x.reason) for x in q] == [
        ("row 1", True), ("row 3", True)]
    cfg = CorpusConfig(paths=[str(p)])  # no id field: "{url}:{row}", rows counted from 0
    docs, q = read_all(resolve_corpus(cfg), cfg)
    assert docs == {f"{p}:0": "x y", f"{p}:2": "z", f"{p}:3": "w"} and [x.location for x in q] == ["row 1"]


def test_huge_document_is_streamed_in_bounded_pieces(tmp_path):
    rng = random.Random(2)
    p = tmp_path / "huge.txt"
    h = hashlib.sha256()
    with open(p, "w", encoding="utf-8", newline="") as f:
        block = make_text(rng, 20_000) + "\n"
        for i in range(250):  # ~20 MB
            chunk = block if i % 40 else "x" * 9000 + block  # some long runs without whitespace
            f.write(chunk)
            h.update(chunk.encode())
    size = os.path.getsize(p)
    assert size > 20e6
    read_chars = 4096
    cfg = CorpusConfig(paths=[str(p)], read_chars=read_chars)
    (file,) = resolve_corpus(cfg)
    got, n, longest, shortest, flags = hashlib.sha256(), 0, 0, read_chars, []
    tracemalloc.start()
    for piece in read_documents(file, cfg):
        got.update(piece.text.encode())
        n += 1
        longest = max(longest, len(piece.text))
        if not piece.last:
            shortest = min(shortest, len(piece.text))
        flags.append((piece.first, piece.last))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert got.hexdigest() == h.hexdigest()  # pieces concatenate to the file exactly
    assert longest <= read_chars and shortest >= read_chars // 2
    assert n >= size / 3 / read_chars  # chars <= bytes; ~1 byte/char here
    assert flags[0] == (True, False) and flags[-1] == (False, True)
    assert all(f == (False, False) for f in flags[1:-1])
    assert peak < 16e6, f"peak traced memory {peak / 1e6:.1f} MB for a {size / 1e6:.0f} MB file"


def test_split_text_cuts_before_whitespace_runs():
    pieces, rest = split_text("alpha beta   gamma delta", 12)
    assert "".join(pieces) + rest == "alpha beta   gamma delta"
    assert pieces[0] == "alpha beta" and pieces[1].startswith("   gamma")
    pieces, rest = split_text("a" * 25, 10)  # no whitespace: hard cuts
    assert pieces == ["a" * 10, "a" * 10] and rest == "a" * 5


def test_fingerprint_changes_with_the_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("one two")
    cfg = CorpusConfig(paths=[str(p)])
    before = resolve_corpus(cfg)[0]
    assert resolve_corpus(cfg)[0] == before
    p.write_text("one two three")
    after = resolve_corpus(cfg)[0]
    assert after.size == 13 and after.fingerprint != before.fingerprint


def test_default_corpus_builds_once_deterministically(tmp_path):
    path = ensure_default_corpus(str(tmp_path / "c1"))
    assert path == str(tmp_path / "c1" / "pydoc.jsonl") and os.path.exists(path)
    mtime = os.stat(path).st_mtime_ns
    assert ensure_default_corpus(str(tmp_path / "c1")) == path and os.stat(path).st_mtime_ns == mtime
    assert [n for n in os.listdir(tmp_path / "c1")] == ["pydoc.jsonl"]  # no temp files left
    other = ensure_default_corpus(str(tmp_path / "c2"))
    with open(path, "rb") as a, open(other, "rb") as b:
        assert a.read() == b.read()

    with open(path, encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    assert sum(len(r["text"]) for r in records) > 1_200_000  # ~4 chars/token: > 300k tokens
    assert {r["source"] for r in records} == {"pydoc_data.topics", "stdlib docstring"}
    assert sum(r["source"] == "pydoc_data.topics" for r in records) > 70
    assert not any("/test/" in i or "site-packages" in i for i in ids)

    # `pkg:pydoc` (the default config) resolves to it and reads through the ordinary reader.
    cfg = CorpusConfig()
    (f,) = resolve_corpus(cfg, cache_dir=str(tmp_path / "c1"))
    assert (f.url, f.format, f.id_field) == (path, "jsonl", "id")
    (f2,) = resolve_corpus(cfg, cache_dir=str(tmp_path / "c2"))
    assert f2.fingerprint == f.fingerprint  # content-based: a rebuilt cache is not a "changed file"
    docs, q = read_all([f], cfg)
    assert q == [] and list(docs) == ids
    assert docs == {r["id"]: r["text"] for r in records}


class _CountingMemoryFS(MemoryFileSystem):
    """A real in-memory filesystem that counts per-object metadata requests."""

    protocol = "countmem"
    counts: dict = {}

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("countmem://", "memory://", 1))

    def info(self, path, **kw):
        type(self).counts["info"] = type(self).counts.get("info", 0) + 1
        return super().info(path, **kw)


def test_resolve_corpus_uses_one_listing_not_a_request_per_object():
    """Issue 14: sizes and fingerprints come from the listing (glob/find with detail=True); the
    old code made an isfile + an info request per object (2 x 40 here)."""
    fsspec.register_implementation("countmem", _CountingMemoryFS, clobber=True)
    fs = fsspec.filesystem("countmem")
    base = f"/corpus-{uuid.uuid4().hex}"
    for i in range(40):
        fs.pipe(f"{base}/{i:03d}.jsonl", json.dumps({"text": f"doc {i}"}).encode() + b"\n")
    try:
        for path in (f"countmem://{base}/*.jsonl", f"countmem://{base}"):
            _CountingMemoryFS.counts.clear()
            files = resolve_corpus(CorpusConfig(paths=[path]))
            assert len(files) == 40
            assert _CountingMemoryFS.counts.get("info", 0) <= 3, (path, _CountingMemoryFS.counts)
            # Fingerprints as before: size + the listing's timestamp, same as a per-object info().
            f0 = files[0]
            assert f0.size == len(json.dumps({"text": "doc 0"})) + 1
            assert f0.fingerprint.startswith(f"size={f0.size};")
    finally:
        fs.rm(base, recursive=True)

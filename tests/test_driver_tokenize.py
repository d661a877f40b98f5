"""Workers tokenize; the driver plans from metadata (issue 14 item 1).

Fast: the plan made from tokenize tasks' metadata equals `plan_shards` exactly (ids, seq_ids,
contexts read back from the staging area, quarantined records, ledger records), with and without
`corpus.max_tokens` and after earlier files; a batch of files costs one durable ledger write, and
every shard's ledger record is durable before the shard is handed out.
Slow (real local Ray): during a whole run the driver process constructs no tokenizer, and what
it sends the harvest actors is a small `ShardTask` with no token ids.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import CorpusConfig, ModelConfig, RunConfig, SinkConfig
from pipeline.data.corpus import resolve_corpus
from pipeline.data.packing import plan_shards
from pipeline.outputs.layout import PLAN_DIR
from pipeline.outputs.sink import RunStore
from pipeline.runtime.dispatch import inline_tokenize_pool
from pipeline.runtime.driver import plan_run
from pipeline.runtime.ledger import FileRecord, Ledger
from pipeline.runtime.staging import read_shard
from pipeline.runtime.summary import RunSummary
from pipeline.runtime.worker import ShardTask


@pytest.fixture()
def corpus(tiny_corpus, tmp_path) -> Path:
    folder = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, folder)
    with open(folder / "c.jsonl", "w") as f:  # quarantined lines between and after good documents
        f.write(json.dumps({"text": "first good document " * 5}) + "\n{not json\n")
        f.write(json.dumps({"text": "second good document " * 5}) + "\n[1, 2\n")
    return folder


def _cfg(model_dir, corpus, tmp_path, **corpus_kw) -> RunConfig:
    return RunConfig(run_id="plan",
                     model=ModelConfig(name="tiny", path=str(model_dir), gguf_file=None, dtype="float32"),
                     corpus=CorpusConfig(paths=[str(corpus)], ctx_len=16, shard_size=3,
                                         token_cache=str(tmp_path / "tokens"), **corpus_kw),
                     sink=SinkConfig(root=str(tmp_path / "out")))


def _expected(cfg: RunConfig, files, first_shard: int):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(cfg.model.path)
    quarantined = []
    shards = list(plan_shards(files, cfg.corpus, tok, tok.eos_token_id, on_quarantine=quarantined.append,
                              first_shard=first_shard))
    flat = [(s.shard_id, s.seq_start, [(c.doc_id, c.doc_offset, c.token_ids.tolist()) for c in s.contexts])
            for s in shards]
    return flat, [dataclasses.asdict(q) for q in quarantined]


@pytest.mark.parametrize("group_mb", [8.0, 0.0], ids=["files-grouped", "a-task-per-file"])
@pytest.mark.parametrize("max_tokens", [None, 150, 10_000])
def test_plan_from_tokenize_metadata_equals_plan_shards(tiny_model_dir, corpus, tmp_path, max_tokens, group_mb):
    cfg = _cfg(tiny_model_dir, corpus, tmp_path, max_tokens=max_tokens)
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, tokenize_group_mb=group_mb))
    files = resolve_corpus(cfg.corpus)
    store = RunStore(cfg.sink, cfg.run_id)
    ledger = Ledger(store)
    # An earlier file owns shards 0..6 (committed): new files start at 7, as plan_shards(first_shard=7).
    ledger.save(FileRecord(ordinal=0, url="file:///gone.txt", fingerprint="x", first_shard=0, last_shard=6,
                           complete=True))
    committed = np.arange(7, dtype=np.int64)
    summary = RunSummary(cfg.run_id, store.url)
    tokenizers = []
    tasks = list(plan_run(cfg, files, ledger, committed, lambda: inline_tokenize_pool(cfg, None), summary,
                          on_tokenizer=tokenizers.append))
    expected, expected_q = _expected(cfg, files, first_shard=7)
    assert expected and (max_tokens == 150 or expected_q)
    got = []
    for t in tasks:
        assert isinstance(t, ShardTask)
        doc_ids, offsets, token_ids = read_shard(store, t.tokens_key, t.local, t.n_contexts)
        got.append((t.shard_id, t.seq_start, [(d, o, ids.tolist()) for d, o, ids in zip(doc_ids, offsets, token_ids)]))
    assert got == expected
    assert ledger.quarantined() == expected_q and summary.quarantined == len(expected_q)
    # The ledger's records say what plan_shards planned: first/last shard, counts, complete.
    recs = [r for r in Ledger(store).in_order() if r.ordinal > 0]
    assert [r.first_shard for r in recs] == sorted(r.first_shard for r in recs)
    assert sum(r.contexts for r in recs) == sum(len(c) for _, _, c in expected)
    assert sum(r.tokens for r in recs) == sum(len(x[2]) for _, _, c in expected for x in c)
    assert all(r.complete for r in recs) == (max_tokens is None or max_tokens > sum(r.tokens for r in recs))
    assert tokenizers[0]["vocab_size"] > 0 and tokenizers[0]["sha256"]

    # Rerun with everything committed: no tokenizing at all, every shard skipped.
    done = np.asarray(sorted(set(range(7)) | {t.shard_id for t in tasks}), dtype=np.int64)
    again = RunSummary(cfg.run_id, store.url)

    def no_pool():
        raise AssertionError("a finished, committed corpus needs no tokenize task")

    # A file cut by max_tokens (its record not complete) is done too when the budget is the same:
    # before, every rerun of `make demo` tokenized its last file again and started the workers.
    assert list(plan_run(cfg, files, Ledger(store), done, no_pool, again)) == []
    assert again.shards_skipped == len(tasks)  # gone.txt is no longer in the corpus: not counted
    if max_tokens == 150:  # a larger budget tokenizes the cut file again and plans what lies past the cut
        more = dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, max_tokens=None))
        extra = list(plan_run(more, files, Ledger(store), done, lambda: inline_tokenize_pool(more, None),
                              RunSummary(cfg.run_id, store.url)))
        assert extra and min(t.shard_id for t in extra) > max(done)


def test_small_consecutive_files_share_a_tokenize_task_and_fail_alone():
    """TokenizePool: consecutive files of at most `group_bytes` together are one task (a new task
    process costs its imports, ~3 s of CPU, more than a few small files); a larger file has its own.
    A file's error is raised when its own result is taken; its neighbours' results stand."""
    from pipeline.data.corpus import CorpusError, CorpusFile
    from pipeline.runtime.dispatch import TokenizePool

    mb = 2**20
    sizes = [1 * mb, 2 * mb, 20 * mb, 3 * mb, 5 * mb, 1 * mb]
    files = [CorpusFile(url=f"file:///c/{i}.txt", format="text", size=n, fingerprint=str(i))
             for i, n in enumerate(sizes)]
    started, cancelled = [], []

    def names(jobs) -> list[str]:
        return [f.url.rsplit("/", 1)[1][0] for f, _ in jobs]

    def start(jobs):  # the handle is the task's jobs, as in inline_tokenize_pool
        started.append(names(jobs))
        return jobs

    def get(jobs):  # a task's list: each file's metadata, or the error it raised
        return [CorpusError(f"{f.url}: unreadable") if f.url.endswith("1.txt") else {"url": f.url, "cap": cap}
                for f, cap in jobs]

    pool = TokenizePool(start, get, lambda jobs: True, lambda handles: cancelled.extend(map(names, handles)),
                        window=2, group_bytes=8 * mb)
    jobs = [pool.add(f, 100) for f in files]
    assert pool.result(jobs[0]) == {"url": files[0].url, "cap": 100}
    assert started == [["0", "1"], ["2"]]  # two tasks ahead (window), the first with both small files
    with pytest.raises(CorpusError, match="1.txt: unreadable"):
        pool.result(jobs[1])
    assert pool.result(jobs[2])["url"] == files[2].url
    assert started == [["0", "1"], ["2"], ["3", "4"], ["5"]]  # 3 + 5 MB fit, + 1 MB would not
    pool.close()  # tasks not taken are cancelled, and only those
    assert cancelled == [["3", "4"], ["5"]]

    # Empty files (or sizes a listing did not give) still make tasks of at most GROUP_FILES.
    from pipeline.runtime.dispatch import GROUP_FILES

    started.clear()
    pool = TokenizePool(start, get, lambda jobs: True, lambda handles: None, window=1, group_bytes=8 * mb)
    empty = [pool.add(CorpusFile(url=f"file:///c/e{i}.txt", format="text", size=0, fingerprint=""), None)
             for i in range(GROUP_FILES + 3)]
    pool.result(empty[0])
    assert [len(names) for names in started] == [GROUP_FILES]


def test_a_batch_of_new_files_is_one_durable_write_before_its_shards(tiny_model_dir, tmp_path):
    corpus = tmp_path / "many"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"f{i:03d}.txt").write_text(f"file number {i} has a few words in it " * (1 + i % 4))
    cfg = _cfg(tiny_model_dir, corpus, tmp_path)
    files = resolve_corpus(cfg.corpus)
    store = RunStore(cfg.sink, cfg.run_id)
    ledger = Ledger(store)
    seen = 0
    for task in plan_run(cfg, files, ledger, np.empty(0, np.int64), lambda: inline_tokenize_pool(cfg, None),
                         RunSummary(cfg.run_id, store.url)):
        # What a driver killed right now leaves behind already owns this shard id.
        durable = Ledger(store)
        assert durable.next_shard() > task.shard_id
        assert any(r.first_shard <= task.shard_id <= r.reserved_shard for r in durable.records.values())
        seen += 1
    assert seen >= 40
    # 40 files whose tokenize results were all there at once: one write (it was 2 per file + reservations).
    assert ledger.writes == 1
    assert len(list((tmp_path / "out" / "plan" / PLAN_DIR).glob("*.json"))) == 1
    assert len(Ledger(store).records) == 40


@pytest.mark.slow
def test_driver_never_tokenizes_and_sends_no_tokens(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path,
                                                    ray_local, monkeypatch):
    """A whole run on real local Ray. The library's tokenizer constructor is wrapped in this
    (the driver's) process only: Ray's worker processes are fresh interpreters."""
    import transformers.tokenization_utils_base as tub
    from test_pipeline_e2e import make_cfg

    from pipeline.runtime.dispatch import ray_dispatcher
    from pipeline.runtime.driver import run

    built = []
    real_init = tub.PreTrainedTokenizerBase.__init__

    def counting_init(self, *a, **kw):
        built.append(type(self).__name__)
        real_init(self, *a, **kw)

    monkeypatch.setattr(tub.PreTrainedTokenizerBase, "__init__", counting_init)

    cfg = make_cfg(tiny_model_dir, tiny_corpus, tiny_sae_dir, tmp_path / "out", run_id="notok",
                   token_cache=None)
    sent = []

    class Recording:  # the real Ray dispatcher; records what the driver hands it
        def __init__(self):
            self.inner = ray_dispatcher(cfg, {h: f"{tiny_sae_dir}/{h}" for h in cfg.sae.hookpoints})

        def submit(self, payload):
            sent.append(payload)
            self.inner.submit(payload)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    summary = run(cfg, dispatcher=Recording())
    assert summary.shards_done > 1 and summary.tokens > 0
    assert built == [], f"the driver constructed tokenizer(s) {built}"
    assert len(sent) == summary.shards_done
    for payload in sent:
        assert isinstance(payload, ShardTask) and not hasattr(payload, "token_ids")
        assert len(pickle.dumps(payload)) < 400  # a key and four ints, whatever ctx_len and shard_size
    root = tmp_path / "out" / "notok"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] > 0 and manifest["tokenizer"]["eos_token_id"] is not None
    assert not (root / "_tokens").exists()  # staging removed once every shard is committed
    # The committed contexts are the plan, token for token.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    files = resolve_corpus(cfg.corpus)
    want = [(c.doc_id, c.doc_offset, c.token_ids.tolist())
            for s in plan_shards(files, cfg.corpus, tok, tok.eos_token_id) for c in s.contexts]
    ctx = pq.read_table(root / "contexts").to_pandas().sort_values("seq_id")
    assert [(d, o, list(t)) for d, o, t in zip(ctx.doc_id, ctx.doc_offset, ctx.token_ids)] == want


def test_cancelled_running_tokenize_task_takes_its_worker_process_with_it(tmp_path, ray_local):
    """A running task given up on (a `max_tokens` plan ends before it) is stopped by killing its
    worker process. Ray's `force=False` raises KeyboardInterrupt wherever the task is, and inside
    `import torch` that left a process whose next task could not import torch (two CI runs failed on
    "bad call flags" / "module functions cannot set METH_CLASS"). Fails with `force=False`: the
    interrupted process lives on to take the next task."""
    from pipeline.runtime.dispatch import cancel_tasks

    def record_pid_and_wait(pid_file: str) -> None:  # nested: Ray ships it by value
        import os
        import time
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(120)

    pid_file = tmp_path / "pid"
    # No CPU, as a tokenize task (cluster.tokenize_cpus=0): it starts beside harvest workers that hold them.
    ref = ray_local.remote(max_retries=0, num_cpus=0)(record_pid_and_wait).remote(str(pid_file))
    deadline = time.monotonic() + 60
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.1)
    pid = int(pid_file.read_text())
    cancel_tasks([ref])
    deadline = time.monotonic() + 30
    while process_alive(pid):
        assert time.monotonic() < deadline, f"worker process {pid} outlived its cancelled task"
        time.sleep(0.1)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of the raylet may linger as a zombie until reaped: that is not alive.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # reaped between the kill(0) and the read (ESRCH on read)
        return False


WARM_PROCESSES = """
import json, os, sys, time
import ray
from pipeline.config import ClusterConfig, RunConfig
from pipeline.runtime.dispatch import start_ray

start_ray(RunConfig(cluster=ClusterConfig(num_workers=2, cpus_per_worker=1, torch_threads=1)))

@ray.remote(num_cpus=1)
class Harvester:  # stands for the harvest actors: a process each, holding the CPUs
    def __init__(self):
        import torch  # noqa: F401  (as a harvest actor does, which takes a moment)

    def pid(self):
        return os.getpid()

@ray.remote(num_cpus=0)
def task_pid():  # stands for a tokenize task
    import torch  # noqa: F401  (what a new process would import again)
    return os.getpid()

first = ray.get([task_pid.remote() for _ in range(2)])  # the first files, tokenized as the actors start
actors = [Harvester.remote() for _ in range(2)]
ray.get([a.pid.remote() for a in actors])
# Longer than Ray's idle-worker kill threshold (1 s) and its check interval: what is fixed here
# is whether an idle process is killed once it has been idle that long, so the wait is the test.
time.sleep(3)
second = ray.get([task_pid.remote() for _ in range(2)])
print(json.dumps({"first": first, "second": second}))
"""


@pytest.mark.slow
def test_local_ray_keeps_warm_task_processes_beside_the_harvest_actors(tmp_path):
    """A local run's Ray (start_ray) keeps idle task processes, and the torch / transformers they
    imported, while the harvest actors hold the CPUs. With Ray's default worker limit every idle
    tokenize process was ended after a second, and each later file, post-processing task or run in
    the same driver paid ~3 s of imports in a new one. Fails without `local_ray_system_config` (seen)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", WARM_PROCESSES], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    pids = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(pids["first"]) & set(pids["second"]), f"every task process was replaced after 3 s idle: {pids}"

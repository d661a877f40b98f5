"""Driver benchmark: plan and track a million shards with no-op workers.

    python bench/driver.py [--shards 1000000]
    python bench/driver.py --plan-files 1000,10000,100000 --s3-sample 2000   (metadata planning)

Measures what the driver itself costs, with the workers taken out: tokenizing and packing the
corpus into shards, the ledger, the committed-shard lookup, the bounded in-flight queue and the
accounting. Workers are `InlineDispatcher(no-op)`. Commit-marker writes, which the workers do,
are measured separately on a sample (shards/s the local sink can commit).
Prints driver peak RSS growth (MB), seconds, and shards/s.

`--plan-files` (issue 14) measures the metadata side of planning over F corpus files, each F in
a fresh subprocess (clean peak RSS): `resolve_corpus` (one listing), ledger start-up from the
compacted snapshot, the committed-shard listing and `plan_run` over F known, finished files (a
rerun: nothing tokenized, nothing written), and the ledger bookkeeping for F *new* files
(next_ordinal/next_shard, O(1) each; its batched ledger writes are timed on a sample of 1000 and
extrapolated, labelled). `--s3-sample N` does the same against a real moto_server with N objects,
counts the HTTP requests per phase from the server's log, and extrapolates to the largest F.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ClusterConfig, CorpusConfig, ModelConfig, RunConfig, SAEConfig, SinkConfig  # noqa: E402
from pipeline.outputs.layout import commit_key  # noqa: E402
from pipeline.outputs.sink import RunStore  # noqa: E402
from pipeline.runtime.dispatch import InlineDispatcher, inline_tokenize_pool  # noqa: E402
from pipeline.runtime.worker import ShardResult, ShardTask  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


WRITE_SAMPLE = 1000


def plan_files_once(n_files: int, root: str, corpus: str, storage: dict | None) -> dict:
    """One F: set up F files + a finished run in `root`, then time planning. Returns the numbers."""
    import fsspec
    import numpy as np

    from pipeline.data.corpus import resolve_corpus
    from pipeline.outputs.layout import ledger_snapshot_key
    from pipeline.runtime.driver import plan_run
    from pipeline.runtime.ledger import FileRecord, Ledger
    from pipeline.runtime.summary import RunSummary

    cfg = RunConfig(run_id="plan", corpus=CorpusConfig(paths=[corpus], ctx_len=8, shard_size=4),
                    sink=SinkConfig(root=root, **(storage or {})))
    fs, cpath = fsspec.core.url_to_fs(corpus, **({} if storage is None else _s3_opts(storage)))
    # -- setup (untimed): F small files, a compacted ledger that owns them, F commit markers
    fs.makedirs(cpath, exist_ok=True)
    fs.pipe({f"{cpath}/part-{i:07d}.jsonl": b'{"text": "a small document"}\n' for i in range(n_files)})
    files = resolve_corpus(cfg.corpus, storage_options=None if storage is None else _s3_opts(storage))
    store = RunStore(cfg.sink, cfg.run_id)
    recs = [dataclasses.asdict(FileRecord(ordinal=i, url=f.url, fingerprint=f.fingerprint, first_shard=i,
                                          last_shard=i, contexts=1, tokens=5, complete=True))
            for i, f in enumerate(files)]
    store.write_json(ledger_snapshot_key(0), {"version": 1, "max_ordinal": n_files - 1,
                                              "max_shard": n_files - 1, "records": recs})
    store.fs.makedirs(store.path("_commits"), exist_ok=True)
    store.fs.pipe({store.path(commit_key(i)): b"{}" for i in range(n_files)})
    del recs
    out = {"F": n_files}
    mark = _request_mark()
    # -- 1. listing
    t = time.perf_counter()
    files = resolve_corpus(cfg.corpus, storage_options=None if storage is None else _s3_opts(storage))
    out["list_s"], out["list_req"], mark = time.perf_counter() - t, _requests_since(mark), _request_mark()
    # -- 2. rerun planning: ledger start-up + committed listing + plan_run over F known files
    t = time.perf_counter()
    ledger = Ledger(store)
    committed = np.asarray(store.committed_shards(), dtype=np.int64)
    summary = RunSummary(cfg.run_id, store.url)
    todo = list(plan_run(cfg, files, ledger, committed, None, summary))  # nothing to tokenize: no pool made
    out["rerun_s"], out["rerun_req"], mark = time.perf_counter() - t, _requests_since(mark), _request_mark()
    assert not todo and summary.shards_skipped == n_files, (len(todo), summary.shards_skipped)
    # -- 3. new files: ledger bookkeeping for F new files (in memory, O(1) each) ...
    fresh = Ledger(RunStore(cfg.sink, "plan-new"))
    t = time.perf_counter()
    for f in files:
        rec = FileRecord(ordinal=fresh.next_ordinal(), url=f.url, fingerprint=f.fingerprint,
                         first_shard=fresh.next_shard())
        fresh._add(dataclasses.replace(rec, last_shard=rec.first_shard, complete=True))
    out["new_mem_s"] = time.perf_counter() - t
    # ... and the durable ledger writes the driver makes for them, on a sample: one batched
    # write per `BATCH_FILES` files whose tokenize results are in (2 per file before issue 14 item 1)
    from pipeline.runtime.driver import BATCH_FILES

    sample = min(WRITE_SAMPLE, n_files)
    durable = Ledger(RunStore(cfg.sink, "plan-durable"))
    mark = _request_mark()
    t = time.perf_counter()
    batch = []
    for f in files[:sample]:
        rec = FileRecord(ordinal=durable.next_ordinal(), url=f.url, fingerprint=f.fingerprint,
                         first_shard=durable.next_shard())
        rec = dataclasses.replace(rec, last_shard=rec.first_shard, reserved_shard=rec.first_shard, complete=True)
        durable.remember(rec)
        batch.append(rec)
        if len(batch) == BATCH_FILES:
            durable.save_many(batch)
            batch = []
    if batch:
        durable.save_many(batch)
    out["new_writes_sample"] = durable.writes
    out["new_write_s_per_file"] = (time.perf_counter() - t) / sample
    out["new_write_req_per_file"] = _requests_since(mark) / sample if _requests_since(mark) else None
    t = time.perf_counter()
    durable.compact()
    out["compact_s_sample"] = time.perf_counter() - t
    out["rss_mb"] = rss_mb()
    return out


_MOTO_LOG: list[Path] = []


def _request_mark() -> int:
    return sum(1 for _ in open(_MOTO_LOG[0], "rb")) if _MOTO_LOG else 0


def _requests_since(mark: int) -> int | None:
    # moto_server (werkzeug) logs one line per HTTP request
    return _request_mark() - mark if _MOTO_LOG else None


def _s3_opts(storage: dict) -> dict:
    return {"client_kwargs": {"endpoint_url": storage["endpoint_url"]}}


def plan_files_child(args) -> None:
    import json

    storage = None
    if args.endpoint:
        _MOTO_LOG.append(Path(args.moto_log))
        storage = {"endpoint_url": args.endpoint}
        root, corpus = f"s3://bench/runs-{args.one}", f"s3://bench/corpus-{args.one}"
        print(json.dumps(plan_files_once(args.one, root, corpus, storage)))
        return
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        print(json.dumps(plan_files_once(args.one, f"{tmp}/out", f"{tmp}/corpus", None)))


def plan_files_main(args) -> None:
    import json
    import os
    import socket
    import subprocess

    def child(n: int, extra: list[str]) -> dict:
        cmd = [sys.executable, __file__, "--one", str(n), *extra]
        res = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(
            Path(__file__).resolve().parents[1])})
        return json.loads(res.stdout.strip().splitlines()[-1])

    def show(r: dict, label: str) -> None:
        f = r["F"]
        wr = r["new_write_s_per_file"] * f
        req = "" if r.get("list_req") is None else (
            f" | requests: listing {r['list_req']}, rerun plan {r['rerun_req']}, "
            f"{r['new_write_req_per_file']:.3f}/new file")
        print(f"{label} F={f:>7,}: listing {r['list_s']:6.2f} s | rerun plan (ledger+commits+plan_run) "
              f"{r['rerun_s']:6.2f} s | new-file ledger in memory {r['new_mem_s']:5.2f} s + ledger writes "
              f"{wr:7.1f} s ({r['new_writes_sample']} batched writes for {min(WRITE_SAMPLE, f)} files, extrapolated) | peak RSS {r['rss_mb']:5.0f} MB{req}")

    print(f"command: python bench/driver.py --plan-files {args.plan_files} --s3-sample {args.s3_sample}")
    sizes = [int(x) for x in args.plan_files.split(",")]
    results = [child(n, ["--tmp", args.tmp or tempfile.gettempdir()]) for n in sizes]
    for r in results:
        show(r, "local")
    base = results[0]
    for r in results[1:]:
        k = r["F"] / base["F"]
        print(f"  x{k:.0f} files -> listing x{r['list_s'] / base['list_s']:.1f}, "
              f"rerun plan x{r['rerun_s'] / base['rerun_s']:.1f}, new-file ledger x{r['new_mem_s'] / base['new_mem_s']:.1f}")
    if args.s3_sample:
        # moto accepts any credentials; dummy ones so boto signs its requests (never real ones)
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "moto-bench")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "moto-bench")
        exe = Path(sys.executable).parent / "moto_server"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = Path(tempfile.mkdtemp()) / "moto.log"
        proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=open(log, "wb"),  # noqa: SIM115
                                stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            import s3fs

            for _ in range(100):
                try:
                    s3fs.S3FileSystem(client_kwargs={"endpoint_url": url}).mkdir("bench")
                    break
                except Exception:
                    time.sleep(0.1)
            r = child(args.s3_sample, ["--endpoint", url, "--moto-log", str(log)])
            show(r, "moto S3")
            k = sizes[-1] / r["F"]
            print(f"moto S3 EXTRAPOLATED (x{k:.0f}, linear) to F={sizes[-1]:,}: listing ~{r['list_s'] * k:.0f} s, "
                  f"rerun plan ~{r['rerun_s'] * k:.0f} s, new-file record PUTs ~{r['new_write_s_per_file'] * sizes[-1]:.0f} s"
                  f" (listing requests grow by pages of 1000 keys, ledger start-up stays 1 listing + 1 GET)")
        finally:
            proc.terminate()
            proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=1_000_000)
    ap.add_argument("--commit-sample", type=int, default=5000)
    ap.add_argument("--plan-files", default=None, help="comma-separated F values: metadata planning bench")
    ap.add_argument("--s3-sample", type=int, default=0)
    ap.add_argument("--tmp", default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--moto-log", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        return plan_files_child(args)
    if args.plan_files:
        return plan_files_main(args)

    from tests.conftest import TEXTS, build_tiny_llama, build_tokenizer, random_sae

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_tokenizer(tmp / "model", TEXTS)
        build_tiny_llama(tmp / "model", len(tok))
        random_sae(32, 64, 4).save(tmp / "sae")
        # One context per shard, 8 tokens per context: a corpus of ~8M tokens in 64 files.
        ctx_len, per_file = 8, max(1, args.shards // 64)
        words = " ".join(TEXTS).split()
        corpus = tmp / "corpus"
        corpus.mkdir()
        for f in range(64):
            with open(corpus / f"part-{f:03d}.txt", "w") as fh:
                need, i = per_file * ctx_len, 0
                while need > 0:
                    chunk = " ".join(words[(i + f) % len(words): (i + f) % len(words) + 50])
                    fh.write(chunk + " ")
                    need -= len(tok(chunk).input_ids) + 1
                    i += 50
        cfg = RunConfig(
            run_id="bench",
            model=ModelConfig(name="tiny", path=str(tmp / "model"), gguf_file=None, dtype="float32"),
            sae=SAEConfig(path=str(tmp / "sae"), hookpoints=["layers.1"]),
            corpus=CorpusConfig(paths=[str(corpus)], ctx_len=ctx_len, shard_size=1, max_tokens=args.shards * ctx_len),
            sink=SinkConfig(root=str(tmp / "out")),
            cluster=ClusterConfig(num_workers=8, max_in_flight=2),
        )
        from pipeline.runtime.driver import run

        def noop(p: ShardTask) -> ShardResult:  # the payload holds no tokens: count contexts only
            return ShardResult(p.shard_id, p.n_contexts, 0, 0, 0, 0.0)

        base = rss_mb()
        t = time.perf_counter()
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # no per-file or progress lines in the timing
        summary = run(cfg, dispatcher=InlineDispatcher(noop), tokenize=lambda: inline_tokenize_pool(cfg, None))
        seconds = time.perf_counter() - t
        grown = rss_mb() - base

        store = RunStore(cfg.sink, "commit-sample")
        t = time.perf_counter()
        for i in range(args.commit_sample):
            store.write_json(commit_key(i), {"shard": i, "files": [{"path": "x", "rows": 1, "bytes": 1, "sha256": "0"}]})
        commit_rate = args.commit_sample / (time.perf_counter() - t)

    print(f"command: python bench/driver.py --shards {args.shards}")
    print(f"shards planned and tracked : {summary.shards_done:,}")
    print(f"driver wall time           : {seconds:.1f} s  ({summary.shards_done / seconds:,.0f} shards/s, "
          f"tokenization included)")
    print(f"driver peak RSS growth     : {grown:.0f} MB (peak RSS {rss_mb():.0f} MB incl. torch/transformers)")
    print(f"commit markers, local sink : {commit_rate:,.0f} shards/s (sample of {args.commit_sample:,})")


if __name__ == "__main__":
    main()

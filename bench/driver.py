"""Driver benchmark: plan and track a million shards with no-op workers.

    python bench/driver.py [--shards 1000000]

Measures what the driver itself costs, with the workers taken out: tokenizing and packing the
corpus into shards, the ledger, the committed-shard lookup, the bounded in-flight queue and the
accounting. Workers are `InlineDispatcher(no-op)`. Commit-marker writes, which the workers do,
are measured separately on a sample (shards/s the local sink can commit).
Prints driver peak RSS growth (MB), seconds, and shards/s.
"""
from __future__ import annotations

import argparse
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
from pipeline.runtime.dispatch import InlineDispatcher  # noqa: E402
from pipeline.runtime.worker import ShardPayload, ShardResult  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=1_000_000)
    ap.add_argument("--commit-sample", type=int, default=5000)
    args = ap.parse_args()

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

        def noop(p: ShardPayload) -> ShardResult:
            return ShardResult(p.shard_id, len(p.token_ids), sum(len(t) for t in p.token_ids), 0, 0, 0.0)

        base = rss_mb()
        t = time.perf_counter()
        logging.getLogger("pipeline").setLevel(logging.WARNING)  # no per-file or progress lines in the timing
        summary = run(cfg, dispatcher=InlineDispatcher(noop))
        seconds = time.perf_counter() - t
        grown = rss_mb() - base

        store = RunStore(cfg.sink, "commit-sample")
        t = time.perf_counter()
        for i in range(args.commit_sample):
            store.write_json(commit_key(i), {"shard": i, "files": [{"path": "x", "rows": 1, "bytes": 1, "sha256": "0"}]})
        commit_rate = args.commit_sample / (time.perf_counter() - t)

    print(f"command: python bench/driver.py --shards {args.shards}")
    print(f"shards planned and tracked : {summary.shards_done:,} ({summary.tokens:,} tokens)")
    print(f"driver wall time           : {seconds:.1f} s  ({summary.shards_done / seconds:,.0f} shards/s, "
          f"tokenization included)")
    print(f"driver peak RSS growth     : {grown:.0f} MB (peak RSS {rss_mb():.0f} MB incl. torch/transformers)")
    print(f"commit markers, local sink : {commit_rate:,.0f} shards/s (sample of {args.commit_sample:,})")


if __name__ == "__main__":
    main()

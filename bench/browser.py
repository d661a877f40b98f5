"""Browser build benchmark: a run with L=2^20 latents, >= 10k latent pages, logit effects on.

    python bench/browser.py [--latents 1048576] [--tokens 65536] [--pages 10000] [--keep DIR]

Writes a synthetic run through the real sink (bench/storage.py: Zipf-distributed latent ids),
a sparsify-format SAE (W_dec [L, d] memory-mapped) and a model folder holding only config.json
and the unembedding + final norm tensors, then times

    post-processing (pipeline.outputs.postprocess, logit effects included; local Ray)
    the site build   (pipeline.outputs.browser, `--pages` pages), in its own process

and prints the ratio (target <= 2) and the build's peak RSS (bounded: it holds one bucket of
page latents, one int64 column per latent of latent_stats, and the index rows of the pages).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from storage import HOOK, write_synthetic_run

from pipeline.config import LogitEffectsConfig, PostprocessConfig


def write_sae_and_model(root: Path, n_latents: int, d: int, vocab: int) -> tuple[Path, Path]:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    sae = root / "sae" / HOOK
    sae.mkdir(parents=True)
    w = torch.randn(n_latents, d, generator=g, dtype=torch.float32).half()
    save_file({"encoder.weight": w, "encoder.bias": torch.zeros(n_latents, dtype=torch.float16),
               "W_dec": w.clone(), "b_dec": torch.zeros(d, dtype=torch.float16)}, str(sae / "sae.safetensors"))
    (sae / "cfg.json").write_text(json.dumps({"activation": "topk", "k": 32, "d_in": d, "num_latents": n_latents}))
    model = root / "model"
    model.mkdir()
    save_file({"lm_head.weight": torch.randn(vocab, d, generator=g), "model.norm.weight": torch.rand(d, generator=g) + 0.5},
              str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "tie_word_embeddings": False}))
    return sae, model


def build(root: str, out: str, pages: int, queue) -> None:
    from pipeline.config import SinkConfig
    from pipeline.outputs.browser import build_browser
    from pipeline.outputs.sink import RunStore

    started = time.perf_counter()
    build_browser(RunStore(SinkConfig(root=root), "bench"), out, max_latents=pages, tokenizer=None)
    queue.put((time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--latents", type=int, default=1 << 20)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=65_536)
    ap.add_argument("--pages", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=49_152)
    ap.add_argument("--bucket-size", type=int, default=1 << 16)
    ap.add_argument("--keep", default=None)
    args = ap.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="bench-browser-"))
    try:
        store, pairs = write_synthetic_run(root, args.latents, args.k, args.tokens)
        sae, model = write_sae_and_model(root, args.latents, args.d, args.vocab)
        manifest = store.read_json("manifest.json")
        manifest["saes"][HOOK].update({"path": str(sae), "sha256": "bench"})
        manifest["config"] = {"model": {"name": "bench", "path": str(model), "gguf_file": None,
                                        "dtype": "float32", "batch_size": 1}}
        store.write_json("manifest.json", manifest)

        import ray

        from pipeline.outputs.postprocess import postprocess

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        cfg = PostprocessConfig(bucket_size=args.bucket_size, logit_effects=LogitEffectsConfig(max_latents=args.pages))
        started = time.perf_counter()
        summary = postprocess(store, cfg)
        post_s = time.perf_counter() - started
        ray.shutdown()
        stats = __import__("pyarrow.parquet").parquet.read_table(root / "bench" / "latent_stats").column("n_active")
        active = int((stats.to_numpy() > 0).sum())
        print(f"synthetic run: L={args.latents:,}, k={args.k}, {pairs // args.k:,} tokens, {active:,} active latents, "
              f"SAE d={args.d}, vocab {args.vocab:,}")
        print(f"post-processing:  {post_s:.1f}s ({summary['buckets_run']} buckets, logit effects {summary['logit_effects']})")

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=build, args=(str(root), str(root / "www"), args.pages, queue))
        proc.start()
        build_s, rss_mb = queue.get()
        proc.join()
        n_pages = len(list((root / "www" / "latents" / HOOK).glob("*.html")))
        print(f"browser build:    {build_s:.1f}s for {n_pages:,} pages, peak RSS {rss_mb:,.0f} MB")
        print(f"ratio build/post: {build_s / post_s:.2f} (target <= 2; issue 23: <= 0.3)")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

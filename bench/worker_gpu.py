"""The worker's compute path on a GPU, without Ray: forward pass, top-k encode, Parquet bytes.

    python3 bench/worker_gpu.py                      # SmolLM2-135M shape, SAE L=2^24 at d=576
    python3 bench/worker_gpu.py --latents 1048576    # smaller SAE

Model: a random-initialised `LlamaForCausalLM` with SmolLM2-135M's shape (hidden 576, 30 layers,
9 heads, 3 kv heads, intermediate 1536, vocab 49152) in bf16, run up to the hookpoint layer
only (as the worker does: forward cost ends at the deepest hookpoint), no lm_head. SAE: bf16
W_enc [L, 576] with fp32 b_enc and b_dec, sparsify semantics (x - b_dec, top-k, ReLU), encoded by
`sae_harvest_kernels.topk_encode` (`--backend`, default auto). Per shard (`--seqs` x `--ctx` tokens) it
prints tokens/s for
- forward-only: the forward passes of the shard's batches;
- encode-only: the encode of the same activations (kept from a forward run);
- end-to-end: forward -> encode -> fp16 acts / int32 ids copied into pinned host buffers
  (non_blocking) -> a writer thread that waits on the copy's CUDA event and encodes the shard's
  Parquet bytes (zstd) while the GPU already runs the next batch;
and end-to-end / min(forward-only, encode-only) (target >= 0.8).
Needs only torch, transformers, pyarrow and this repo's kernels/; never imports pipeline/
(which needs Ray and Hydra). Without a CUDA device it prints one line ("skipped") and exits 0.
"""
from __future__ import annotations

import argparse
import io
import os
import queue
import sys
import threading
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", p) for p in ("kernels", ".")]  # sae_harvest_kernels, no install

TARGET = 0.8


def latents_schema(k: int):
    """Mirrors pipeline.outputs.layout.latents_schema (the pipeline's `latents/` Parquet schema); kept
    here because pipeline/ imports Ray and Hydra, which the GPU box does not have."""
    import pyarrow as pa

    return pa.schema([
        ("seq_id", pa.int64()),
        ("pos", pa.int32()),
        ("latent_ids", pa.list_(pa.int32(), k)),
        ("acts", pa.list_(pa.float16(), k)),
    ])


# Mirrors pipeline.outputs.layout.LATENTS_PARQUET (+ zstd, the sink's default compression).
PARQUET_OPTIONS = {"compression": "zstd", "use_dictionary": True, "row_group_size": 1 << 17}


def build_model(layer: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    body = model.model
    body.layers = body.layers[: layer + 1]  # forward ends at the hookpoint
    captured = {}

    def hook(_module, _inputs, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output

    body.layers[layer].register_forward_hook(hook)

    @torch.inference_mode()
    def forward(ids: torch.Tensor) -> torch.Tensor:
        body(input_ids=ids, use_cache=False)
        return captured.pop("h")

    return forward


class SAE:
    def __init__(self, n_latents: int, d: int, k: int, device: torch.device, backend: str):
        g = torch.Generator(device=device).manual_seed(1)
        self.w_enc = torch.empty(n_latents, d, dtype=torch.bfloat16, device=device)
        for start in range(0, n_latents, 2**20):  # no fp32 copy of a 16M x d matrix
            stop = min(start + 2**20, n_latents)
            self.w_enc[start:stop] = (torch.randn(stop - start, d, device=device, generator=g) / d**0.5).to(torch.bfloat16)
        self.b_enc = 0.01 * torch.randn(n_latents, device=device, generator=g)
        self.b_dec = 0.01 * torch.randn(d, device=device, generator=g)
        self.k, self.backend = k, backend

    @torch.inference_mode()
    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import sae_harvest_kernels

        x = (h.reshape(-1, h.shape[-1]).float() - self.b_dec).to(torch.bfloat16)
        values, ids = sae_harvest_kernels.topk_encode(x, self.w_enc, self.b_enc, self.k, backend=self.backend)
        return values.relu_(), ids


class ParquetWriter(threading.Thread):
    """Turns finished batches (pinned host tensors + the CUDA event of their copy) into one
    Parquet file per shard, off the GPU thread; hands pinned buffers back to `pool` for reuse.
    Jobs: a batch tuple, "end-shard", or None (stop). `jobs.join()` waits for all of them."""

    def __init__(self, k: int, pool: queue.Queue):
        super().__init__(daemon=True)
        self.k, self.pool = k, pool
        self.jobs: queue.Queue = queue.Queue()
        self.bytes_written = 0
        self.error: BaseException | None = None
        self._sink: io.BytesIO | None = None
        self._writer = None
        self.start()

    def run(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job == "end-shard":
                    self._writer.close()
                    self.bytes_written += len(self._sink.getvalue())
                    self._sink = self._writer = None
                elif job is not None and self.error is None:
                    self._write_batch(*job)
            except BaseException as exc:  # re-raised by the main thread
                self.error = exc
            finally:
                self.jobs.task_done()
            if job is None:
                return

    def _write_batch(self, event, buffers, seq_ids, n_tokens: int, ctx: int) -> None:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        event.synchronize()  # the D2H copy into `buffers` is done
        acts, ids = buffers
        schema = latents_schema(self.k)
        table = pa.Table.from_arrays([
            pa.array(np.repeat(seq_ids, ctx), type=pa.int64()),
            pa.array(np.tile(np.arange(ctx, dtype=np.int32), len(seq_ids))),
            pa.FixedSizeListArray.from_arrays(pa.array(ids[:n_tokens].numpy().reshape(-1)), self.k),
            pa.FixedSizeListArray.from_arrays(pa.array(acts[:n_tokens].numpy().reshape(-1)), self.k),
        ], schema=schema)
        if self._writer is None:
            self._sink = io.BytesIO()
            options = {key: value for key, value in PARQUET_OPTIONS.items() if key != "row_group_size"}
            self._writer = pq.ParquetWriter(self._sink, schema, **options)
        self._writer.write_table(table, row_group_size=PARQUET_OPTIONS["row_group_size"])
        self.pool.put(buffers)  # only now: pa.array may share the pinned buffers' memory


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latents", type=int, default=2**24, help="SAE width L")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--layer", type=int, default=15, help="hookpoint: output of this decoder layer")
    parser.add_argument("--seqs", type=int, default=8, help="sequences per shard")
    parser.add_argument("--ctx", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per forward / encode batch")
    parser.add_argument("--shards", type=int, default=2, help="timed shards per measurement (after one warm-up)")
    parser.add_argument("--backend", default="auto", help="sae_harvest_kernels.topk_encode backend")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: GPU worker benchmark skipped (run it on an H100-class GPU)")
        return 0

    import numpy as np

    dev = torch.device("cuda")
    forward = build_model(args.layer, dev)
    sae = SAE(args.latents, 576, args.k, dev, args.backend)
    g = torch.Generator(device=dev).manual_seed(2)
    tokens = torch.randint(0, 49152, (args.seqs, args.ctx), device=dev, generator=g)
    batches = [tokens[i:i + args.batch] for i in range(0, args.seqs, args.batch)]
    shard_tokens = args.seqs * args.ctx
    print(f"device: {torch.cuda.get_device_name(dev)}; SmolLM2-135M shape up to layer {args.layer}, "
          f"SAE L={args.latents} d=576 k={args.k} backend={args.backend}; shard = {args.seqs} x {args.ctx} tokens")

    def timed(fn) -> float:
        fn()  # warm-up shard (compiles, autotunes)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.shards):
            fn()
        torch.cuda.synchronize()
        return args.shards * shard_tokens / (time.perf_counter() - t0)

    acts = []
    fwd = timed(lambda: acts.__setitem__(slice(None), [forward(b) for b in batches]))
    enc = timed(lambda: [sae.encode(h) for h in acts])

    # End to end: pinned buffers (a pool of 3) so copies are async; a writer thread for Parquet.
    batch_tokens = args.batch * args.ctx
    pool: queue.Queue = queue.Queue()
    for _ in range(3):
        pool.put((torch.empty(batch_tokens, args.k, dtype=torch.float16, pin_memory=True),
                  torch.empty(batch_tokens, args.k, dtype=torch.int32, pin_memory=True)))
    writer = ParquetWriter(args.k, pool)

    def shard() -> None:
        for i, b in enumerate(batches):
            values, ids = sae.encode(forward(b))
            host_acts, host_ids = buffers = pool.get()  # blocks only if the writer is 3 batches behind
            n = values.shape[0]
            host_acts[:n].copy_(values.half(), non_blocking=True)
            host_ids[:n].copy_(ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            seq_ids = np.arange(i * args.batch, i * args.batch + b.shape[0], dtype=np.int64)
            writer.jobs.put((event, buffers, seq_ids, n, args.ctx))
        writer.jobs.put("end-shard")

    def shard_and_drain() -> None:
        shard()
        writer.jobs.join()  # the shard counts once its Parquet bytes exist

    e2e = timed(shard_and_drain)
    writer.jobs.put(None)
    writer.join()
    if writer.error is not None:
        raise writer.error
    ratio = e2e / min(fwd, enc)
    pairs = (args.shards + 1) * shard_tokens * args.k
    print(f"forward-only {fwd:,.0f} tok/s | encode-only {enc:,.0f} tok/s | end-to-end {e2e:,.0f} tok/s")
    print(f"end-to-end / min(forward, encode) = {ratio:.2f} (target >= {TARGET}: {'MET' if ratio >= TARGET else 'MISSED'}); "
          f"Parquet {writer.bytes_written / pairs:.2f} bytes per (id, act) pair")
    return 0


if __name__ == "__main__":
    sys.exit(main())

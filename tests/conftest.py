"""Shared fixtures: a tiny random-weight Llama with a tokenizer trained on the spot, a small
corpus of real files, a random SAE in the project's own format, and one local Ray instance.
Nothing is downloaded."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

from pipeline.sae.sae import random_sae  # noqa: E402

torch.set_num_threads(1)


# `make test` runs modules in parallel (xdist --dist loadscope), handing whole modules to the
# workers in collection order. The longest go first, so the run does not end with one of them
# alone on one worker while the other has nothing left to do (seconds per module on 2 cores:
# bench/results/tests-2026-12-07.txt). Only the order changes; unlisted modules keep theirs, after.
LONGEST_MODULES_FIRST = [
    "test_readme_commands.py", "test_faults.py", "test_ray_job.py", "test_latent_splits.py",
    "test_newcomer_output.py", "test_sharded_sae.py", "test_crosscoders.py", "test_kernels_triton.py",
    "test_multinode.py", "test_sae_scale.py", "test_verify.py", "test_redact.py",
]


def pytest_collection_modifyitems(config, items) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each module's own order kept


def require(component: str, available: bool, why: str = "") -> None:
    """Skip a test whose real component (Chromium, moto_server, sae-lens, ...) is missing, except
    under CI=true, where a missing component fails the run: CI must exercise every real component."""
    if available:
        return
    msg = f"{component} is not available" + (f": {why}" if why else "")
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true and {msg}", pytrace=False)
    pytest.skip(msg)


def require_module(module: str, component: str, why: str = ""):
    """Import `module` if installed, else `require` (skip locally, fail under CI=true)."""
    import importlib
    import importlib.util

    require(component, importlib.util.find_spec(module) is not None, why)
    return importlib.import_module(module)

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders find interpretable features in the residual stream of language models.",
    "A shard is committed only once its marker exists; readers ignore uncommitted files.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Ray actors own the model; the driver plans shards, tracks them and commits.",
    "Parquet files are read by pyarrow, pandas, polars and DuckDB without conversion.",
] * 4


def build_tokenizer(folder: Path, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(str(folder))
    return fast


def build_tiny_llama(folder: Path, vocab_size: int, hidden: int = 32, layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer(folder, TEXTS)
    build_tiny_llama(folder, len(tok))
    return folder


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    with open(folder / "a.jsonl", "w") as f:
        for i, t in enumerate(TEXTS):
            f.write(json.dumps({"text": f"{i}: {t}"}) + "\n")
    (folder / "b.txt").write_text(" ".join(TEXTS[:8]))
    return folder


@pytest.fixture(scope="session")
def tiny_sae_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saes")
    for seed, hook in enumerate(("layers.1", "layers.2")):
        random_sae(32, 96, 8, seed=seed, hookpoint=hook).save(folder / hook)
    return folder


def _end_kept_workers() -> None:
    dispatch = sys.modules.get("pipeline.runtime.dispatch")
    if dispatch is not None:
        import ray

        if ray.is_initialized():
            dispatch.release_kept_workers()


@pytest.fixture(autouse=True, scope="module")
def end_kept_workers_with_the_module():
    """Harvest workers kept by a module's runs (cluster.reuse_workers, which `make_cfg` turns on)
    serve its later tests with the same model and dictionaries (what a sweep or a notebook gets),
    and end with the module: they hold the session Ray's CPUs, which other modules need for work
    of their own (placement groups, tasks with CPUs)."""
    yield
    _end_kept_workers()


@pytest.fixture(autouse=True)
def end_kept_workers(request):
    """`@pytest.mark.own_workers`: the test starts with no kept worker and leaves none, for tests
    that count the actors they start or need every CPU of the session Ray."""
    own = request.node.get_closest_marker("own_workers") is not None
    if own:
        _end_kept_workers()
    yield
    if own:
        _end_kept_workers()


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pipeline.runtime.dispatch import local_ray_system_config

    # The product's local settings (warm task processes kept while actors hold the CPUs): a test's
    # run reuses the processes, and their imports, that the tests before it started.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             _system_config=local_ray_system_config(2),
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()

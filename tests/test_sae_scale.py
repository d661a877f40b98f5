"""A 2^24-latent SAE end to end (issue 13): local Ray, a tiny random Llama of width D, the
project's own format and an OpenAI `.pt` of the same weights. The driver runs in its own
process so its peak RSS (VmHWM) can be read; it must stay near the same driver's peak with a
96-latent SAE: the driver checks SAEs from metadata and never reads a weight.

Bound (measured on the 2-core box, `flock ... pytest -s tests/test_sae_scale.py`): a driver
with the 96-latent SAE peaks at ~529 MB. The margin allowed is RSS_MARGIN_MB = 48 MB, well under
what reading a weight costs here (the encoder alone is 256 MB: 2^24 x 8 bf16). Checked by
reverting formats.py, sae.py, preflight.py and dispatch.py to the pre-issue-13 code: the driver
then peaks at 994 MB with the OpenAI file (+465 MB: its transposed decoder copy and the mapped
encoder pages) and the test fails. (The old own-format preflight already mapped the file lazily
through safetensors and did not grow: 529 MB.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import TEXTS, build_tiny_llama, build_tokenizer
from tests.sae_files import write_openai_sae, write_own_sae

pytestmark = pytest.mark.slow

L, D, K = 1 << 24, 8, 8
HOOK = "layers.1"
RSS_MARGIN_MB = 48
REPO = Path(__file__).resolve().parents[1]

# The driver in its own process: run(cfg), then report its peak RSS (VmHWM).
RUNNER = """
import json, sys
from omegaconf import OmegaConf
from pipeline.config import RunConfig
from pipeline.runtime.driver import run
cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), json.loads(sys.argv[1])))
summary = run(cfg)
hwm = [int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
print("RESULT " + json.dumps({"vmhwm_kb": hwm, "shards": summary.shards_done, "tokens": summary.tokens}))
"""


@pytest.fixture(scope="module")
def scale(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    model = root / "model"
    model.mkdir()
    tok = build_tokenizer(model, TEXTS)
    build_tiny_llama(model, len(tok), hidden=D, layers=2)
    corpus = root / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(" ".join(TEXTS[:6]))
    small = write_own_sae(root / "small", 96, D, K, seed=1)
    own = write_own_sae(root / "own", L, D, K, seed=0)
    openai = write_openai_sae(root / "openai" / "1.pt", own, K)
    yield {"root": root, "model": model, "corpus": corpus, "small": small, "own": own, "openai": openai}
    for p in (own / "sae.safetensors", openai):  # 1.2 GB: do not leave it in pytest's basetemp
        p.unlink()


def run_driver(scale, sae_path: Path, run_id: str, ray_address: str, **extra) -> dict:
    cfg = {"run_id": run_id,
           "model": {"name": "tiny", "path": str(scale["model"]), "gguf_file": None, "dtype": "float32", "batch_size": 4},
           "sae": {"name": run_id, "path": str(sae_path), "hookpoints": [HOOK], "dtype": "bfloat16"},
           "corpus": {"name": "tiny", "paths": [str(scale["corpus"])], "ctx_len": 16, "shard_size": 4, "max_tokens": 64,
                      "token_cache": None},
           "sink": {"root": str(scale["root"] / "out")},
           "cluster": {"address": ray_address, "num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
           **extra}
    env = {**os.environ, "PYTHONPATH": str(REPO), "SAE_HARVEST_CACHE": str(scale["root"] / "cache")}
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(cfg)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def test_2pow24_latents_end_to_end(scale, ray_local):
    address = ray_local.get_runtime_context().gcs_address
    base = run_driver(scale, scale["small"], "small", address)
    own = run_driver(scale, scale["own"], "own", address)
    openai = run_driver(scale, scale["openai"], "openai", address)
    print(f"driver VmHWM MB: small-SAE {base['vmhwm_kb'] / 1024:.0f}, 2^24 own {own['vmhwm_kb'] / 1024:.0f}, "
          f"2^24 openai {openai['vmhwm_kb'] / 1024:.0f}")
    for name, r in (("own", own), ("openai", openai)):
        assert r["shards"] >= 1 and r["tokens"] == 64
        assert r["vmhwm_kb"] - base["vmhwm_kb"] < RSS_MARGIN_MB * 1024, (name, r, base)

    # The stored latents are exactly what the SAE gives for these tokens (same weights, bf16, loaded
    # here independently), with ids spanning the whole 2^24 range.
    from pipeline.config import ModelConfig
    from pipeline.model.harvest import Harvester
    from pipeline.model.loader import load_model
    from pipeline.sae.formats import load_sae

    out = scale["root"] / "out"
    ctx = pq.read_table(next((out / "own" / "contexts").rglob("*.parquet")))
    lat = pq.read_table(next((out / "own" / "latents").rglob("*.parquet")))
    tokens = torch.tensor(np.stack(ctx["token_ids"].to_numpy(zero_copy_only=False)).astype(np.int64))
    model = load_model(ModelConfig(path=str(scale["model"]), gguf_file=None, dtype="float32"))
    acts = Harvester(model, [HOOK])(tokens)[HOOK].reshape(-1, D)
    sae = load_sae(scale["own"], dtype="bfloat16", with_decoder=False)
    assert sae.W_dec is None and sae.W_enc.dtype == torch.bfloat16
    values, ids = sae.encode(acts)
    stored_ids = np.stack(lat["latent_ids"].to_numpy(zero_copy_only=False))
    np.testing.assert_array_equal(stored_ids, ids.numpy())
    np.testing.assert_array_equal(np.stack(lat["acts"].to_numpy(zero_copy_only=False)), values.half().numpy())
    assert stored_ids.max() > L // 2

    manifest = json.loads((out / "openai" / "manifest.json").read_text())
    assert manifest["saes"][HOOK]["n_latents"] == L and manifest["saes"][HOOK]["format"] == "openai"

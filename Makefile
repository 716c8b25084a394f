# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv from the lock first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.imtok-installed
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup data-deps browser-deps test test-fast lint demo ui lock clean-venv

setup: $(STAMP)

# Installs exactly the pinned set, retried, with pip's output kept in .venv/pip-install.log.
$(STAMP): requirements.lock pyproject.toml scripts/setup_venv.sh
	scripts/setup_venv.sh $(PYTHON) $(VENV)
	@touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist when we can install it (root with apt);
# elsewhere the prepare stage downloads it from the public mirrors or says how to get it.
data-deps:
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; tests that need it fall back as they report"; \
	else echo "note: $(FMNIST_DIR) is absent and apt is not usable here; see docs/data.md"; fi

# Chromium for the UI test (what a user sees in MLflow), the same way; without it that test is skipped.
browser-deps:
	@if command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "note: could not install chromium; the MLflow UI test is skipped"; \
	else echo "note: no chromium here and apt is not usable; the MLflow UI test is skipped"; fi

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The suite in PYTEST_WORKERS pytest-xdist processes (0: in this process); an idle worker takes
# the tests still queued on a busy one (worksteal).
PYTEST_WORKERS ?= 2
test: $(STAMP) data-deps browser-deps lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

# The inner loop: the unit tier, without the tests marked slow (stages and DVC in subprocesses,
# services, multi-process DDP, training runs; see tests/conftest.py). Not a substitute for `make test`.
test-fast: $(STAMP) data-deps
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "not slow and not integration"

# The main job: the whole pipeline on Fashion-MNIST (prepare, tokenizer, tokens, prior, samples,
# classifier, evaluation) through DVC, then the metrics table and the path of the sample grid.
demo: $(STAMP) data-deps
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro
	$(BIN)/python -m demos.report

# The MLflow UI over the embedded store (runs, metrics, the model registry) on localhost.
ui: $(STAMP)
	$(BIN)/python -m imtok.ui --host 127.0.0.1 --port 5000

# Regenerate the lock after changing dependencies in pyproject.toml (needs `uv`).
lock:
	@command -v uv >/dev/null || { echo "make lock needs uv on PATH: pip install uv" >&2; exit 1; }
	uv pip compile pyproject.toml --extra test --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 -o requirements.lock

clean-venv:
	rm -rf $(VENV)

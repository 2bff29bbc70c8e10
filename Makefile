# Every target sets up what it needs: the virtualenv and packages, Debian's
# redis-server and PostgreSQL, and the FerretDB launcher (built once with Go
# into .cache/).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test lint format setup servers bench clean k6-smoke k6-load k6-spike k6-soak test-deploy

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)
	$(PY) -m scripts.stack setup

# HOST, PORT, WORKERS and every other setting come from the environment (core/settings.py)
run: setup
	$(PY) -m scripts.stack exec -- $(PY) -m scripts.serve

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy core service rollups scripts tests

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: setup lint test-deploy
	$(PY) -m pytest $(PYTEST_ARGS)
	$(MAKE) --no-print-directory k6-smoke

# docker/ checked without a Docker engine (none runs here): BuildKit's Dockerfile
# parser and lint rules, compose-go (`docker compose config`'s loader), the
# deployment's own rules (scripts/deploy_check.py); seconds once the Go checker
# is built into .cache/bin
test-deploy: $(STAMP)
	$(PY) -m pytest --noconftest -q tests/test_deploy.py

# k6 scenarios: fresh stack + service, run, verify every 202 is stored exactly
# once and summaries match the raw events, report, stop (K6_ARGS="-e BASE_RATE=30")
k6-smoke k6-load k6-spike k6-soak: k6-%: setup
	$(PY) -m scripts.k6_run $* $(K6_ARGS)

# same-run ceilings and figures -> docs/PERFORMANCE.md + docs/ingest-throughput.png
bench: setup
	$(PY) -m scripts.bench $(BENCH_ARGS)

clean:
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .hypothesis

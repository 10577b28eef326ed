# HemaFlow: the two commands are `make demo` (whole pipeline, ending with a served model)
# and `make test` (every test). Both install what they need on a fresh clone.
SHELL := /bin/bash
PYTHON_BIN ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt | sha256sum | cut -c1-12)
PYTEST_ARGS ?=

.PHONY: install browser services test test-fast demo demo-down stack-up stack-down secrets env bench

install: $(STAMP)

$(STAMP): requirements.txt
	@test -x $(PY) || $(PYTHON_BIN) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	@rm -f $(VENV)/.installed-* && touch $@

# Debian's Chromium for the browser tests (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian chromium for the browser tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null; }

# Debian's Redis and PostgreSQL for the CeleryExecutor tests (tests/airflow), started by the tests
# themselves as loopback processes, like docker-compose.yml's broker and database.
services:
	@command -v redis-server >/dev/null 2>&1 && ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  echo "installing Debian redis-server and postgresql for the Airflow tests"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server postgresql) >/dev/null; }

test: install browser services
	$(PY) -m pytest $(PYTEST_ARGS)

# Unit, DAG-parsing and serving tests only (no stack, no training): a quick local loop.
test-fast: install
	$(PY) -m pytest -m "not slow" tests/unit tests/dags $(PYTEST_ARGS)

demo: install
	$(PY) -m scripts.demo up

demo-down: install
	$(PY) -m scripts.demo down

# Per-install random secrets under HEMAFLOW_HOME/secrets.env (make demo does this itself).
secrets: install
	$(PY) -m pipeline secrets init

# A ready .env for docker compose: .env (else .env.example) with every empty secret filled.
env: install
	$(PY) -m pipeline secrets env

stack-up: install
	$(PY) -m pipeline stack up

stack-down: install
	$(PY) -m pipeline stack down

bench: install
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/accuracy.py --dataset leukemia
	$(PY) benchmarks/serving.py
	$(PY) benchmarks/dag.py

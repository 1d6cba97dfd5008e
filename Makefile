# Two commands matter: `make run` and `make test`. Both set up what they can first (uv and the
# Python env, the Kafka jars; PostgreSQL, and for `make test` Chromium, with apt when root), name
# any other prerequisite that is missing (README.md), and can be run again safely.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .local/tools
UV := $(TOOLS)/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
# Ports of the local Kafka and Postgres (infra/kafka.sh, infra/postgres.sh); set KAFKA_PORT /
# PG_PORT when one is taken. The services, tests and benchmarks reach them through
# EHR_KAFKA_BOOTSTRAP_SERVERS and PG_ADMIN_DSN, derived from these unless set explicitly.
export KAFKA_PORT ?= 19092
export KAFKA_SASL_PORT ?= 19094
export PG_PORT ?= 15432
export EHR_KAFKA_BOOTSTRAP_SERVERS ?= 127.0.0.1:$(KAFKA_PORT)
export EHR_TEST_KAFKA_SASL ?= 127.0.0.1:$(KAFKA_SASL_PORT)
export PG_ADMIN_DSN ?= postgresql://postgres@127.0.0.1:$(PG_PORT)/postgres
# kustomize for make deploy-check, built from the Go module proxy with the installed Go as is
# (GOTOOLCHAIN=local: no newer toolchain is fetched); its go.mod needs Go 1.24 or newer.
# Installed once into .local/tools/bin, offline afterwards.
KUSTOMIZE_VERSION := v5.8.1
GO_MIN_MINOR := 24
KUSTOMIZE := $(TOOLS)/bin/kustomize
PYTEST_ARGS ?=

.PHONY: help setup chromium venv infra infra-down run demo test test-only test-faults lint format bench bench-smoke clean deploy-check

help:
	@echo "make run    - set up and start Kafka, Postgres, the stand-ins and the four services; Ctrl-C stops"
	@echo "make test   - set up, start Kafka and Postgres, lint, then run every test"
	@echo "make demo   - start everything and drive one visit from booking to report"
	@echo "make test-faults - the fault-injection and privacy suite (kills the local Kafka and Postgres; run alone)"
	@echo "make lint   - ruff and mypy --strict"
	@echo "make deploy-check - render deploy/overlays with kustomize and validate them offline"
	@echo "make bench  - run the benchmarks (bench/results/latest.json)"
	@echo "make clean  - stop everything and delete .local and .venv"

$(UV):
	@command -v $(PYTHON) >/dev/null || { echo "Python 3.11 is required ($(PYTHON) not found)."; exit 1; }
	@echo "setup: installing uv $(UV_VERSION) into $(TOOLS)"
	@$(PYTHON) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q "uv==$(UV_VERSION)"

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	@echo "setup: syncing the Python environment from uv.lock"
	@$(UV) sync --frozen --python $(PYTHON) -q
	@touch $@

venv: $(VENV)/.synced

setup: venv
	@infra/kafka.sh install
	@infra/postgres.sh install
	@$(PY) -m sandbox.tls .local/tls >/dev/null

# Only the browser tests need Chromium (make test); make run and make demo do not.
chromium:
	@infra/chromium.sh install

infra: setup
	@infra/postgres.sh start
	@infra/kafka.sh start

infra-down:
	@infra/kafka.sh stop || true
	@infra/postgres.sh stop || true

run: infra
	@$(PY) -m infra.run

demo: infra
	@$(PY) -m infra.demo

test: infra chromium lint deploy-check
	@$(PY) -m bench --smoke >/dev/null && echo "bench-smoke: every benchmark ran"
	@$(MAKE) --no-print-directory test-only

test-only:
	@$(PY) -m pytest $(PYTEST_ARGS)

# Not part of `make test`: it SIGKILLs the shared Kafka broker and restarts Postgres, so it must
# run alone (no other pytest against them). FAULTS_APPOINTMENTS=500 for the full day (default 60).
test-faults: infra
	@if pgrep -f '[p]ytest' >/dev/null; then echo "test-faults: other test runs use Kafka and Postgres; wait for them:"; pgrep -af '[p]ytest'; exit 1; fi
	@EHR_FAULTS=1 $(PY) -m pytest tests/faults -s -p no:cacheprovider $(PYTEST_ARGS)

lint: venv
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check . >/dev/null || { $(VENV)/bin/ruff format --check .; exit 1; }
	@$(VENV)/bin/mypy libs services sandbox infra bench tests
	@echo "lint: ruff and mypy --strict passed"

format: venv
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

bench: infra
	@infra/wrk.sh
	@$(PY) -m bench

bench-smoke: infra
	@infra/wrk.sh
	@$(PY) -m bench --smoke

clean: infra-down
	rm -rf .local $(VENV)

$(TOOLS)/.kustomize-$(KUSTOMIZE_VERSION):
	@command -v go >/dev/null || { echo "Go 1.$(GO_MIN_MINOR) or newer is required to build kustomize $(KUSTOMIZE_VERSION) for make deploy-check: install it from https://go.dev/dl (Debian 12's golang-go is Go 1.19, too old)."; exit 1; }
	@minor=$$(go env GOVERSION | sed -nE 's/^go1\.([0-9]+).*/\1/p'); [ "$${minor:-0}" -ge $(GO_MIN_MINOR) ] || { echo "kustomize $(KUSTOMIZE_VERSION) needs Go 1.$(GO_MIN_MINOR) or newer, found $$(go env GOVERSION) (the build uses GOTOOLCHAIN=local, so it will not fetch a newer one): install it from https://go.dev/dl (Debian 12's golang-go is Go 1.19)."; exit 1; }
	@echo "setup: installing kustomize $(KUSTOMIZE_VERSION) into $(TOOLS)/bin (Go module proxy)"
	@mkdir -p $(TOOLS)/bin
	@GOBIN=$(abspath $(TOOLS)/bin) GOTOOLCHAIN=local GOFLAGS=-mod=mod go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION)
	@touch $@

# Renders deploy/overlays/{test,production}, validates every object offline and checks the
# project's rules (infra/deploy_check.py); lints deploy/Dockerfile with hadolint.
deploy-check: venv $(TOOLS)/.kustomize-$(KUSTOMIZE_VERSION)
	@$(PY) -m infra.deploy_check --kustomize $(KUSTOMIZE) --hadolint $(VENV)/bin/hadolint

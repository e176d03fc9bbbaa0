# User targets: `make recipe=NAME [set="key=value ..."]`, `make sweep recipe=NAME`, `make report [sweep=ID]
# [runtime=openvino]`, `make export recipe=NAME [format=onnx|openvino] [out=DIR]`, `make ui`.  Developer: `make test`, `make lint`, `make bench`.
# Every target builds the virtual environment (.venv) from pyproject.toml on first use.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
recipe ?= prune-inq-distill
set ?=
port ?= 5000
sweep ?=
runtime ?=
format ?= all
out ?= export/$(notdir $(basename $(recipe)))
executor ?=
address ?=
host ?= 127.0.0.1
server_db ?= sqlite:///$(CURDIR)/server/mlflow.db
# The report test renders HTML in a real browser: Debian's Chromium, installed on first `make test`.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.DEFAULT_GOAL := run
.PHONY: run validate stages ui server test lint format sweep report export clean-cache bench bench-prune bench-inq bench-inq-levels bench-distill bench-qat bench-deploy

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -e '.[dev,ray]'
	touch $(STAMP)

venv: $(STAMP)

run: $(STAMP)  ## run recipes/$(recipe).yaml (or a path), with overrides in set="..."
	$(PY) -m pipeline run $(recipe) $(set)

validate: $(STAMP)
	$(PY) -m pipeline validate $(recipe) $(set)

stages: $(STAMP)
	$(PY) -m pipeline stages

ui: $(STAMP)  ## MLflow UI on http://127.0.0.1:$(port) over the project's store
	$(VENV)/bin/mlflow ui --backend-store-uri $${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db} \
		--host 127.0.0.1 --port $(port)

sweep: $(STAMP)  ## every ordering of recipes/$(recipe).yaml (its `orderings:`, else all), then its report
	$(PY) -m pipeline sweep $(recipe) $(set) $(if $(executor),--executor $(executor)) $(if $(address),--address $(address))

server: $(STAMP)  ## MLflow tracking server on http://$(host):$(port): SQLite backend, artifacts served by it
	mkdir -p server
	$(VENV)/bin/mlflow server --backend-store-uri $(server_db) --artifacts-destination $(CURDIR)/server/artifacts \
		--host $(host) --port $(port)

report: $(STAMP)  ## Pareto report of sweep=ID (default: the latest sweep) into reports/<sweep>/, in runtime=
	$(PY) -m pipeline report $(sweep) $(if $(runtime),--runtime $(runtime))

export: $(STAMP)  ## the final model of recipes/$(recipe).yaml (already run) as ONNX / OpenVINO IR into out=DIR
	$(PY) -m pipeline export $(recipe) $(set) --format $(format) --out $(out)

$(CHROMIUM):
	@command -v apt-get >/dev/null || { echo "install Chromium (/usr/bin/chromium) for the HTML report test"; exit 1; }
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium chromium-driver >/dev/null

test: $(STAMP) $(CHROMIUM)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline stages tests bench
	$(VENV)/bin/ruff format --check pipeline stages tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format pipeline stages tests bench
	$(VENV)/bin/ruff check --fix pipeline stages tests bench

bench: bench-prune bench-inq bench-inq-levels bench-distill bench-qat bench-deploy  ## every benchmark (CIFAR-10, default recipe model; see BENCHMARKS.md)

bench-prune: $(STAMP)
	$(PY) bench/prune.py

bench-inq: $(STAMP)
	$(PY) bench/inq.py

bench-inq-levels: $(STAMP)
	$(PY) bench/inq_levels.py

bench-distill: $(STAMP)
	$(PY) bench/distill.py

bench-qat: $(STAMP)
	$(PY) bench/qat.py

bench-deploy: $(STAMP)
	$(PY) bench/deploy.py

clean-cache:
	rm -rf .cache

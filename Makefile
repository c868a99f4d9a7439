# asrflow — the two commands are `make pipeline-local` and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.asrflow-installed
PROFILE ?= local
WEEK ?=
WEEKS ?=
ASRFLOW_ROOT ?= $(CURDIR)/artifacts/$(PROFILE)
export PYTHONHASHSEED := 0

# Debian packages the project needs (espeak-ng + Festival voices synthesize the embedded corpus,
# flite the golden set's unseen synthesizer;
# chromium + chromedriver drive the Airflow UI test; postgresql + redis for distributed mode).
APT_PACKAGES := espeak-ng festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite sox chromium chromium-driver postgresql redis-server
APT_STAMP := $(VENV)/.apt-installed

.PHONY: setup test pipeline-local bench lint airflow-ui clean-artifacts apt distributed-local distributed-stop distributed-status

setup: $(STAMP) $(APT_STAMP)

$(APT_STAMP): Makefile
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo ">> apt-get install$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	# torch first: deepspeed's build imports it (pure-Python build, no build isolation)
	$(BIN)/pip install -q torch==2.11.0 torchaudio==2.11.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q --no-build-isolation deepspeed==0.19.8
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip check
	@touch $@

test: setup
	$(BIN)/python -m pytest -q --durations=25 tests

# The whole asr_retraining DAG through Airflow (`airflow dags test`), e.g. `make pipeline-local WEEK=2`;
# `make pipeline-local WEEKS=4` runs weeks 1..4 in order, each warm-started from the week before.
pipeline-local: setup
	$(BIN)/python -m devstack.local_run --profile $(PROFILE) $(if $(WEEK),--week $(WEEK),) $(if $(WEEKS),--weeks $(WEEKS),)

bench: setup
	$(BIN)/pip install -q 'lhotse==1.33.*' urllib3
	@set -e; for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b; done

lint: setup
	$(BIN)/ruff check .

# Airflow UI (api-server, scheduler, dag-processor) + MLflow UI on 127.0.0.1; Ctrl-C stops them.
AIRFLOW_PORT ?= 8080
MLFLOW_PORT ?= 5000
airflow-ui: setup
	$(BIN)/python -m devstack.airflow_ui --profile $(PROFILE) --port $(AIRFLOW_PORT) --mlflow-port $(MLFLOW_PORT)

clean-artifacts:
	rm -rf artifacts/

# Distributed mode on loopback: Postgres + Redis + MLflow server + Airflow (CeleryExecutor, workers on
# queues default and gpu), state in $(ASRFLOW_DIST_DIR) (default .local/distributed/). See README.md, "Production path".
distributed-local: setup  # DIST_ARGS="--gpu-workers 2": two GPU workers for a week with train.nnodes=2
	$(BIN)/python -m devstack.distributed_stack up $(DIST_ARGS)

distributed-stop:
	$(BIN)/python -m devstack.distributed_stack down

distributed-status:
	$(BIN)/python -m devstack.distributed_stack status

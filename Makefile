# skulens: two commands do all set-up on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.skulens-installed
export PYTHONDONTWRITEBYTECODE :=
export MLFLOW_DISABLE_TELEMETRY := true
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: install run test simulate ui down status lint lock clean-state snapshot screenshots

$(STAMP): pyproject.toml requirements-lock.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -U pip
	$(BIN)/python -m pip install -c requirements-lock.txt -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)  ## create the venv and install skulens with pinned dependencies

run: install  ## start local S3 + MLflow, load the demo catalog if empty, run the main job
	$(BIN)/skulens run

TEST_WORKERS ?= 2
test: install  ## the whole test suite in $(TEST_WORKERS) parallel workers (each starts its own services on free ports)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --durations=15

simulate: install  ## 30 catalog days on GroZi-120 through the real daemon (bench/simulate_days.py; ~1.5 h on 2 cores)
	$(BIN)/python bench/simulate_days.py --out .skulens/simulation --fresh $(SIM_ARGS)

ui: install  ## Dagster webserver + daemon on 127.0.0.1:3000, and MLflow
	$(BIN)/skulens services up --ui

down:  ## stop every service skulens started
	@if [ -x $(BIN)/skulens ]; then $(BIN)/skulens services down; else echo "nothing installed"; fi

status: install
	$(BIN)/skulens services status

screenshots: install  ## PNGs of the Dagster UI (needs `make ui` running and Debian's chromium) into docs/screenshots
	$(BIN)/python bench/screenshots.py --out docs/screenshots

snapshot: install  ## regenerate tests/pipelines/snapshots/asset_graph.json after an intended change to the asset graph
	$(BIN)/python -m tests.pipelines.test_definitions

lint: install
	$(BIN)/ruff check skulens assets resources pipelines tests bench

lock:  ## re-resolve requirements-lock.txt from pyproject ranges (needs uv; pip backtracks for >10 min)
	uv pip compile pyproject.toml --extra dev --python-version 3.11 --index-strategy unsafe-best-match \
	  $$(pip config list 2>/dev/null | sed -n "s/.*extra-index-url='\(.*\)'/\1/p" | tr ' ' '\n' | sed 's/^/--extra-index-url /') \
	  --find-links /opt/wheels -c requirements-lock.txt --no-header --no-annotate -o requirements-lock.txt

clean-state: down  ## delete the local state folder (.skulens): S3 data, MLflow db, Dagster home
	rm -rf .skulens

# dogflow: every target bootstraps .venv at the repo root first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv demo test test-fast bench bench-flow slurm-up slurm-down deploy clean

venv: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	# compile the engine's numba kernels once into their on-disk cache (tasks/__pycache__), so that the
	# first processes (CI, `make demo`, its workers) load them instead of each compiling them
	$(BIN)/python -c "import tasks.dog"
	touch $(STAMP)

## make demo: sample dataset -> real Prefect flow on a LocalCluster (ephemeral API) -> prints the output path
demo: venv
	PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/dogflow demo --workdir demo-data

## make test: the whole suite (SLURM, server and browser tests skip with a reason when their service is absent;
## .ci/run starts every service and fails if any of them skipped)
test: venv
	$(BIN)/python -m pytest -ra $(PYTEST_ARGS)

test-fast: venv
	$(BIN)/python -m pytest -ra -m "not slurm and not sge and not server and not browser" $(PYTEST_ARGS)

bench: venv
	$(BIN)/python benchmarks/engine.py

bench-flow: venv
	$(BIN)/python benchmarks/flow.py

slurm-up:
	bash infra/slurm/slurm.sh start

slurm-down:
	bash infra/slurm/slurm.sh stop

deploy: venv
	bash deployments/deploy.sh

clean:
	rm -rf $(VENV) demo-data .pytest_cache .hypothesis

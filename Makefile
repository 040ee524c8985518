# The README's two set-up commands: `make demo` and `make test`. Each creates .venv and installs
# what it needs (CPU torch pinned so no CUDA build is downloaded).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90
export MLFLOW_DISABLE_TELEMETRY ?= true
export DO_NOT_TRACK ?= true
# Idle OpenMP workers sleep instead of spinning (see embrag_cli/main.py).
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: install demo test test-slow bench bench-accuracy bench-scale lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/embrag demo --run-dir runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/v17_vs_v18.py

# Against Beagle 5.4, minimac4 and the model-free baselines by the protocol of issue 9 (3 seeds x 2
# demographies, 200 markers/Mb; apt-get install beagle minimac4 bcftools tabix); about 10 CPU minutes
# per replicate with the default 5-minute training. Resumable: stages on disk are reused.
bench-accuracy: $(STAMP)
	$(BIN)/python benchmarks/accuracy.py

# Cost of every stage against region length and panel size, Beagle 5.4 beside impute (issue 13):
# 1-50 Mb x 800 and 5,000 haplotypes, 500 target samples; hours on 2 cores. A smaller grid:
# make bench-scale SCALE_ARGS="--mb 1,5 --haps 800 --samples 50"
SCALE_ARGS ?=
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py $(SCALE_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check embrag storage tasks flows embrag_cli tests benchmarks

clean:
	rm -rf runs .pytest_cache

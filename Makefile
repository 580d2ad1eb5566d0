# vitrine — the two commands a newcomer needs: `make demo` and `make test`.
# Each creates (or refreshes, when pyproject.toml changed) the virtual environment in .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitrine-installed
DEMO_DIR ?= work/demo

NODE_DIR := examples/node
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json

.PHONY: venv node-client demo test lint protos clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

demo: venv
	$(BIN)/vitrine demo --work-dir $(DEMO_DIR)

# the Node.js client example (tests/test_client_node.py): installed when npm is present, else that test skips
node-client: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		(cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error) || \
		echo "npm ci failed in $(NODE_DIR): the Node.js client test will be skipped"; \
	else echo "npm not found: the Node.js client test will be skipped"; fi

test: venv node-client
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy model indexer engine vitrine

protos: venv
	$(BIN)/python scripts/gen_protos.py

clean:
	rm -rf work .pytest_cache .ruff_cache .mypy_cache

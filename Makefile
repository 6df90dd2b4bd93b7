# gptforge: `make install`, `make test`, `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The offline mirror of datasets and tokenizer files, used first when present.
SHARED_DATA := $(abspath ../shared/data)
export GPTFORGE_DATA_MIRROR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: install test lint demo clean chromium

install: $(VENV)/.installed $(VENV)/.llama

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

# llama.cpp, which tests/test_gguf_export.py runs the GGUF export in: llama-cpp-python compiles it from
# source (a C++ compiler and CMake; apt installs them when missing), once per venv: 7 CPU-minutes, so about
# 5 minutes on 2 idle cores.
# Portable AVX2 code, not -march=native: ggml's native build crashes in its AMX kernels on some Xeons (q8_0).
# --no-cache-dir: never a wheel pip cached from a build with other flags.
LLAMA_CPP := llama-cpp-python==0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DLLAVA_BUILD=OFF
$(VENV)/.llama: | $(VENV)/.installed
	@command -v c++ >/dev/null && command -v cmake >/dev/null \
		|| { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq g++ cmake; }
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet --no-cache-dir $(LLAMA_CPP)
	touch $@

test: install chromium
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# The playground's browser test drives Debian's chromium (never a downloaded browser build): apt installs it when
# missing; where it cannot, tests/test_serve_browser.py is skipped and says why.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
chromium:
	@test -x /usr/bin/chromium || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; } \
		|| echo "chromium could not be installed: the browser test will be skipped"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The CPU quick start: Shakespeare, a 4-layer character-level GPT, 2000 iterations, then a sample.
demo: install
	$(BIN)/gptforge prepare shakespeare_char
	$(BIN)/gptforge train configs/quickstart_cpu.toml
	$(BIN)/gptforge sample --out_dir=out-shakespeare-char --num_samples=2 --max_new_tokens=300

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache

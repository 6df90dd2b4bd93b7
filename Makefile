# gptforge: `make install`, `make test`, `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The offline mirror of datasets and tokenizer files, used first when present.
SHARED_DATA := $(abspath ../shared/data)
export GPTFORGE_DATA_MIRROR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: install test lint demo clean chromium

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# Pinned first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
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

# gptforge: `make install`, `make test`, `make demo`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# The offline mirror of datasets and tokenizer files, used first when present.
SHARED_DATA := $(abspath ../shared/data)
export GPTFORGE_DATA_MIRROR ?= $(if $(wildcard $(SHARED_DATA)),$(SHARED_DATA),)

.PHONY: install test lint demo chat-demo clean chromium

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

# SFT learns, on the CPU (docs/chat.md, "A demo that shows it learns"): checkable word tasks whose held-out
# words training never sees, scored by greedy exact match before finetuning (the base with the chat template:
# one step at a learning rate of 1e-9), after full SFT and after LoRA SFT. The base is `make demo`'s run.
CHAT_BASE ?= out-shakespeare-char
CHAT_OUT ?= out-chat-demo
CHAT_SEED ?= 0
CHAT_SFT = --init_from=$(CHAT_BASE) --data=$(CHAT_OUT)/tasks/train.jsonl --block_size=36 --batch_size=32 \
	--max_iters=600 --lr_decay_iters=600 --warmup_iters=20 --eval_interval=300 --eval_iters=5 --log_interval=100
CHAT_EVAL = --task=chat --data=$(CHAT_OUT)/tasks/val.jsonl --which=latest --progress=False

out-shakespeare-char/ckpt.pt:
	$(MAKE) demo

chat-demo: $(VENV)/.installed $(CHAT_BASE)/ckpt.pt
	rm -rf "$(CHAT_OUT)"
	$(BIN)/python examples/chat_tasks.py --out=$(CHAT_OUT)/tasks --n_train=4000 --n_val=300 --seed=$(CHAT_SEED) \
		--run=$(CHAT_BASE)
	$(BIN)/gptforge sft $(CHAT_SFT) --out_dir=$(CHAT_OUT)/before --max_iters=1 --learning_rate=1e-9 --min_lr=0 \
		--warmup_iters=0
	$(BIN)/gptforge sft $(CHAT_SFT) --out_dir=$(CHAT_OUT)/full --learning_rate=2e-3 --min_lr=2e-4
	$(BIN)/gptforge sft $(CHAT_SFT) --out_dir=$(CHAT_OUT)/lora --learning_rate=3e-3 --min_lr=3e-4 \
		--lora_rank=16 --lora_alpha=32 --lora_targets=c_attn,c_proj,c_fc
	$(BIN)/gptforge eval $(CHAT_EVAL) --out_dir=$(CHAT_OUT)/before
	$(BIN)/gptforge eval $(CHAT_EVAL) --out_dir=$(CHAT_OUT)/full
	$(BIN)/gptforge eval $(CHAT_EVAL) --out_dir=$(CHAT_OUT)/lora
	$(BIN)/python examples/chat_tasks.py --table=$(CHAT_OUT)/before,$(CHAT_OUT)/full,$(CHAT_OUT)/lora \
		--data=$(CHAT_OUT)/tasks/val.jsonl

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache

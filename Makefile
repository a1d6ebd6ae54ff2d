# dptrain — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-all lint bench bench-dist bench-gpu gpu-check mutants report clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install dptrain (editable) with its dev extras

demo: $(STAMP) ## train privately on the embedded default (digits, small CNN, eps=3) and print the summary
	$(BIN)/dptrain

test: $(STAMP) ## the fast test suite (CPU, no network, < 10 min)
	$(BIN)/python -m pytest

test-all: $(STAMP) ## every test, slow ones included
	$(BIN)/python -m pytest -m ''

lint: $(STAMP) ## ruff
	$(BIN)/ruff check dptrain tests

bench: $(STAMP) ## CPU speed/memory benchmark → results/bench-cpu.{csv,md,png}
	$(BIN)/dptrain-bench --out results/bench-cpu

bench-gpu: $(STAMP) ## the issue's GPU benchmark at 224×224 → results/bench-gpu.{csv,md,png}
	$(BIN)/dptrain-bench --device cuda --models resnet18 vgg19 vit_base beit_base --sizes 224 --batches 32 \
		--engines nonprivate mixed_ghost mixed_ghost_2pass opacus nonprivate_bf16 mixed_ghost_bf16 --steps 5 \
		--out results/bench-gpu
	$(BIN)/dptrain-bench --device cuda --models beit_large --sizes 224 --batches 8 16 \
		--engines nonprivate_bf16 mixed_ghost_bf16 --steps 3 --out results/bench-gpu-beit-large

bench-dist: $(STAMP) ## samples/s of one DP step on 1 vs 2 data-parallel processes → results/bench-dist-cpu.{csv,md}
	$(BIN)/dptrain-bench --processes 1 2 --models cnn resnet18 --engines nonprivate mixed_ghost --batches 64 \
		--steps 10 --out results/bench-dist-cpu

# mutation testing (mutmut; config: pyproject.toml [tool.mutmut]): the privacy arithmetic, and of engine.py the
# clip factors. Every surviving mutant is killed by a test or listed as equivalent in results/mutants.md.
MUTANTS := 'dptrain.privacy.optimizer.*' 'dptrain.privacy.sampling.*' 'dptrain.privacy.accounting.*' \
	'dptrain.privacy.streams.*' 'dptrain.budget.*' 'dptrain.privacy.engine.x*_clip_factors__mutmut_*' \
	'dptrain.privacy.engine.x*_finish__mutmut_*' 'dptrain.privacy.engine.x__zero_rows__mutmut_*'
MUTANT_JOBS ?= 1
mutants: $(STAMP) ## mutation testing of the privacy code (not in `make test`) → counts + every surviving mutant
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTANT_JOBS) $(MUTANTS)
	$(BIN)/python tests/mutants_summary.py $(MUTANTS)

# no install step: a lent GPU machine is bare and offline (torch + timm only); the venv's python when there is one
GPU_PY := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
gpu-check: ## every GPU check in one command (exactness, RNG replay, bf16 bound, 224×224 bench) → results/gpu-check.*
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PY) -m dptrain.gpu_check --out $${OUT:-results}/gpu-check

clean: ## remove run outputs
	rm -rf outputs multirun

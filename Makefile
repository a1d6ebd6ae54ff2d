# dptrain — `make help` lists the targets.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-slow test-all test-torch-min lint bench bench-dist bench-gpu gpu-check gpu-wheels mutants report clean

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

test: $(STAMP) ## the fast test suite (CPU, no network, < 6 min on an idle 2-core machine)
	$(BIN)/python -m pytest

test-slow: $(STAMP) ## the end-to-end tests `make test` leaves out (CPU; everything not marked gpu)
	$(BIN)/python -m pytest -m 'slow and not gpu'

test-all: $(STAMP) ## every test, slow ones included
	$(BIN)/python -m pytest -m ''

# The oldest torch of pyproject's range, on Python 3.12 where this machine has it: a lent GPU machine's pair
# (torch 2.11, python 3.12). PyPI's torch 2.11 is the CUDA build (~3 GB with its nvidia libraries); it runs on CPU.
MIN_VENV  := .venv-torch-min
MIN_STAMP := $(MIN_VENV)/.installed
MIN_PY    ?= $(shell for p in python3.12 $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12; do \
	$$p -c '' 2>/dev/null && { echo $$p; break; }; done)
$(MIN_STAMP): pyproject.toml
	$(or $(MIN_PY),$(PY)) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/pip install -q --upgrade pip
	$(MIN_VENV)/bin/pip install -q torch==2.11.* torchvision==0.26.*
	$(MIN_VENV)/bin/pip install -q -e '.[dev]'
	touch $(MIN_STAMP)

test-torch-min: $(MIN_STAMP) ## the fast suite on the oldest supported torch (2.11) → .venv-torch-min
	$(MIN_VENV)/bin/python -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__)'
	$(MIN_VENV)/bin/python -m pytest

lint: $(STAMP) ## ruff
	$(BIN)/ruff check dptrain tests scripts hydra_plugins

bench: $(STAMP) ## CPU speed/memory benchmark → results/bench-cpu.{csv,md,png}
	$(BIN)/dptrain-bench --out results

bench-dist: $(STAMP) ## samples/s of one DP step on 1 vs 2 data-parallel processes → results/bench-dist-cpu.{csv,md}
	$(BIN)/dptrain-bench --processes 1 2 --models cnn resnet18 --engines nonprivate mixed_ghost --batches 64 \
		--steps 10 --out results

# mutation testing (mutmut; config: pyproject.toml [tool.mutmut]): the privacy arithmetic, and of engine.py the
# clip factors. Every surviving mutant is killed by a test or listed as equivalent in results/mutants.md.
MUTANTS := 'dptrain.privacy.optimizer.*' 'dptrain.privacy.sampling.*' 'dptrain.privacy.accounting.*' \
	'dptrain.privacy.streams.*' 'dptrain.train.budget.*' 'dptrain.privacy.engine.x*_clip_factors__mutmut_*' \
	'dptrain.privacy.engine.x*_finish__mutmut_*' 'dptrain.privacy.engine.x__zero_rows__mutmut_*'
MUTANT_JOBS ?= 1
mutants: $(STAMP) ## mutation testing of the privacy code (not in `make test`) → counts + every surviving mutant
	rm -rf mutants
	$(BIN)/mutmut run --max-children $(MUTANT_JOBS) $(MUTANTS)
	$(BIN)/python scripts/mutants_summary.py $(MUTANTS)

# A lent GPU machine is bare and offline (python 3.12, torch 2.11, timm, numpy, pytest, pandas, matplotlib): nothing
# here installs torch or reaches the network there. dptrain.bench.gpu_check first installs what the machine lacks from
# wheels/ (pip --no-index --no-deps --target, never touching torch), then measures; the venv's python when there is one.
GPU_PY := $(shell test -x $(BIN)/python && echo $(BIN)/python || echo python3)
GPU_OUT = $${OUT:-results}
gpu-check: ## every GPU check in one command, ≤ 420 s from its start (no make: python3 -m dptrain.bench.gpu_check) → $${OUT:-results}/gpu-check.* + bench-gpu.*
	mkdir -p $(GPU_OUT)
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PY) -m dptrain.bench.gpu_check --out $(GPU_OUT)/gpu-check 2>&1 | tee $(GPU_OUT)/gpu-check.log

bench-gpu: ## the GPU bench alone (224×224; vgg19's max batch; BEiT-large) → results/bench-gpu.{csv,md,png}
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PY) -m dptrain.bench.gpu_check --sections bench max_batch beit_large \
		--out $(GPU_OUT)/bench-gpu-check --bench-out $(GPU_OUT)/bench-gpu

# What dptrain needs and the GPU machine lacks: all pure-python wheels (~0.9 MB, committed in wheels/ so that the
# working tree carries them: no `carry` needed). Pinned to the versions the dev venv tests. wandb is left out (~20 MB
# of platform binaries; only logger=wandb imports it); antlr4 4.9.3 (hydra's pin) is an sdist on PyPI: built here.
GPU_WHEELS := hydra-core==1.3.8 omegaconf==2.3.1 opacus==1.6.0 kymatio==0.3.0 appdirs==1.4.4 configparser==7.3.0 \
	submitit==1.5.4 hydra-submitit-launcher==1.2.0 hydra-joblib-launcher==1.2.0
gpu-wheels: ## download into wheels/ the wheels a lent GPU machine lacks (python 3.12, manylinux x86_64)
	rm -rf wheels && mkdir -p wheels
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d wheels $(GPU_WHEELS)
	$(PY) -m pip wheel -q --no-deps -w wheels antlr4-python3-runtime==4.9.3
	ls -l wheels

clean: ## remove run outputs
	rm -rf outputs multirun

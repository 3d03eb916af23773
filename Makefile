# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/tiny
# make demo: the tiny MLLM, then stage 1 (image-only) and stage 2 (mix) in their own workdirs; the final run is WORKDIR.
# The demo skips the in-run validation losses (about 13 s a stage) to stay inside its 15 minutes: eval_recon and
# eval_shapes measure the final run instead, and eval_shapes also the image-only stage 1 (text prompts to a generator
# that has never seen a caption; about 30 s, taken from stage 2's share of the clock).
MLLM_DIR ?= runs/tiny_mllm
STAGE1 ?= runs/tiny_pretrain
MLLM_FLAG := --config.model.mllm.path=$(MLLM_DIR)
# The demo's clock: DEMO_MINUTES from when make starts (the install included). The MLLM's captioning phase and each
# IOMM stage train their configured steps unless their mark comes first: DEMO_MLLM_END / DEMO_STAGE1_END /
# DEMO_STAGE2_END percent of the budget, less the time the command spends outside that training (start-up,
# evaluation, the final save: DEMO_STAGE_OVERHEAD_S; for the MLLM also rendering and its ViT phase:
# DEMO_MLLM_OVERHEAD_S) (train.time_budget_s; never under DEMO_MIN_TRAIN_S). The marks leave the evaluation the
# 1.6 min it took on the slowest machine measured: on a slower one the phases stop early instead of overrunning, and
# a phase that overran its mark shortens the next. They are placed so that a machine on which every phase's full
# steps fit in the 15 minutes trains them all (on a 2-core Zen 3, 12.2 min with the install, the earlier marks at
# 40 / 62 / 85% stopped the MLLM at 1442 of its 1800 steps and stage 1 at 1076 of 1200, 2.8 minutes early).
# DEMO_MINUTES=0: no clock.
DEMO_MINUTES ?= 15
DEMO_MLLM_END ?= 50
DEMO_MLLM_OVERHEAD_S ?= 120
DEMO_STAGE1_END ?= 68
DEMO_STAGE2_END ?= 86
DEMO_STAGE_OVERHEAD_S ?= 30
DEMO_MIN_TRAIN_S ?= 60
DEMO_START := $(shell date +%s)
# $(call stage_budget,END_PERCENT[,OVERHEAD_S]): a phase's training seconds, in the shell of its recipe line.
stage_budget = $$(left=$$(( $(DEMO_START) + $(DEMO_MINUTES) * 60 * $(1) / 100 - $(or $(2),$(DEMO_STAGE_OVERHEAD_S)) - $$(date +%s) )); \
  if [ $(DEMO_MINUTES) = 0 ]; then echo 0; elif [ $$left -lt $(DEMO_MIN_TRAIN_S) ]; then echo $(DEMO_MIN_TRAIN_S); \
  else echo $$left; fi)
# pytest-xdist workers, one test file per worker at a time: XLA compiles on one thread, so 2 workers keep 2 cores
# busy (the suite's time: the README's "test suite" row).
TEST_WORKERS ?= 2
# The CPU torch wheel: pip finds it through the machine's find-links (/opt/wheels); never an unpinned torch.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

.PHONY: install install-test demo test test-fast lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# The demo needs the package alone (no torch, diffusers or tfds: those are for parity tests and other formats); the
# tests and the linters add the 'test' extra. Installing only what the demo uses saves about a minute of its budget.
$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: install
	@budget=$(call stage_budget,$(DEMO_MLLM_END),$(DEMO_MLLM_OVERHEAD_S)); set -x; \
	$(BIN)/python -m iomm_jax.pretrain_mllm --config=configs/tiny_mllm.py --out=$(MLLM_DIR) \
	  --config.train.time_budget_s=$$budget
	@budget=$(call stage_budget,$(DEMO_STAGE1_END)); set -x; \
	$(BIN)/python -m iomm_jax.main --config=configs/tiny.py --workdir=$(STAGE1) $(MLLM_FLAG) --config.train.sample_every=0 \
	  --config.train.eval_every=0 --config.train.time_budget_s=$$budget
	$(BIN)/python -m iomm_jax.eval_shapes --workdir=$(STAGE1)
	@budget=$(call stage_budget,$(DEMO_STAGE2_END)); set -x; \
	$(BIN)/python -m iomm_jax.main --config=configs/tiny.py:finetune --workdir=$(WORKDIR) $(MLLM_FLAG) \
	  --config.init.workdir=$(STAGE1) --config.train.eval_every=0 --config.train.time_budget_s=$$budget
	$(BIN)/python -m iomm_jax.eval_recon --workdir=$(WORKDIR)
	$(BIN)/python -m iomm_jax.eval_shapes --workdir=$(WORKDIR)
	$(BIN)/python -m iomm_jax.demo_summary --mllm=$(MLLM_DIR) --workdir=$(WORKDIR)

test: install-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=40 tests

# The edit-test loop: every test not marked slow (the heavy training and multi-device runs are marked); a few
# minutes on an idle 2-core machine (the README's "test suite" row).
test-fast: install-test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

LINT_PATHS := iomm_jax tests bench configs
lint: install-test
	$(BIN)/pyink --check --quiet $(LINT_PATHS)
	$(BIN)/ruff check --quiet $(LINT_PATHS)

format: install-test
	$(BIN)/pyink --quiet $(LINT_PATHS)

bench: install
	$(BIN)/python bench/step.py --config=configs/tiny.py

clean:
	rm -rf $(VENV) runs

# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
WORKDIR ?= runs/tiny
# make demo: the tiny MLLM, then stage 1 (image-only) and stage 2 (mix) in their own workdirs; the final run is WORKDIR.
MLLM_DIR ?= runs/tiny_mllm
STAGE1 ?= runs/tiny_pretrain
MLLM_FLAG := --config.model.mllm.path=$(MLLM_DIR)
# pytest-xdist workers, one test file per worker at a time: XLA compiles on one thread, so 2 workers on 2 cores
# cut the suite from 22 to 14 minutes.
TEST_WORKERS ?= 2
# The CPU torch wheel: pip finds it through the machine's find-links (/opt/wheels); never an unpinned torch.
PIP_INSTALL := $(BIN)/pip install -q -c constraints.txt

.PHONY: install demo test test-fast lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml constraints.txt
	$(BIN)/pip install -q --upgrade pip
	$(PIP_INSTALL) -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m iomm_jax.pretrain_mllm --config=configs/tiny_mllm.py --out=$(MLLM_DIR)
	$(BIN)/python -m iomm_jax.main --config=configs/tiny.py --workdir=$(STAGE1) $(MLLM_FLAG)
	$(BIN)/python -m iomm_jax.main --config=configs/tiny.py:finetune --workdir=$(WORKDIR) $(MLLM_FLAG) \
	  --config.init.workdir=$(STAGE1)
	$(BIN)/python -m iomm_jax.sample --workdir=$(WORKDIR) --prompt="a red circle" \
	  --prompt="a blue square above a green triangle" --num=8 --out=$(WORKDIR)/samples/final
	$(BIN)/python -m iomm_jax.eval_recon --workdir=$(WORKDIR)
	$(BIN)/python -m iomm_jax.eval_shapes --workdir=$(WORKDIR)
	$(BIN)/python -m iomm_jax.demo_summary --mllm=$(MLLM_DIR) --workdir=$(WORKDIR)

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=40 tests

# The edit-test loop: every test not marked slow (under 3 minutes on 2 cores).
test-fast: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m "not slow" tests

LINT_PATHS := iomm_jax tests bench configs
lint: install
	$(BIN)/pyink --check --quiet $(LINT_PATHS)
	$(BIN)/ruff check --quiet $(LINT_PATHS)

format: install
	$(BIN)/pyink --quiet $(LINT_PATHS)

bench: install
	$(BIN)/python bench/step.py --config=configs/tiny.py

clean:
	rm -rf $(VENV) runs

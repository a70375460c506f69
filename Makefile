# The README's two commands: `make demo` and `make test`. Both set themselves up on a fresh machine.
#
# Environment: use the active virtualenv if there is one, otherwise make `.venv`. Torch is only
# installed when none is importable, and then as the pinned CPU wheel (an unpinned `torch` pulls
# several GB of CUDA packages).

TORCH_PIN ?= torch==2.13.0
ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
VENV_DEP :=
else
PY := .venv/bin/python
VENV_DEP := .venv/bin/python
endif
STAMP := $(dir $(PY)).lipformer-installed

.PHONY: setup test test-all demo bench clean

.venv/bin/python:
	python3 -m venv .venv

$(STAMP): pyproject.toml $(VENV_DEP)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q

# Long tests (marked `slow`) are excluded from `make test`.
test-all: setup
	$(PY) -m pytest -q -m "slow or not slow"

demo: setup
	$(PY) -m lipformer.cli demo

# The recorded benchmarks: each appends its table, with machine and date, to docs/benchmarks.md.
bench: setup
	$(PY) scripts/bench_orthogonalize.py
	$(PY) scripts/bench_train_step.py
	$(PY) scripts/bench_certify.py
	$(PY) scripts/bench_poet.py --append docs/benchmarks.md
	$(PY) scripts/bench_allocator.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache

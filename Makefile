# `make demo` and `make test` each create .venv when it is missing and install what they need first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch: installed before the project so that pip never pulls a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
DEMO    ?= demo-bundle

.PHONY: demo test bench clean setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" || $(BIN)/python -m pip install --quiet --index-url $(TORCH_INDEX) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev,zoo,remote]"  # after torch: transformers then keeps the CPU build
	touch $(STAMP)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/pol train --model transformer --out $(DEMO)
	$(BIN)/pol verify $(DEMO) --job-id $$($(BIN)/pol job --model transformer --id)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/proof_overhead.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache

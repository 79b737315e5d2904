# `make demo` and `make test` set everything up on a fresh machine (Python 3.12 venv in .venv) and run.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast test-gpu gpu-bundle gpu-check setup clean

$(STAMP): pyproject.toml scripts/find-python312.sh
	@set -e; \
	if [ ! -x $(PY) ]; then \
	  PY312=$$(scripts/find-python312.sh); \
	  echo "creating $(VENV) with $$PY312"; \
	  "$$PY312" -m venv $(VENV); \
	fi; \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet --progress-bar on -e '.[test,launch]'; \
	$(PY) -m pip install --quiet --no-deps sglang==0.5.23; \
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: a tiny Megatron model learns arithmetic with NFT on CPU.
demo: $(STAMP)
	$(VENV)/bin/megatron-nft demo $(ARGS)

# All CPU tests (unit, distributed over gloo, end-to-end). GPU tests are marked and excluded.
test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

# Everything except the slow end-to-end tests.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

# On a machine with CUDA.
test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu -o addopts="" $(ARGS)

# The wheels a stock CUDA image lacks (megatron-core and small pure-Python packages), for gpu-check on a
# machine without network; downloads only what gpu-bundle/ does not hold yet (docs/gpu.md). Needs only
# pip (the venv's when there is one), so it never triggers the venv's set-up.
gpu-bundle:
	$(or $(wildcard $(PY)),python3) scripts/gpu_bundle.py build

# The one-command GPU proof: `make gpu-check OUT=dir` on a CUDA machine (results in dir/results.md).
gpu-check:
	scripts/gpu-check $(or $(OUT),gpu-check-results) $(ARGS)

clean:
	rm -rf $(VENV) runs/demo build *.egg-info

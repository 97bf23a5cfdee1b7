# Set-up and entry points. `make test` and `make demo` work on a fresh machine: they
# create .venv, install torch==2.13.0 (the CPU build) where torch is missing, then the
# package in editable mode with what that target needs: the demo only the runner's
# packages, the tests every extra (DeepSpeed, Lightning, TRL, Triton, pytest).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.cl_core_base
DEMO_STAMP := $(VENV)/.cl_core_runner
STAMP := $(VENV)/.cl_core_installed

.PHONY: setup test test-fast demo bench gpu-check compat lock clean

# constraints.txt pins every package to the versions the suite was proven on, so a
# new release on the index cannot turn CI red; the package itself declares ranges.
$(BASE_STAMP): pyproject.toml setup.py constraints.txt
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q -c constraints.txt torch==2.13.0
	touch $(BASE_STAMP)

# An editable install runs no build hook: compile the C kernels into the cache now.
$(DEMO_STAMP): $(BASE_STAMP)
	$(VPY) -m pip install -q -c constraints.txt -e ".[runner]"
	$(VPY) -m cl_core.kernels.build
	touch $(DEMO_STAMP)

$(STAMP): $(BASE_STAMP)
	$(VPY) -m pip install -q -c constraints.txt -e ".[dev,deepspeed,lightning,trl]"
	$(VPY) -m cl_core.kernels.build
	touch $(DEMO_STAMP) $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "not slow and not distributed and not gpu" tests

demo: $(DEMO_STAMP)
	$(VENV)/bin/cl-core demo --out demo_out

bench: $(STAMP)
	$(VPY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results.json

# The one command for a machine with a CUDA GPU (README: "make gpu-check"): the CUDA cases
# of the test suite on compiled kernels (every backend against the reference, launch
# counts, no host sync under torch.cuda.set_sync_debug_mode("error")), then the benchmarks
# on CUDA with their ratios and bandwidth. Needs a CUDA build of torch in .venv.
gpu-check: $(STAMP)
	@if ! $(VPY) -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
		echo "gpu-check: torch $$($(VPY) -c 'import torch; print(torch.__version__)') sees no CUDA GPU here;" \
			"nothing to check (install a CUDA build of torch into .venv on a GPU machine). The CPU suite is 'make test'."; \
		exit 0; fi; \
	TRITON_INTERPRET=0 $(VPY) -m pytest -q tests -k "cuda or triton_compile" -p no:cacheprovider && \
	$(VPY) -m pytest bench -q --benchmark-only --device cuda -p no:cacheprovider --benchmark-json=bench/results_cuda.json

# The kernels on Triton 3.6 (the one torch 2.11 ships with) beside the locked one: Triton
# and numpy go into a --target dir under .venv-compat (never into .venv) that shadows
# .venv's copies; the interpreter tests and the compile tests run against it. numpy stays
# < 2.4: Triton 3.6's interpreter fails on numpy >= 2.4 (fixed in Triton 3.7.1). The floors
# of transformers/peft are not covered here yet (bench/README.md, "Supported versions").
COMPAT_TRITON ?= 3.6.0
COMPAT_DIR := .venv-compat/triton-$(COMPAT_TRITON)
compat: $(STAMP)
	test -d $(COMPAT_DIR)/triton || $(VPY) -m pip install -q --no-deps --target $(COMPAT_DIR) triton==$(COMPAT_TRITON) "numpy==2.3.5"
	PYTHONPATH=$(CURDIR)/$(COMPAT_DIR):$(CURDIR) TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider \
		tests/kernels tests/engine/test_triton_param.py tests/fused/test_triton_fused_param.py tests/fused/test_fused.py

# Rewrite constraints.txt from what .venv holds now (after a deliberate upgrade there
# and a green `make test`).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(VPY) -m pip freeze --exclude-editable | grep -v '^cl[-_]core' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

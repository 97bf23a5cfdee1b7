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

.PHONY: setup test test-fast demo bench gpu-check compat compat-newest lock clean

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
	TRITON_INTERPRET=1 $(VPY) -m pytest -q --durations=25 tests

test-fast: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q -m "not slow and not distributed and not gpu" tests

demo: $(DEMO_STAMP)
	$(VENV)/bin/cl-core demo --out demo_out

bench: $(STAMP)
	$(VPY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results.json

# The one command for a machine with a CUDA GPU (README: "make gpu-check"): bench/gpu_check.py
# with the interpreter named by GPU_PY (default .venv's python if there is one, else python3;
# `make gpu-check PY=python3` uses that one). No set-up stamp and nothing installed: the GPU
# machine's own torch/triton are what is checked; the checkout is put on PYTHONPATH. Without
# CUDA it prints one line and exits 0. Full log: gpu_check.log.
GPU_PY := $(if $(filter command line,$(origin PY)),$(PY),$(if $(wildcard $(VPY)),$(VPY),python3))
gpu-check:
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=0 $(GPU_PY) bench/gpu_check.py --log $(CURDIR)/gpu_check.log

# The kernels on Triton 3.6 (the one torch 2.11 ships with) beside the locked one: Triton
# and numpy go into a --target dir under .venv-compat (never into .venv) that shadows
# .venv's copies; the interpreter tests and the compile tests run against it. numpy stays
# < 2.4: Triton 3.6's interpreter fails on numpy >= 2.4 (fixed in Triton 3.7.1). Then the
# Trainer resume and PEFT export tests on the lowest transformers/peft/accelerate run here.
COMPAT_TRITON ?= 3.6.0
COMPAT_DIR := .venv-compat/triton-$(COMPAT_TRITON)
# The lowest transformers/peft pair run here (bench/README.md, "Supported versions"); with
# torch >= 2.6, transformers 4.45's Trainer resume needs TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1.
COMPAT_TRANSFORMERS ?= 4.45.2
COMPAT_PEFT ?= 0.13.2
# .venv's accelerate/datasets need huggingface_hub >= 1, which transformers 4.45 cannot use:
# the floor dir brings its own hub < 1.0 and releases of the same age.
COMPAT_ACCELERATE ?= 1.0.1
COMPAT_HF_DIR := .venv-compat/hf-$(COMPAT_TRANSFORMERS)-$(COMPAT_PEFT)-$(COMPAT_ACCELERATE)
COMPAT_HF_TESTS := tests/integrations/test_peft_export.py tests/integrations/test_callback.py -k "resume or test_peft_export"
compat: $(STAMP)
	test -d $(COMPAT_DIR)/triton || $(VPY) -m pip install -q --no-deps --target $(COMPAT_DIR) triton==$(COMPAT_TRITON) "numpy==2.3.5"
	PYTHONPATH=$(CURDIR)/$(COMPAT_DIR):$(CURDIR) TRITON_INTERPRET=1 $(VPY) -m pytest -q -p no:cacheprovider \
		tests/kernels tests/engine/test_triton_param.py tests/fused/test_triton_fused_param.py tests/fused/test_fused.py
	test -d $(COMPAT_HF_DIR)/transformers || $(VPY) -m pip install -q --no-deps --target $(COMPAT_HF_DIR) \
		transformers==$(COMPAT_TRANSFORMERS) peft==$(COMPAT_PEFT) accelerate==$(COMPAT_ACCELERATE) "tokenizers<0.21" \
		"huggingface_hub<1.0" "datasets==3.0.1" requests urllib3 certifi charset_normalizer idna
	PYTHONPATH=$(CURDIR)/$(COMPAT_HF_DIR):$(CURDIR) TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 $(VPY) -m pytest -q -p no:cacheprovider \
		$(COMPAT_HF_TESTS)

# The same Trainer/PEFT tests against the newest transformers/peft/accelerate the index serves,
# in their own --target dir (refreshed on every run). Drift shows here as a report; `make test`
# stays on the pinned versions. Exit status is the tests'.
COMPAT_NEWEST_DIR := .venv-compat/hf-newest
compat-newest: $(STAMP)
	rm -rf $(COMPAT_NEWEST_DIR)
	$(VPY) -m pip install -q --no-deps --target $(COMPAT_NEWEST_DIR) --upgrade transformers peft accelerate
	@PYTHONPATH=$(CURDIR)/$(COMPAT_NEWEST_DIR):$(CURDIR) $(VPY) -c "import transformers, peft, accelerate; \
		print('compat-newest: transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
	PYTHONPATH=$(CURDIR)/$(COMPAT_NEWEST_DIR):$(CURDIR) $(VPY) -m pytest -q -p no:cacheprovider -rs $(COMPAT_HF_TESTS)

# Rewrite constraints.txt from what .venv holds now (after a deliberate upgrade there
# and a green `make test`).
lock: $(STAMP)
	{ sed -n '1,3p' constraints.txt; $(VPY) -m pip freeze --exclude-editable | grep -v '^cl[-_]core' | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

# Set-up and entry points. `make test` and `make demo` work on a fresh machine:
# they create .venv, install torch==2.13.0 (the CPU build on disk) where torch is
# missing, then the package in editable mode.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.cl_core_installed

.PHONY: setup test demo bench clean

$(STAMP): setup.py
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q -e ".[dev,deepspeed,lightning,trl]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

demo: $(STAMP)
	$(VENV)/bin/cl-core demo --out demo_out

bench: $(STAMP)
	$(VPY) -m pytest bench -q --benchmark-only --benchmark-json=bench/results.json

clean:
	rm -rf $(VENV) build *.egg-info

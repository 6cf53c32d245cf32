# Symmetric TCP splice: the two commands a user needs are
#   make testbed up      build the namespaces, start the services, print what is where
#   make test            run the test suite (as root: it builds its own namespaces)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# `make testbed up|down|status|...`: the words after `testbed` go to the CLI.
ifeq (testbed,$(firstword $(MAKECMDGOALS)))
  TESTBED_ARGS := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  $(eval $(TESTBED_ARGS):;@:)
endif

.PHONY: testbed test lint sysdeps venv experiments clean fastpath

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(STAMP)

# Debian packages the testbed and the tests drive (installed only if missing).
sysdeps:
	@bash scripts/install-sysdeps.sh

# The tc eBPF fast path for spliced flows, compiled once here: the daemon
# loads build/fastpath/splice.bpf.o and never runs a compiler.
# The socket probe (sockprobe.bpf.o) reads what TCP_REPAIR cannot from a
# kernel socket the daemon takes over; -g keeps the BTF its CO-RE needs.
BPF_OBJS := build/fastpath/splice.bpf.o build/fastpath/sockprobe.bpf.o
BPF_ARCH_INC := /usr/include/$(or $(shell gcc -print-multiarch 2>/dev/null),$(shell uname -m)-linux-gnu)

build/fastpath/%.bpf.o: daemon/fastpath/%.bpf.c $(wildcard daemon/fastpath/*.h) | sysdeps
	@mkdir -p $(dir $@)
	clang -O2 -g -Wall -target bpf -I$(BPF_ARCH_INC) -c $< -o $@

fastpath: $(BPF_OBJS)

testbed: $(STAMP) sysdeps fastpath
	$(PY) -m testbed $(or $(TESTBED_ARGS),status)

test: $(STAMP) sysdeps fastpath
	$(PY) -m pytest

# The experiment suite (thesis ch. 6 and more): results/<timestamp>/.
experiments: $(STAMP) sysdeps fastpath
	$(PY) -m testbed.experiments $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

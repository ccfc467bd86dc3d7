# tarab — two commands on a fresh machine: `make demo` and `make test`.
# Each target installs what is missing (Debian packages, .venv, the project) and then runs.
# Repeated runs reuse what is there.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tarab-installed
DEB_PKGS := portaudio19-dev jackd2
PYTEST_ARGS ?=

.PHONY: demo test bench system-deps venv clean

demo: venv
	$(VENV)/bin/tarab demo

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench

# Debian packages: PortAudio headers (PyAudio builds against them) and jackd2 (the clocked test device).
system-deps:
	@missing=""; \
	pkg-config --exists portaudio-2.0 2>/dev/null || missing="$$missing portaudio19-dev"; \
	command -v jackd >/dev/null 2>&1 || missing="$$missing jackd2"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages:$$missing"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
	  else \
	    echo "tarab needs Debian packages that are missing. Run:"; \
	    echo "  sudo apt-get install -y$$missing"; \
	    echo "then run make again."; exit 1; \
	  fi; \
	fi

venv: system-deps $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	@touch $(STAMP)

clean:
	rm -rf $(VENV) demo-out .cache

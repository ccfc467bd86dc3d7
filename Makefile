# tarab — two commands on a fresh machine: `make demo` and `make test`.
# Each target installs what is missing (Debian packages, .venv, the project) and then runs.
# Repeated runs reuse what is there.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tarab-installed
PYTEST_ARGS ?=

.PHONY: demo test bench system-deps test-deps venv clean

demo: venv
	$(VENV)/bin/tarab demo

test: test-deps venv
	$(PY) -m pytest -q -rs --durations=10 $(PYTEST_ARGS)

bench: venv
	$(PY) -m bench

# Debian packages: PortAudio headers (PyAudio builds against them) and jackd2 (the clocked test device);
# for the tests also FluidSynth and the FluidR3_GM soundfont (tarab rerender's recipe is checked against a clip).
define install_missing
	@if [ -n "$(strip $(1))" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(strip $(1))"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get update -qq && apt-get install -y -qq --no-install-recommends $(1) >/dev/null || exit 1; \
	  else \
	    echo "tarab needs Debian packages that are missing. Run:"; \
	    echo "  sudo apt-get install -y $(strip $(1))"; \
	    echo "then run make again."; exit 1; \
	  fi; \
	fi
endef

system-deps:
	$(call install_missing,$(shell pkg-config --exists portaudio-2.0 2>/dev/null || echo portaudio19-dev) \
	  $(shell command -v jackd >/dev/null 2>&1 || echo jackd2))

test-deps: system-deps
	$(call install_missing,$(shell command -v fluidsynth >/dev/null 2>&1 || echo fluidsynth) \
	  $(shell test -f /usr/share/sounds/sf2/FluidR3_GM.sf2 || echo fluid-soundfont-gm))

venv: system-deps $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]' 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
	@touch $(STAMP)

clean:
	rm -rf $(VENV) demo-out .cache

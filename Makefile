# Every target installs what it needs into .venv first; re-running is cheap when
# pyproject.toml has not changed (the stamp file records the last install).
# Another interpreter gets its own venv: make test PYTHON=python3.14 VENV=.venv-3.14
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-lowest lint bench chaos demo demo-45 local-directory clean

# An interpreter older than the project's 3.11 (a python3 of 3.10 or 3.9, as some systems
# ship) is refused before it makes a venv: pip would refuse the project only after, and the
# venv it left would keep being used, whatever PYTHON a next run named. A venv that failed
# half-way is removed, so the next run creates it again.
TOO_OLD = import sys; sys.exit(sys.version_info < (3, 11) and
$(BIN)/python:
	@$(PYTHON) -c '$(TOO_OLD) "$(PYTHON) is Python %d.%d: 3.11 or newer is needed; name one with PYTHON=python3.11, for example" % sys.version_info[:2])'
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip || { rm -rf $(VENV); exit 1; }

# PIP_CONSTRAINT (test-lowest's pins) is part of what was installed: a changed pin reinstalls.
# A venv made before by a too-old interpreter is named, with how to start again.
$(STAMP): pyproject.toml $(PIP_CONSTRAINT) | $(BIN)/python
	@$(BIN)/python -c '$(TOO_OLD) "$(VENV) holds Python %d.%d: 3.11 or newer is needed; remove it (rm -rf $(VENV)) and run again with PYTHON=python3.11, for example" % sys.version_info[:2])'
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m service serve

local-directory: $(STAMP)
	$(BIN)/python -m service local-directory --host 127.0.0.1 --port 9000

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/hadolint Dockerfile

# Four processes on any machine: most of a test's time is spent waiting on loopback and timers.
test: lint
	$(BIN)/python -m pytest -q -n 4

# The same lint and suite with each direct dependency at the lowest release pyproject.toml allows.
test-lowest:
	PIP_CONSTRAINT=$(CURDIR)/.ci/lowest.txt $(MAKE) test VENV=.venv-lowest

bench: $(STAMP)
	$(BIN)/python -m pytest -q -s tests/bench

chaos: $(STAMP)
	CHAOS=long $(BIN)/python -m pytest -q tests/integration/test_crash_recovery.py \
		tests/integration/test_directory_faults.py tests/integration/test_load.py \
		tests/integration/test_api_fuzz.py

demo: $(STAMP)
	$(BIN)/python -m service demo

demo-45: $(STAMP)
	$(BIN)/python -m service demo --file samples/hospitals-45.csv

clean:
	rm -rf $(VENV) .venv-lowest .pytest_cache .mypy_cache .ruff_cache

# The project's commands: `make demo` (the README's first), `make test` and `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A stamp records that the editable install matches pyproject.toml, so a second
# `make test` skips pip entirely.
STAMP := $(VENV)/.installed

.PHONY: test demo bench install clean

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The newcomer's first command: the sandbox and the daemon as real processes, six
# scenes (webhook opt-out, Phorest opt-out, resync, erasure request, retention purge
# with its guard, export), the audit trail; about 30 s. It prints the web console's
# address and a demo manager login; DEMO_ARGS=--keep-running leaves everything
# running after the scenes, the console browsable, until Ctrl-C.
demo: $(STAMP)
	$(BIN)/python -m syncd.sandbox.demo $(DEMO_ARGS)

# Speed and memory are measured here, never by timed assertions in tests.
bench: $(STAMP)
	$(BIN)/python benchmarks/sandbox_scale.py
	$(BIN)/python benchmarks/resync.py
	$(BIN)/python benchmarks/propagation.py
	$(BIN)/python benchmarks/idle.py
	$(BIN)/python benchmarks/erasure.py
	$(BIN)/python benchmarks/retention.py

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

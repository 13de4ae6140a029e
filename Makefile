# The project's commands: `make demo` (the README's first), `make test` and `make bench`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# A stamp records that the editable install matches pyproject.toml, so a second
# `make test` skips pip entirely.
STAMP := $(VENV)/.installed

.PHONY: test demo bench bench-large install clean

# Two pytest-xdist workers: most of the suite waits on daemons, sandboxes and sockets,
# not on the CPU. --dist loadfile keeps each test file on one worker, in order, so a
# module-scoped world (a sandbox, a running daemon) is built once and a module whose
# last test stops its shared daemon still runs that test last. Files are handed out in
# collection order (--no-loadscope-reorder), so the long end-to-end files start early
# instead of being sorted last by their small test counts. PYTEST_WORKERS=0 runs
# everything in this one process (e.g. to use pdb).
PYTEST_WORKERS ?= 2

test: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The newcomer's first command: the sandbox and the daemon as real processes, six
# scenes (webhook opt-out, Phorest opt-out, resync, erasure request, retention purge
# with its guard, export), the audit trail; about 30 s. It prints the web console's
# address and a demo manager login; DEMO_ARGS=--keep-running leaves everything
# running after the scenes, the console browsable, until Ctrl-C.
demo: $(STAMP)
	$(BIN)/python -m syncd.sandbox.demo $(DEMO_ARGS)

# Speed and memory are measured here, never by timed assertions in tests.
# benchmarks/resync.py runs a full resync at 10,000 and at 100,000 clients and
# members (20 % drift, 20 ms latency) and prints one table: the bound L and
# calls/L, the wall-time floor of the configured Phorest rate and the ratio to it,
# the no-change resync, syncd's own peak RSS (VmHWM of the spawned syncd process,
# never ru_maxrss, which a child inherits from its parent) and the
# one-subject-at-a-time baseline. Peak RSS figures elsewhere are VmHWM too.
bench: $(STAMP)
	$(BIN)/python benchmarks/sandbox_scale.py
	$(BIN)/python benchmarks/resync.py --clients 10000 100000
	$(BIN)/python benchmarks/propagation.py
	$(BIN)/python benchmarks/idle.py
	$(BIN)/python benchmarks/erasure.py
	$(BIN)/python benchmarks/retention.py
	$(BIN)/python benchmarks/console.py

# The same resync table at 1,000,000 clients and members (see the README's
# Benchmarks section). Measured once: about 50 minutes on a 2-core host; syncd's
# own peak RSS 161 MB; the benchmark process (which holds the sandbox) 1.75 GB,
# so allow 4 GB free; disk in $TMPDIR: the ledger 1.2 GB and syncd's scratch
# store (an estimate: ~3 KB per client, some 3 GB).
bench-large: $(STAMP)
	$(BIN)/python benchmarks/resync.py --clients 1000000

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

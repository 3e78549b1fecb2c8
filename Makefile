# Two commands on a fresh machine:
#   make demo   install, write a kernel spec, start a kernel through a module wrapper, run a cell
#   make test   start the test rig (Lmod, sshd in a netns, Slurm), then lint, type-check and test
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The oldest stack pyproject.toml admits: every direct dependency at its lower bound.
OLDEST     ?= .venv-oldest
OLDEST_BIN := $(OLDEST)/bin

.PHONY: venv venv-oldest demo bench bench-smoke soak datapath session-bench rig rig-down lint typecheck pytest test-oldest jc-suite test clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(BIN)/.installed

$(OLDEST_BIN)/.installed: pyproject.toml .ci/oldest-stack.txt
	rm -rf $(OLDEST)
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST_BIN)/python -m pip install -q --upgrade pip
	$(OLDEST_BIN)/python -m pip install -q -c .ci/oldest-stack.txt -e '.[test]'
	touch $@

venv-oldest: $(OLDEST_BIN)/.installed

demo: venv
	scripts/ensure-lmod
	$(BIN)/python scripts/demo.py

bench: venv
	scripts/ensure-lmod
	$(BIN)/python benchmarks/bench.py

# One quick pass of every benchmark figure: CI runs it so the benchmark cannot rot.
bench-smoke: venv
	scripts/ensure-lmod
	$(BIN)/python benchmarks/bench.py --smoke
	$(BIN)/python benchmarks/soak.py --kernels 2 --minutes 0.25 --drop-every 5
	$(BIN)/python benchmarks/datapath.py --repeats 1 --round-trips 5
	$(BIN)/python benchmarks/port_race.py --kernels 3 --runs 1
	$(BIN)/python benchmarks/session.py --round-trips 5 --megabytes 2 --repeats 1

# What the session layer costs, on a local kernel (direct, and through relay + local end).
session-bench: venv
	$(BIN)/python benchmarks/session.py

# One remote kernel reached four ways (our tunnel, OpenSSH -L, direct with and without CurveZMQ).
datapath: venv
	$(BIN)/python benchmarks/datapath.py

# 20 kernels on one connection for 10 minutes, with a connection drop every minute.
soak: venv
	$(BIN)/python benchmarks/soak.py

rig:
	scripts/test-rig up

rig-down:
	scripts/test-rig down

lint: venv
	$(BIN)/ruff check nersc_provisioner tests benchmarks scripts/demo.py scripts/jupyter_client_suite.py
	$(BIN)/ruff format --check nersc_provisioner tests benchmarks scripts/demo.py scripts/jupyter_client_suite.py

# typecheck also checks the relay's program as it is shipped (protocol.py + relay.py as one text).
typecheck: venv
	$(BIN)/mypy
	$(BIN)/mypy --strict benchmarks/bench.py benchmarks/soak.py benchmarks/datapath.py benchmarks/cpu_share.py benchmarks/port_race.py benchmarks/session.py
	$(BIN)/python -c 'import sys; from nersc_provisioner.session import relay_program; sys.stdout.write(relay_program("relay.json"))' > $(VENV)/npr_relay_program.py
	$(BIN)/mypy --strict $(VENV)/npr_relay_program.py
	$(BIN)/mypy --strict scripts/jupyter_client_suite.py tests/jupyter_client_suite/npr_jc_suite.py

pytest: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

# The oldest stack (.ci/oldest-stack.txt): every test that needs no rig, and the rig
# tests marked `oldest` (the kernel lifecycle of each provisioner, tests/test_stacks.py).
test-oldest: venv-oldest
	PATH="$(abspath $(OLDEST_BIN)):$$PATH" $(OLDEST_BIN)/python -m pytest -m "oldest or not rig"

# jupyter_client's own tests of its managers, restarter and clients, with every kernel
# started through nersc-local, nersc-cori and a Slurm spec (docs/compatibility.md).
jc-suite: venv
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python scripts/jupyter_client_suite.py

test: venv rig lint typecheck pytest jc-suite test-oldest bench-smoke

clean:
	rm -rf $(VENV) $(OLDEST) .pytest_cache .mypy_cache .ruff_cache

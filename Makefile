# Two entry points: `make run` (install, then the whole job) and `make test` (install, then tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `make run` does; e.g. make run ARGS="--preset cpu --dataset cifar10"
ARGS ?= --dataset digits
TORCH_REQ ?= requirements/cpu.txt

.PHONY: install run test test-fast lint peer-losses clean

$(BIN)/selfsup: pyproject.toml $(TORCH_REQ)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -r $(TORCH_REQ)
	$(BIN)/pip install -q -c $(TORCH_REQ) -e '.[dev]'
	touch $(BIN)/selfsup

install: $(BIN)/selfsup

run: install
	$(BIN)/selfsup run $(ARGS)

test: install
	./scripts/ensure-browser
	$(BIN)/python -m pytest -q --durations=25

# The unit tests alone (under 2 minutes on 2 cores): the tests marked slow (whole runs,
# several processes, the browser) are left out.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

# selfsup's losses against lightly's, in an environment of their own (.peer-venv: the pinned
# CPU torch and lightly without its dependencies; nothing of it reaches selfsup's own).
PEER := .peer-venv
$(PEER)/installed: $(TORCH_REQ)
	$(PYTHON) -m venv $(PEER)
	$(PEER)/bin/pip install -q -r $(TORCH_REQ) numpy
	$(PEER)/bin/pip install -q --no-deps lightly
	touch $(PEER)/installed

peer-losses: $(PEER)/installed
	PYTHONPATH=src $(PEER)/bin/python benchmarks/peer_losses.py

clean:
	rm -rf $(VENV) $(PEER) runs .pytest_cache

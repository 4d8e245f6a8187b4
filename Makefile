# Two entry points: `make run` (install, then the whole job) and `make test` (install, then tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# What `make run` does; e.g. make run ARGS="--preset cpu --dataset cifar10"
ARGS ?= --dataset digits
TORCH_REQ ?= requirements/cpu.txt

.PHONY: install run test test-fast lint clean

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
	$(BIN)/python -m pytest -q

# The unit tests alone (under 2 minutes on 2 cores): the tests marked slow (whole runs,
# several processes, the browser) are left out.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy src

clean:
	rm -rf $(VENV) runs .pytest_cache

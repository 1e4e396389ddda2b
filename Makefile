# das-lab: `make train` runs the default experiment, `make test` the whole test suite.
# Both create .venv and install das-lab (with its search and export extras) into it on first use.
PYTHON ?= python3
# test processes (pytest-xdist); each file runs on one of them, so the SLURM tests run in turn
TEST_WORKERS ?= 2
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.das-lab-installed

.PHONY: install train test lint format bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip uninstall --quiet -y hydra-optuna-sweeper  # replaced by das-lab's sweeper (Optuna >= 4)
	$(BIN)/python -m pip install --quiet -e '.[test,search,export]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/das-lab train

CODE := das_lab hydra_plugins tests benchmarks

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

format: $(STAMP)
	$(BIN)/ruff check --select I --fix $(CODE)
	$(BIN)/ruff format $(CODE)

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

bench: $(STAMP)
	for script in benchmarks/*.py; do $(BIN)/python $$script || exit 1; done

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache

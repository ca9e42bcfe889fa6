# The two commands of the quickstart: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# make demo PORT=8081 DURATION=180
PORT ?= 8080
demo: $(STAMP)
	$(BIN)/overflow-router demo --port $(PORT) $(if $(DURATION),--duration $(DURATION))

test: $(STAMP)
	$(BIN)/overflow-router validate config/forces.yaml >/dev/null
	$(BIN)/pytest -q -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check router adapters tests bench
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# ten minutes of route and handoff load with a fault every 3 s; RSS, FDs and lost handoffs
soak: $(STAMP)
	OVERFLOW_SOAK_S=$${OVERFLOW_SOAK_S:-600} $(BIN)/pytest -q -s -p no:cacheprovider tests/test_soak.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache build *.egg-info

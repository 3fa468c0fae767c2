# Two commands for a fresh machine: `make run` (dashboard) and `make test` (lint + test suite); `make test-fast`
# is the contributors' quick tier.
# Each creates the virtualenv from requirements.txt when it is missing or out of date.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
PORT ?= 8501

.PHONY: install run test test-fast lint bench

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -r requirements.txt
	$(PYTHON) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

run: $(STAMP)
	$(PYTHON) -m streamlit run streamlit_app.py --server.port $(PORT)

lint: $(STAMP)
	$(PYTHON) -m ruff check .

test: lint
	$(PYTHON) -m pytest

# The edit loop's tier (under 3 minutes on 2 cores): every core/ package, without the browser tests and the tests
# marked slow. `make test` runs everything; docs/TESTING.md says what each tier holds.
test-fast: lint
	$(PYTHON) -m pytest -m "not slow and not browser"

bench: $(STAMP)
	$(PYTHON) bench/demo_training.py

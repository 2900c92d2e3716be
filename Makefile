# Two commands for a newcomer: `make demo` and `make test`. Both create the environment first.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test env clean

env: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[test]'
	# simple-lama-inpainting pins pillow<10 and numpy<2 without needing them: install it without its pins
	$(BIN)/pip install --no-deps 'simple-lama-inpainting==0.1.2'
	touch $@

demo: env
	$(BIN)/aspire demo

test: env
	$(BIN)/python -m pytest -q

clean:
	rm -rf data/runs

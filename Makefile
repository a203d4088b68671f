# Newcomer entry points: `make demo` and `make test` create their own virtualenv.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: demo test lint bench clean-venv

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -U pip
	$(VENV)/bin/pip install -q -e '.[dev,export]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/appliance demo --headless

test: $(STAMP)
	$(VENV)/bin/pytest -q -m "not gpu"

lint: $(STAMP)
	$(VENV)/bin/ruff check appliance engines export benchmarks tests

clean-venv:
	rm -rf $(VENV)

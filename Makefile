# Cumulus: `make run` starts the control plane; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast lint stop install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --config-settings editable_mode=compat -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) manage.py run

stop: $(STAMP)
	$(PY) manage.py stop_clusters

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports

# The fast layer: pure logic, API and reconciler against a database; no Ray processes. Seconds.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not e2e" -q

test: $(STAMP) lint
	$(PY) manage.py makemigrations --check --dry-run
	$(PY) -m pytest -q --durations=15

clean:
	rm -rf $(VENV) .cumulus

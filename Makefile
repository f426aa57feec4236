# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml requirements.lock | cksum | cut -d' ' -f1)
export RAY_AUTH_MODE := disabled
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1
export FAISS_OPT_LEVEL := generic

.PHONY: install run test test-slow bench lock

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $(STAMP)

install: $(STAMP)

# Quick start: generate data, train the k-means baseline on a local Ray, evaluate, log to MLflow.
run: install
	$(VENV)/bin/raysseg data synth data/synth
	$(VENV)/bin/raysseg run --config kmeans_synth

# The default test run (slow tests deselected in pyproject.toml).
test: install
	$(PY) -m pytest -q

# CamVid quality runs, large-memory checks and the long end-to-end sequences.
test-slow: install
	$(PY) -m pytest -q -m slow

bench: install
	$(VENV)/bin/raysseg bench data
	$(VENV)/bin/raysseg bench eval
	$(VENV)/bin/raysseg bench step --method hp
	$(VENV)/bin/raysseg bench step --method pgg
	$(VENV)/bin/raysseg bench step --method segsort
	$(VENV)/bin/raysseg bench step --method concepts
	$(VENV)/bin/raysseg bench cluster

# Re-pin every installed package after changing dependencies in pyproject.toml.
lock:
	$(PY) -m pip freeze --exclude-editable > requirements.lock

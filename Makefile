# Set-up needs nothing but Python 3.10+ on PATH.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip

.PHONY: install test demo profile lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/lsms demo --out demo-report

profile: install
	$(VENV)/bin/lsms profile --preset base --image-size 480

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) demo-report

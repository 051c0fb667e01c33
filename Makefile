# Set-up needs nothing but Python 3.10+ on PATH.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# Optional extras: `make test EXTRAS=dev,browser` adds Playwright for the browser test (.ci/run does).
EXTRAS ?= dev

.PHONY: install test demo serve profile lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[$(EXTRAS)]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/lsms demo --out demo-report

# The viewer on the demo's model; `lsms serve RUN_OR_CHECKPOINT` for any other.
# `make serve PORT=8765`; any other lsms serve options in SERVE_ARGS: `make serve SERVE_ARGS="--open --device cpu"`.
PORT ?= 7860
SERVE_ARGS ?=
serve: install
	@if [ -d demo-report/run ]; then $(VENV)/bin/lsms serve demo-report/run --port $(PORT) $(SERVE_ARGS); \
	else echo "make serve shows the demo's model, and there is none yet (demo-report/run): run 'make demo' first" \
	"(about 16 min on 2 CPU cores), or serve any run or checkpoint: $(VENV)/bin/lsms serve RUN_OR_CHECKPOINT"; exit 2; fi

profile: install
	$(VENV)/bin/lsms profile --preset base --image-size 480

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) demo-report

# Two entry points: `make demo` (the main job) and `make test`. Each builds .venv first.
# torch is pinned through constraints.txt so pip never swaps in a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PIP := $(VENV)/bin/pip install -c constraints.txt
PY := $(VENV)/bin/python

.PHONY: demo test bench venv clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q "torch==2.13.0"
	$(PIP) -q -e ".[dev,demo]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m pelthub.demo

test: venv
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache

# Two entry points: `make demo` (the main job) and `make test`. Each builds $(VENV) first.
# torch is pinned through constraints.txt so pip never swaps in a multi-GB CUDA build.
# LOCK picks the versions: the committed lock (default, reproducible), constraints-oldest.txt
# (the oldest declared versions), or constraints.txt alone (the newest releases); see .ci/run.
PYTHON ?= python3
VENV ?= .venv
LOCK ?= requirements-lock.txt
PIP := $(VENV)/bin/pip install -c constraints.txt -c $(LOCK)
PY := $(VENV)/bin/python

.PHONY: demo test bench doctor venv lock clean

$(VENV)/.installed: pyproject.toml constraints.txt $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PIP) -q "torch==2.13.0"
	$(PIP) -q -e ".[dev,demo]"
	$(PY) -m pip freeze --exclude-editable > $(VENV)/installed.txt
	touch $@

venv: $(VENV)/.installed

demo: venv
	HF_HUB_OFFLINE=1 $(PY) -m pelthub.demo

test: venv
	$(PY) -m pelthub doctor --quick
	$(PY) -m pytest -q

bench: venv
	$(PY) -m benchmarks

doctor: venv
	$(PY) -m pelthub doctor

# Refresh the lock from the newest releases (then run `make test` and commit it if it passes).
lock:
	rm -rf .venv-lock
	$(MAKE) venv VENV=.venv-lock LOCK=constraints.txt
	.venv-lock/bin/pip freeze --exclude-editable | sed 's/+cpu$$//' > requirements-lock.txt

clean:
	rm -rf $(VENV) .venv-* .pytest_cache

# Everything creates what it needs: `make test` on a fresh clone builds .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU build of MLX on Linux; on macOS plain mlx (Metal) is installed by the base requirement.
EXTRAS ?= $(if $(filter Darwin,$(shell uname -s)),dev,cpu,dev)

.PHONY: venv test demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

test: venv
	$(PY) -m pytest tests -q

demo: venv
	$(PY) -m semantic.demo

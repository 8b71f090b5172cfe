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

# ---- benchmarks (asv, see docs/benchmarks.md) --------------------------------------------------
ASV := $(VENV)/bin/asv
BASE ?= main
FACTOR ?= 1.25
comma := ,
# Forking benchmark processes from one that imported the suite saves ~2 s of imports each, but only
# MLX's CPU build survives a fork (CUDA and Metal do not): asv's default, spawn, everywhere else.
ASV_LAUNCH ?= $(if $(and $(filter Linux,$(shell uname -s)),$(filter cpu,$(subst $(comma), ,$(EXTRAS)))),forkserver,spawn)

.PHONY: bench bench-compare bench-history dashboard

# This machine's name in the results (default: the host name, as asv's). Results go to .asv/results/
# (git-ignored); a reference machine's name (a folder of benchmarks/results/) continues its series there
# with its committed details, e.g. to `asv compare` your HEAD with its history on the same hardware.
MACHINE ?=
BENCH_MACHINE = $(or $(MACHINE),$(shell uname -n))

# asv builds its virtualenv from the first `pythonX.Y` on PATH of the version running asv (.venv's):
# .venv/bin's own, not a pyenv shim that may not serve that version.
bench bench-compare bench-history dashboard: export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

# Measures the last commit (not uncommitted changes) in asv's own virtualenv (MLX installed once, with
# the Python of .venv), then publishes the dashboard next to the reference machines' history.
bench: venv
	$(PY) tools/asv_dashboard.py sync
	$(PY) tools/asv_dashboard.py pin $(BENCH_MACHINE)
	$(ASV) run --launch-method $(ASV_LAUNCH) --machine $(BENCH_MACHINE) HEAD^!
	$(PY) tools/asv_dashboard.py publish

# The dashboard of every result there is: the reference machines' and this machine's. Offline: asv's
# JavaScript libraries are served from .asv/html/vendor (fetched once from the npm registry).
dashboard: venv
	$(PY) tools/asv_dashboard.py publish

# Backfill: every commit of HISTORY (asv's range; ALL = all of main) not measured yet on this machine,
# at most STEPS of them, then the dashboard. A reference machine's name writes into benchmarks/results/.
HISTORY ?= ALL
STEPS ?=
bench-history: venv
	$(PY) tools/bench_history.py $(if $(MACHINE),--machine $(MACHINE)) $(if $(STEPS),--steps $(STEPS)) \
		$(HISTORY) -- --launch-method $(ASV_LAUNCH)
	$(PY) tools/asv_dashboard.py publish

# asv judges every number as lower-is-better (asv issue #1617), so a GB/s or memcpy-ratio track that
# improves would fail the gate and one that worsens would pass: the gate leaves those to the dashboard
# (the time_ benchmarks of the same calls are judged). asv matches parameterized names as name(params).
# tests/test_asv_suite.py keeps this list complete.
LOWER_IS_BETTER := ^(?!.*\.track_(gbps|memcpy_ratio|save|load|plain_read|plain_write)(\(|$$))

# Fails (exit 1) when a benchmark got slower than FACTOR x BASE, significantly.
bench-compare: venv
	$(ASV) machine --yes
	$(ASV) continuous --launch-method $(ASV_LAUNCH) --factor $(FACTOR) -b '$(LOWER_IS_BETTER)' $(BASE) HEAD

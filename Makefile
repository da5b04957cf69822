# Thin over `python -m builder`; ARCH=arm64 and CROSS=1 pass through to the builder.
PYTHON ?= python3
export ARCH CROSS

.PHONY: setup demo test lint build ci bench
setup:
	scripts/setup

demo: setup
	scripts/demo

test:
	$(PYTHON) -m pytest -q -ra

lint:
	$(PYTHON) -m ruff check builder rig tests noxfile.py
	if [ -f install.sh ]; then shellcheck -s sh install.sh; fi

# The committed lock, on a connected host or through the mirrors in $BUILDER_MIRRORS; the scan
# needs a database: $BUILDER_TRIVY_DB (directory) or $BUILDER_TRIVY_DB_REF (OCI mirror, by digest).
build:
	scripts/fetch
	scripts/build
	scripts/scan

ci: lint test build

bench:
	nox -s bench

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

build:
	scripts/fetch
	scripts/build

ci: lint test build

bench:
	nox -s bench

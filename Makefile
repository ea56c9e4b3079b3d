# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: setup quickstart test

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

quickstart: setup
	$(PYTHON) -m balcony quickstart

test: setup
	$(PYTHON) -m pytest -q

# Set-up lives here so that the README's two commands work on a fresh Debian machine:
#   make demo   -> installs what is missing, then runs the main job (`trident demo`, embedded Triton server, CPU)
#   make test   -> installs what is missing, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
DATA_DIR ?= /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup demo test bench bench-smoke

$(VENV)/.installed: pyproject.toml
	@if [ ! -f $(DATA_DIR)/train-images-idx3-ubyte.gz ] && [ -z "$$TRIDENT_DATA_DIR" ]; then \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[train,serve,client,dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/trident demo

test: setup
	$(VENV)/bin/pytest -q

bench: setup
	$(VENV)/bin/python -m trident.benchmarks.run

bench-smoke: setup
	$(VENV)/bin/pytest -q benchmarks --benchmark-enable --benchmark-min-rounds=1 --benchmark-max-time=0.01

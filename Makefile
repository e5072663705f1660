# One entry point for a fresh Debian machine (run as root, or with sudo available).
#   make demo   -- the main job: the shared-memory demo on an embedded database
#   make test   -- install everything and run the test-suite
# Both install what they need first (system packages, .venv, the package itself).

PYTHON   ?= python3
VENV     := .venv
PY       := $(VENV)/bin/python
APT_PKGS := fuse3 libfuse3-dev pkg-config g++ make postgresql
PYTEST_ARGS ?=

.PHONY: all deps build test test-quick demo bench clean

all: build

# System packages: install only what is missing (dpkg -s is cheap, apt-get is not).
.stamp-apt: Makefile
	@missing=""; for p in $(APT_PKGS); do \
	    dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing system packages:$$missing"; \
	    SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	    $$SUDO apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel

# Python dependencies and an editable install of the project.
.stamp-pip: .stamp-apt $(PY) pyproject.toml setup.py
	$(PY) -m pip install -q 'Cython>=3.0' 'numpy>=1.24'
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

deps: .stamp-pip

# (Re)compile the native extensions in place: cheap when nothing changed.
build: .stamp-pip
	$(PY) setup.py -q build_ext --inplace -j 2

test: build
	$(PY) -m pytest -ra $(PYTEST_ARGS)

demo: build
	$(PY) -m zbigarray.demo

bench: build
	$(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf build .stamp-* wcfs/_fuse.c wcfs_client/_wcfs.cpp
	find . -name '*.so' -path './wcfs*' -delete

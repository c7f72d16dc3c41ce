# cowfs: two commands for a newcomer on a fresh Debian 12 machine (as root):
#   make demo   set everything up, import a busybox image, mount it and run a container on it
#   make test   set everything up and run the test suite
# Both are quick when everything is already installed (stamps under .make/).

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
STAMPS := .make

# Debian packages: fuse3 for the mount, the rest are peers and oracles used by tests,
# benchmarks and the demo (never mocked); gcc and libc6-dev build the static escape probe of
# tests/test_isolation.py.
APT_PKGS := fuse3 libfuse3-3 python3 python3-venv skopeo umoci runc busybox-static e2fsprogs \
	docker-registry fuse-overlayfs fio zstd attr debootstrap iproute2 procps util-linux psmisc \
	openssl gcc libc6-dev

.PHONY: all setup apt venv demo test test-quick stress bench lint clean

all: setup

setup: apt venv
	@# Byte-compile up front: with PYTHONDONTWRITEBYTECODE set (as on some machines) every
	@# command would otherwise recompile cowfs on start, which costs ~90 ms per container start.
	@$(PY) -m compileall -q cowfs runtime benchmarks >/dev/null

apt:
	@mkdir -p $(STAMPS)
	@missing=""; for p in $(APT_PKGS); do \
		dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@bash scripts/install-helpers.sh

venv: $(STAMPS)/venv.stamp

$(STAMPS)/venv.stamp: setup.cfg pyproject.toml
	@mkdir -p $(STAMPS)
	@test -x $(PY) || python3 -m venv $(VENV)
	@$(PY) -m pip install -q --upgrade pip >/dev/null 2>&1 || true
	@# compat editable mode is a plain .pth path entry: no import hook on every start.
	@$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat \
		>$(STAMPS)/pip.log 2>&1 || { cat $(STAMPS)/pip.log; exit 1; }
	@touch $@

demo: setup
	@bash scripts/demo.sh

test: setup
	@$(BIN)/ruff check cowfs runtime benchmarks tests
	@$(BIN)/pytest -q -m "not slow" tests

stress: setup
	@$(BIN)/pytest -q -m slow tests

# BENCH_OUT: where the data and the samples' uppers go; on a host whose filesystem has no journal,
# a journaled one (scripts/bench-disk.sh; the bench warns otherwise).
BENCH_OUT ?= benchmarks/results
bench: setup
	@$(BIN)/cowfs bench --out $(BENCH_OUT) --report benchmarks/RESULTS.md

lint: venv
	@$(BIN)/ruff check cowfs runtime benchmarks tests

clean:
	rm -rf $(VENV) $(STAMPS) build *.egg-info

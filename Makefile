# warren — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release deps test test-unit test-lab test-kernel bench demo fmt clippy fuzz-build clean

all: build

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release

# Installs the Debian packages and PyPI tools the test tiers use (idempotent).
deps:
	./integration/install-deps

test: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) test --locked
	$(MAKE) test-lab
	$(MAKE) test-kernel

test-unit:
	$(CARGO) test --locked

test-lab: build
	./integration/run lab

test-kernel: build
	./integration/run kernel

bench: deps release
	./integration/bench

demo: deps build
	./integration/demo

fmt:
	$(CARGO) fmt

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean

# warren — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release deps test check-agent-only test-unit test-integration test-lab test-kernel bench demo fmt clippy fuzz clean

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
	$(MAKE) check-agent-only
	$(CARGO) test --locked
	$(MAKE) test-integration

# Both tiers run even when the first fails, so one CI run shows everything.
test-integration: build
	lab=0; kernel=0; ./integration/run lab || lab=$$?; ./integration/run kernel || kernel=$$?; \
	[ $$lab -eq 0 ] && [ $$kernel -eq 0 ]

# The router build (no server roles) must not rot: clippy checks it, tests
# included. Its own target directory, shared with the agent_only lab test.
check-agent-only:
	$(CARGO) clippy --locked --no-default-features --features agent --all-targets \
		--target-dir target/agent-only -- -D warnings

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

# Runs every cargo-fuzz target for FUZZ_SECONDS each under libFuzzer. cargo-fuzz
# wants nightly; RUSTC_BOOTSTRAP lets the stable toolchain build the targets
# (no sanitizer: the parsers are safe Rust, a panic is what we look for).
FUZZ_SECONDS ?= 30
fuzz:
	command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	cd fuzz && for t in $$(ls fuzz_targets | sed 's/\.rs$$//'); do \
		echo "== $$t"; \
		RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -s none $$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=1024 || exit 1; \
	done

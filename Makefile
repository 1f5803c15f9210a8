# warren — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release deb deps test check-agent-only test-unit test-integration test-lab test-kernel bench demo fmt clippy fuzz clean

all: build

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release

# The Debian package, target/debian/warren_VERSION_ARCH.deb (cargo-deb), with man
# pages generated from the CLI, then held to lintian with no error or warning.
# DEB_BIN=PATH packages that binary instead of a release build (the install
# test packages the binary under test: no release build in `make test`);
# DEB_OUT puts the .deb elsewhere, DEB_FLAGS go to cargo deb (--fast).
DEB_BIN ?=
DEB_OUT ?= target/debian
# cargo-deb takes the binary from CARGO_TARGET_DIR/release/.
DEB_TARGET := $(if $(DEB_BIN),target/deb-bin,target)
deb: deps
	$(if $(DEB_BIN),mkdir -p $(DEB_TARGET)/release && cp $(DEB_BIN) $(DEB_TARGET)/release/warren,$(CARGO) build --locked --release)
	rm -rf target/man
	$(CARGO) run --locked --quiet --example man -- target/man
	rm -f $(DEB_OUT)/warren_*.deb
	CARGO_TARGET_DIR=$(DEB_TARGET) $(CARGO) deb --locked --no-build --output $(DEB_OUT) $(DEB_FLAGS)
	lintian --fail-on error,warning $(DEB_OUT)/warren_*.deb

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

# deb: bench-size reports the package's size.
bench: deps release deb
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

# warren — the two commands a newcomer needs: `make demo` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo

.PHONY: all build release deb deps test test-unit test-integration test-lab test-kernel bench demo fmt clippy fuzz clean

all: build

build:
	$(CARGO) build --locked

release:
	$(CARGO) build --locked --release

# The Debian package, target/debian/warren_VERSION_ARCH.deb (cargo-deb), with man
# pages generated from the CLI, then held to lintian with no error or warning.
# DEB_PROFILE=dev packages the debug build instead (the install test does: no
# release build in `make test`); DEB_OUT puts the .deb elsewhere.
DEB_PROFILE ?= release
DEB_OUT ?= target/debian
DEB_BIN := target/$(if $(filter dev,$(DEB_PROFILE)),debug,$(DEB_PROFILE))/warren
deb: deps
	$(CARGO) build --locked --profile $(DEB_PROFILE)
	rm -rf target/man
	$(DEB_BIN) man target/man
	rm -f $(DEB_OUT)/warren_*.deb
	$(CARGO) deb --locked --no-build --profile $(DEB_PROFILE) --output $(DEB_OUT) $(DEB_FLAGS)
	lintian --fail-on error,warning $(DEB_OUT)/warren_*.deb

# Installs the Debian packages and PyPI tools the test tiers use (idempotent).
deps:
	./integration/install-deps

test: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(CARGO) test --locked
	$(MAKE) test-integration

# Both tiers run even when the first fails, so one CI run shows everything.
test-integration: build
	lab=0; kernel=0; ./integration/run lab || lab=$$?; ./integration/run kernel || kernel=$$?; \
	[ $$lab -eq 0 ] && [ $$kernel -eq 0 ]

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

//! Link options that make the release binary smaller (README "Router build").
//! Only the `warren` executable's link is touched, so dependencies build as
//! they always do and debug builds and tests stay as they are.

use std::env;
use std::process::Command;

/// rustc links x86_64-unknown-linux-gnu with its own lld from this release on.
const FIRST_RUSTC_WITH_LLD: u32 = 90;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var("PROFILE").as_deref() != Ok("release") {
        return;
    }
    let target = env::var("TARGET").unwrap_or_default();
    // Debian's architectures; musl (OpenWrt) and other linkers are left alone.
    if target != "x86_64-unknown-linux-gnu" && target != "aarch64-unknown-linux-gnu" {
        return;
    }
    // Relative relocations as a bitmap (DT_RELR) instead of 24 bytes each:
    // 0.07 MB less agent-only, 0.12 MB full. PIE stays. Needs lld or binutils
    // 2.38 to link and glibc 2.36 (Debian 12) to run.
    println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    // Identical code folding (monomorphised copies that compile to the same
    // bytes): 0.02-0.03 MB. GNU ld does not have it, so only with rustc's lld.
    if target == "x86_64-unknown-linux-gnu" && rustc_minor().is_some_and(|m| m >= FIRST_RUSTC_WITH_LLD) {
        println!("cargo:rustc-link-arg-bins=-Wl,--icf=all");
    }
}

/// The minor version of the rustc cargo builds with ("rustc 1.95.0 (…)" gives 95).
fn rustc_minor() -> Option<u32> {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc).arg("--version").output().ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    text.split_whitespace().nth(1)?.split('.').nth(1)?.parse().ok()
}

//! Helpers shared by unit tests.

/// A deterministic xorshift64 stream: random-looking input for the parsers'
/// no-panic tests, the same on every run.
pub(crate) fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
    move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    }
}

/// Mutates each seed `rounds` times (one to three random bytes changed, a
/// quarter of them also truncated) and counts the inputs `decode` accepts.
pub(crate) fn mutated_accepted(
    seeds: &[Vec<u8>],
    rounds: usize,
    next: &mut impl FnMut() -> u64,
    decode: impl Fn(&[u8]) -> bool,
) -> usize {
    let mut accepted = 0;
    for seed in seeds {
        for _ in 0..rounds {
            let mut m = seed.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % m.len();
                m[i] = next() as u8;
            }
            if next().is_multiple_of(4) {
                m.truncate((next() as usize) % (m.len() + 1));
            }
            accepted += decode(&m) as usize;
        }
    }
    accepted
}

// The integration tests' TempDir, so unit and integration tests share one.
#[path = "../tests/common/mod.rs"]
mod common;
pub use common::TempDir;

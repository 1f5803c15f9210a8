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

#![no_main]
//! Relay frame decoder on arbitrary input: never panics, and whatever decodes
//! re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    warren::relay::frame::fuzz_decode(data);
});

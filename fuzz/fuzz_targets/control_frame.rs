#![no_main]
//! Control frame decoder and message decoder on arbitrary input: must never
//! panic and never return a frame larger than the protocol allows.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for frame in warren::control::frame::fuzz_decode(data).into_iter().flatten() {
        warren::control::messages::fuzz_decode(&frame.payload);
    }
});

#![no_main]
//! The STUN decoder must reject any byte string cleanly, never panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::stun::message::fuzz_decode(data);
});

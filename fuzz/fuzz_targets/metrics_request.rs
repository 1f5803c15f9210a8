#![no_main]
//! The metrics endpoint's request parser must take any bytes without a
//! panic, and give the same answer whether the head came at once or in pieces.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    warren::metrics::http::fuzz_parse(data);
});

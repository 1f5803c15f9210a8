#![no_main]
//! The coordinator's policy parser takes the administrator's file: it must
//! never panic, and what it accepts stays within the limits it promises.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    warren::coord::policy::fuzz_parse(data);
});

#![no_main]
//! Sealed peer messages on arbitrary input: never panic, never open (nothing here holds a key).

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::peer::seal::fuzz_open(data);
});

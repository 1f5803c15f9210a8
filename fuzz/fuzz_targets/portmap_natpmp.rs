#![no_main]
//! NAT-PMP (RFC 6886) requests and responses on arbitrary input: never
//! panic, and whatever decodes re-encodes to the input's canonical prefix.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::portmap::natpmp::fuzz_decode(data);
});

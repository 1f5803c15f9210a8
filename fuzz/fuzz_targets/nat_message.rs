#![no_main]
//! NAT traversal's peer messages (candidates, checks, upgrade, probes) on
//! arbitrary input: never panic, and whatever decodes re-encodes to the same bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::nat::message::fuzz_decode(data);
});

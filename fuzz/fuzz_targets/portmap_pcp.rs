#![no_main]
//! PCP (RFC 6887) MAP requests and responses, options and version refusals on
//! arbitrary input: never panic, and whatever decodes re-encodes to the
//! input's canonical prefix.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::portmap::pcp::fuzz_decode(data);
});

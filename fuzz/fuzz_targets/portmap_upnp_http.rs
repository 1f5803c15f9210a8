#![no_main]
//! HTTP answers from a UPnP gateway, whole and as a stream delivers them:
//! never panic, and a complete answer does not change with more bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::portmap::upnp::http::fuzz_parse(data);
});

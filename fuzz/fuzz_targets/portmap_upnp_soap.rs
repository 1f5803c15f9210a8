#![no_main]
//! SOAP answers (out arguments or a UPnPError fault) on arbitrary bytes, the
//! first byte choosing the HTTP status: never panic.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::portmap::upnp::soap::fuzz_parse(data);
});

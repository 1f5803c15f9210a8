#![no_main]
//! SSDP answers (UDA 1.1 section 1.3) on arbitrary bytes: never panic, and a
//! description URL taken is on the host the answer came from.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::portmap::upnp::ssdp::fuzz_parse(data);
});

#![no_main]
//! The UPnP XML reader on arbitrary text: never panic, and escaped text
//! reads back as itself.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = std::str::from_utf8(data).map(warren::portmap::upnp::xml::fuzz_read);
});

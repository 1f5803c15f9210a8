#![no_main]
//! UPnP device descriptions on arbitrary text: never panic, and a control
//! URL taken is on the description's own host.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = std::str::from_utf8(data).map(warren::portmap::upnp::description::fuzz_parse);
});

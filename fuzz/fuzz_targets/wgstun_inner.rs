#![no_main]
//! The inner IPv4/ICMP/UDP parser of WG-STUN sees whatever a client tunnels
//! in: it must reject any byte string cleanly, and answers it builds must be sound.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::wgstun::inner::fuzz_parse(data);
});

#![no_main]
//! The in-tree rtnetlink codec (netlink framing, then link, address, route
//! and rule messages and monitor events, nested attributes included) on
//! arbitrary input: it must return an error, never panic, whatever the bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::netlink::fuzz_decode(data);
});

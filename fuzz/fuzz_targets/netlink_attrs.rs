#![no_main]
//! The kernel WireGuard dump parser (netlink framing, then nested device,
//! peer and allowed-IP attributes) on arbitrary input: it must return an
//! error, never panic, whatever the bytes.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = warren::wg::genl::parse_dump(data);
    let mut parser = warren::wg::genl::DumpParser::new();
    let _ = parser.feed(data);
});

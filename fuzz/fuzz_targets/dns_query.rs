#![no_main]
//! The name server's responder takes any datagram a mesh member sends: it
//! must never panic, and whatever it answers is a response with the query's id.

use std::net::Ipv4Addr;

use libfuzzer_sys::fuzz_target;
use warren::dns::{NameTable, answer};

fuzz_target!(|data: &[u8]| {
    let names = NameTable::with_nodes(
        "warren",
        [("nas", Ipv4Addr::new(100, 64, 0, 9)), ("laptop", Ipv4Addr::new(100, 64, 0, 10))],
    );
    if let Some(reply) = answer(data, &names) {
        assert!(reply.len() >= 12 && reply.len() <= 512);
        assert_eq!(reply[..2], data[..2]);
        assert_eq!(reply[2] & 0x80, 0x80);
    }
});

use std::net::Ipv4Addr;

use simple_dns::rdata::{A, RData};
use simple_dns::{Packet, PacketFlag, RCODE};

use super::*;

const FLAG_RD: u8 = 0x01;
const QR: u8 = 0x80;

const NAS: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);

fn table() -> NameTable {
    NameTable::with_nodes(
        "warren",
        [("nas", NAS), ("laptop", Ipv4Addr::new(100, 64, 0, 10))],
    )
}

const T_A: u16 = 1;
const T_PTR: u16 = 12;
const T_MX: u16 = 15;
const T_AAAA: u16 = 28;
const T_ANY: u16 = 255;
const C_IN: u16 = 1;
const C_CH: u16 = 3;

/// A query as a stub resolver writes it: RD set, one question.
fn query(name: &str, qtype: u16, qclass: u16, edns: bool) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, edns as u8];
    for l in name.split('.').filter(|l| !l.is_empty()) {
        q.push(l.len() as u8);
        q.extend_from_slice(l.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&qclass.to_be_bytes());
    if edns {
        // Root name, TYPE OPT, payload 4096, no extended rcode, no options.
        q.extend_from_slice(&[0, 0, 41, 0x10, 0x00, 0, 0, 0, 0, 0, 0]);
    }
    q
}

fn ask(q: &[u8]) -> Packet<'static> {
    let bytes = answer(q, &table()).expect("an answer");
    assert!(bytes.len() <= 512, "answers fit a plain UDP datagram");
    let leaked: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    Packet::parse(leaked).expect("the answer parses")
}

fn rcode_of(q: &[u8]) -> RCODE {
    ask(q).rcode()
}

#[test]
fn a_record_for_a_node_in_any_case() {
    let r = ask(&query("NaS.Warren", T_A, C_IN, false));
    assert_eq!(r.id(), 0x1234);
    assert_eq!(r.rcode(), RCODE::NoError);
    assert!(
        r.has_flags(PacketFlag::RESPONSE | PacketFlag::AUTHORITATIVE_ANSWER | PacketFlag::RECURSION_DESIRED)
    );
    assert!(!r.has_flags(PacketFlag::RECURSION_AVAILABLE));
    assert_eq!(r.questions.len(), 1);
    assert_eq!(
        r.questions[0].qname.to_string(),
        "NaS.Warren",
        "the question is echoed as asked"
    );
    assert_eq!(r.answers.len(), 1);
    assert_eq!(r.answers[0].ttl, TTL_SECS);
    assert_eq!(r.answers[0].rdata, RData::A(A { address: NAS.into() }));
    assert!(r.opt().is_none(), "no OPT in the answer to a query without one");
}

#[test]
fn any_gives_the_a_record() {
    let r = ask(&query("laptop.warren", T_ANY, C_IN, false));
    assert_eq!(r.answers.len(), 1);
    assert_eq!(
        r.answers[0].rdata,
        RData::A(A {
            address: u32::from(Ipv4Addr::new(100, 64, 0, 10))
        })
    );
}

#[test]
fn ptr_for_a_mesh_address() {
    let r = ask(&query("9.0.64.100.in-addr.arpa", T_PTR, C_IN, false));
    assert_eq!(r.rcode(), RCODE::NoError);
    assert_eq!(r.answers.len(), 1);
    match &r.answers[0].rdata {
        RData::PTR(p) => assert_eq!(p.0.to_string(), "nas.warren"),
        other => panic!("expected a PTR, got {other:?}"),
    }
    // The A type of a reverse name holds nothing.
    let r = ask(&query("9.0.64.100.in-addr.arpa", T_A, C_IN, false));
    assert_eq!((r.rcode(), r.answers.len()), (RCODE::NoError, 0));
}

#[test]
fn unknown_names_in_our_zones_do_not_exist() {
    for name in ["printer.warren", "a.nas.warren", "8.0.64.100.in-addr.arpa"] {
        let r = ask(&query(name, T_A, C_IN, false));
        assert_eq!(r.rcode(), RCODE::NameError, "{name}");
        assert!(r.has_flags(PacketFlag::AUTHORITATIVE_ANSWER), "{name}");
        assert!(r.answers.is_empty(), "{name}");
    }
}

#[test]
fn other_types_of_a_known_name_are_empty() {
    for t in [T_AAAA, T_MX] {
        let r = ask(&query("nas.warren", t, C_IN, false));
        assert_eq!((r.rcode(), r.answers.len()), (RCODE::NoError, 0), "type {t}");
    }
    let r = ask(&query("warren", T_A, C_IN, false));
    assert_eq!(
        (r.rcode(), r.answers.len()),
        (RCODE::NoError, 0),
        "the domain itself"
    );
}

#[test]
fn not_an_open_resolver() {
    for name in [
        "example.com",
        "nas.warren.example.com",
        "1.1.168.192.in-addr.arpa",
        "1.0.128.100.in-addr.arpa",
        ".",
    ] {
        let r = ask(&query(name, T_A, C_IN, false));
        assert_eq!(r.rcode(), RCODE::Refused, "{name}");
        assert!(r.answers.is_empty(), "{name}");
        assert!(!r.has_flags(PacketFlag::AUTHORITATIVE_ANSWER), "{name}");
    }
    assert_eq!(rcode_of(&query("version.bind", 16, C_CH, false)), RCODE::Refused);
    assert_eq!(rcode_of(&query("nas.warren", T_A, C_CH, false)), RCODE::Refused);
}

#[test]
fn edns_is_answered_with_an_opt_record() {
    let r = ask(&query("nas.warren", T_A, C_IN, true));
    assert_eq!(r.answers.len(), 1);
    let opt = r.opt().expect("an OPT in the answer");
    assert_eq!((opt.version, opt.udp_packet_size), (0, EDNS_PAYLOAD));
    assert_eq!(
        ask(&query("example.com", T_A, C_IN, true)).rcode(),
        RCODE::Refused
    );
}

#[test]
fn one_question_only() {
    let mut q = query("nas.warren", T_A, C_IN, false);
    let question = q[HEADER_LEN..].to_vec();
    q.extend_from_slice(&question);
    q[5] = 2;
    assert_eq!(rcode_of(&q), RCODE::FormatError);
    let mut none = query("nas.warren", T_A, C_IN, false);
    none[5] = 0;
    assert_eq!(rcode_of(&none), RCODE::FormatError);
    // Records in the answer or authority section of a query.
    for at in [7, 9] {
        let mut q = query("nas.warren", T_A, C_IN, false);
        q[at] = 1;
        assert_eq!(rcode_of(&q), RCODE::FormatError, "count at {at}");
    }
    // A forged count: refused from the header, nothing allocated for it.
    let mut q = query("nas.warren", T_A, C_IN, false);
    q[10] = 0xff;
    q[11] = 0xff;
    assert_eq!(rcode_of(&q), RCODE::FormatError);
}

#[test]
fn responses_and_short_datagrams_get_nothing() {
    let mut q = query("nas.warren", T_A, C_IN, false);
    q[2] |= QR;
    assert_eq!(answer(&q, &table()), None);
    assert_eq!(answer(&[], &table()), None);
    assert_eq!(answer(&[0x12; 11], &table()), None);
}

#[test]
fn other_opcodes_are_not_implemented() {
    let mut q = query("nas.warren", T_A, C_IN, false);
    q[2] = (4 << 3) | FLAG_RD; // NOTIFY
    let r = answer(&q, &table()).expect("an answer");
    assert_eq!(r.len(), HEADER_LEN);
    assert_eq!(&r[..2], &[0x12, 0x34]);
    assert_eq!(r[2] & QR, QR);
    assert_eq!(r[3] & 0x0f, RCODE::NotImplemented as u8);
}

#[test]
fn every_truncation_is_refused_as_malformed_or_dropped() {
    for edns in [false, true] {
        let q = query("nas.warren", T_A, C_IN, edns);
        for len in 0..q.len() {
            match answer(&q[..len], &table()) {
                None => assert!(len < HEADER_LEN, "dropped at {len}"),
                Some(r) => {
                    assert!(len >= HEADER_LEN);
                    assert_eq!(r[3] & 0x0f, RCODE::FormatError as u8, "truncated at {len}");
                    assert_eq!(&r[..2], &q[..2]);
                }
            }
        }
    }
}

#[test]
fn compression_pointer_loops_end() {
    // The question's name points at itself, at what follows it, and at the header.
    for name in [
        &[0xc0, 0x0c][..],
        &[0xc0, 0x0e, 0xc0, 0x0c],
        &[0xc0, 0x00],
        &[0x01, b'a', 0xc0, 0x0c],
    ] {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        q.extend_from_slice(name);
        q.extend_from_slice(&[0, 1, 0, 1]);
        let r = answer(&q, &table()).expect("an answer");
        assert_eq!(r[3] & 0x0f, RCODE::FormatError as u8, "name {name:02x?}");
    }
}

#[test]
fn a_compressed_question_name_is_read() {
    // A query has one name of its own; the OPT record's owner name may
    // still be compressed: a pointer back to the question's root label.
    let mut q = query("nas.warren", T_A, C_IN, false);
    q[11] = 1;
    let root_at = (HEADER_LEN + "nas.warren".len() + 1) as u8;
    q.extend_from_slice(&[0xc0, root_at, 0, 41, 0x04, 0xd0, 0, 0, 0, 0, 0, 0]);
    let r = ask(&q);
    assert_eq!((r.rcode(), r.answers.len()), (RCODE::NoError, 1));
}

#[test]
fn garbage_never_panics_and_answers_only_as_responses() {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let base = query("nas.warren", T_A, C_IN, true);
    for i in 0..20_000 {
        let mut q = if i % 2 == 0 {
            // Random bytes after a plausible header.
            let len = (next() % 80) as usize + HEADER_LEN;
            let mut q: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            q[2] &= !QR;
            q[4..6].copy_from_slice(&[0, 1]);
            q[6..10].fill(0);
            q
        } else {
            base.clone()
        };
        if i % 2 == 1 {
            // A few bytes of a valid query flipped.
            for _ in 0..(next() % 4 + 1) {
                let at = (next() as usize) % q.len();
                q[at] ^= 1 << (next() % 8);
            }
        }
        if let Some(r) = answer(&q, &table()) {
            assert!(r.len() >= HEADER_LEN && r.len() <= 512);
            assert_eq!(&r[..2], &q[..2], "the answer carries the query's id");
            assert_eq!(r[2] & QR, QR);
        }
    }
}

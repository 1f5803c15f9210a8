//! One query datagram in, one answer out: authoritative for the mesh's
//! domain and reverse zone, REFUSED for everything else (no recursion, not
//! an open resolver). Answers are one record at most, far below 512 bytes,
//! so truncation never arises.

use std::net::Ipv4Addr;

use simple_dns::rdata::{A, OPT, PTR, RData};
use simple_dns::{CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, Question, RCODE, ResourceRecord, TYPE};

use super::names::{Lookup, NameTable};

/// Seconds a resolver may keep an answer: a rename or removal reaches the
/// mesh within about a second, so caches must not hold names much longer.
pub const TTL_SECS: u32 = 1;
/// The EDNS payload size we advertise (the DNS flag day 2020 value).
const EDNS_PAYLOAD: u16 = 1232;
const HEADER_LEN: usize = 12;
const FLAG_QR: u8 = 0x80;
const FLAG_RD: u8 = 0x01;

/// The answer to `query`, or `None` when it deserves none: shorter than a
/// header, or itself a response (answering those would let two servers
/// bounce datagrams between them forever).
pub fn answer(query: &[u8], names: &NameTable) -> Option<Vec<u8>> {
    if query.len() < HEADER_LEN || query[2] & FLAG_QR != 0 {
        return None;
    }
    let count = |at: usize| u16::from_be_bytes([query[at], query[at + 1]]);
    let opcode = (query[2] >> 3) & 0x0f;
    if opcode != 0 {
        return Some(header_only(query, RCODE::NotImplemented));
    }
    // One question, nothing in answer or authority, at most an OPT record:
    // checked on the header so that a forged count allocates nothing.
    if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
        return Some(header_only(query, RCODE::FormatError));
    }
    let Ok(packet) = Packet::parse(query) else {
        return Some(header_only(query, RCODE::FormatError));
    };
    let question = packet.questions.first()?;
    let labels: Vec<&[u8]> = question.qname.get_labels().iter().map(|l| l.as_ref()).collect();
    let lookup = match question.qclass {
        QCLASS::CLASS(CLASS::IN) | QCLASS::ANY => names.lookup(&labels),
        // CHAOS (version.bind) and the like are not ours either.
        _ => Lookup::Foreign,
    };
    let mut reply = Packet::new_reply(packet.id());
    if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
        reply.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    if packet.opt().is_some() {
        *reply.opt_mut() = Some(OPT {
            opt_codes: Vec::new(),
            udp_packet_size: EDNS_PAYLOAD,
            version: 0,
        });
    }
    reply.questions.push(Question::new(
        question.qname.clone(),
        question.qtype,
        question.qclass,
        false,
    ));
    let ptr_target;
    match lookup {
        Lookup::Foreign => *reply.rcode_mut() = RCODE::Refused,
        Lookup::Missing => {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
            *reply.rcode_mut() = RCODE::NameError;
        }
        Lookup::Empty => reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER),
        Lookup::Node { name, addr } => {
            reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
            let reverse = labels.last().is_some_and(|l| l.eq_ignore_ascii_case(b"arpa"));
            ptr_target = names.full_name(&name);
            if let Some(rdata) = record(question.qtype, reverse, addr, &ptr_target) {
                reply.answers.push(ResourceRecord::new(
                    question.qname.clone(),
                    CLASS::IN,
                    TTL_SECS,
                    rdata,
                ));
            }
        }
    }
    reply.build_bytes_vec().ok()
}

/// The record a node's name holds for `qtype`: its A, or for a reverse name
/// its PTR. Other types (AAAA while the overlay has no IPv6) have none.
fn record<'a>(qtype: QTYPE, reverse: bool, addr: Ipv4Addr, target: &'a str) -> Option<RData<'a>> {
    let wanted = |t: TYPE| matches!(qtype, QTYPE::ANY) || qtype == QTYPE::TYPE(t);
    if reverse {
        wanted(TYPE::PTR).then(|| RData::PTR(PTR(Name::new_unchecked(target))))
    } else {
        wanted(TYPE::A).then(|| RData::A(A { address: addr.into() }))
    }
}

/// A reply of just the header: for queries too malformed to echo.
fn header_only(query: &[u8], rcode: RCODE) -> Vec<u8> {
    let mut out = vec![0u8; HEADER_LEN];
    out[..2].copy_from_slice(&query[..2]);
    out[2] = FLAG_QR | (query[2] & (0x0f << 3)) | (query[2] & FLAG_RD);
    out[3] = rcode as u8 & 0x0f;
    out
}

#[cfg(test)]
#[path = "responder_tests.rs"]
mod tests;

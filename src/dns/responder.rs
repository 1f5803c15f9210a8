//! One query datagram in, one answer out: authoritative for the mesh's
//! domain and reverse zone, REFUSED for everything else (no recursion, not
//! an open resolver). Answers are one record at most, far below 512 bytes,
//! so truncation never arises.

use super::message::{
    self, CLASS_ANY, CLASS_IN, FLAG_QR, HEADER_LEN, Header, Rcode, Record, Reply, TYPE_A, TYPE_ANY, TYPE_PTR,
};
use super::names::{Lookup, NameTable};

/// Seconds a resolver may keep an answer: a rename or removal reaches the
/// mesh within about a second, so caches must not hold names much longer.
pub const TTL_SECS: u32 = 1;
/// The EDNS payload size we advertise (the DNS flag day 2020 value).
pub const EDNS_PAYLOAD: u16 = 1232;

/// The answer to `query`, or `None` when it deserves none: shorter than a
/// header, or itself a response (answering those would let two servers
/// bounce datagrams between them forever).
pub fn answer(query: &[u8], names: &NameTable) -> Option<Vec<u8>> {
    let header = Header::parse(query)?;
    if header.flags & FLAG_QR != 0 {
        return None;
    }
    if header.opcode() != 0 {
        return Some(message::header_only(&header, Rcode::NotImp));
    }
    // One question, nothing in answer or authority, at most an OPT record:
    // checked on the header so that a forged count costs nothing.
    if header.qdcount != 1 || header.ancount != 0 || header.nscount != 0 || header.arcount > 1 {
        return Some(message::header_only(&header, Rcode::FormErr));
    }
    let Some((question, edns)) = message::parse_query(query, &header) else {
        return Some(message::header_only(&header, Rcode::FormErr));
    };
    let lookup = match question.qclass {
        CLASS_IN | CLASS_ANY => names.lookup(&question.labels),
        // CHAOS (version.bind) and the like are not ours either.
        _ => Lookup::Foreign,
    };
    let (rcode, authoritative, answer) = match lookup {
        Lookup::Foreign => (Rcode::Refused, false, None),
        Lookup::Missing => (Rcode::NxDomain, true, None),
        Lookup::Empty => (Rcode::NoError, true, None),
        Lookup::Node { name, addr } => {
            let reverse = question
                .labels
                .last()
                .is_some_and(|l| l.eq_ignore_ascii_case(b"arpa"));
            let wanted = |t: u16| question.qtype == t || question.qtype == TYPE_ANY;
            // Other types (AAAA while the overlay has no IPv6) hold nothing.
            let record = if reverse {
                wanted(TYPE_PTR).then(|| Record::Ptr(names.full_name(&name)))
            } else {
                wanted(TYPE_A).then_some(Record::A(addr))
            };
            (Rcode::NoError, true, record.map(|r| (TTL_SECS, r)))
        }
    };
    let reply = Reply {
        query: &header,
        question: &question,
        rcode,
        authoritative,
        answer,
        edns_payload: edns.then_some(EDNS_PAYLOAD),
    };
    let bytes = reply.encode();
    debug_assert!(bytes.len() >= HEADER_LEN);
    Some(bytes)
}

#[cfg(test)]
#[path = "responder_tests.rs"]
mod tests;

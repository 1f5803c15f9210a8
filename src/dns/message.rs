//! The DNS wire format (RFC 1035 section 4, the OPT record of RFC 6891),
//! exactly as far as the responder needs it: a query's header, its one
//! question and whether it carries an OPT record in; a header, the echoed
//! question, at most one A or PTR record and an OPT record out. In-tree
//! rather than simple-dns: with that crate the name server added 106 KB to
//! the stripped binary, with this 47 KB, against a flash budget that was
//! already exceeded (README, Names).

use std::net::Ipv4Addr;

pub const HEADER_LEN: usize = 12;
pub const FLAG_QR: u16 = 0x8000;
pub const FLAG_AA: u16 = 0x0400;
pub const FLAG_RD: u16 = 0x0100;
pub const TYPE_A: u16 = 1;
pub const TYPE_PTR: u16 = 12;
pub const TYPE_OPT: u16 = 41;
pub const TYPE_ANY: u16 = 255;
pub const CLASS_IN: u16 = 1;
pub const CLASS_ANY: u16 = 255;
const MAX_LABEL: usize = 63;
/// A name on the wire, length bytes and terminating root included.
const MAX_NAME: usize = 255;
const POINTER: u8 = 0xc0;
/// Where the question's name starts in every message: right after the header.
const QUESTION_NAME_AT: u16 = HEADER_LEN as u16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rcode {
    NoError = 0,
    FormErr = 1,
    NxDomain = 3,
    NotImp = 4,
    Refused = 5,
}

/// The header fields a query is judged on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub id: u16,
    pub flags: u16,
    pub qdcount: u16,
    pub ancount: u16,
    pub nscount: u16,
    pub arcount: u16,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        let word = |i: usize| Some(u16::from_be_bytes([*b.get(i)?, *b.get(i + 1)?]));
        Some(Header {
            id: word(0)?,
            flags: word(2)?,
            qdcount: word(4)?,
            ancount: word(6)?,
            nscount: word(8)?,
            arcount: word(10)?,
        })
    }

    pub fn opcode(&self) -> u16 {
        (self.flags >> 11) & 0x0f
    }
}

/// A query's question, its name as labels in the case they were asked in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question<'a> {
    pub labels: Vec<&'a [u8]>,
    pub qtype: u16,
    pub qclass: u16,
}

/// The question of a one-question query, and whether an OPT record follows
/// it. `None` for anything malformed: a name that runs off the end, a
/// pointer that does not point strictly backwards (so every chain of
/// pointers ends), an oversized label or name, a cut record.
pub fn parse_query<'a>(b: &'a [u8], header: &Header) -> Option<(Question<'a>, bool)> {
    let (labels, at) = parse_name(b, HEADER_LEN)?;
    let qtype = u16_at(b, at)?;
    let qclass = u16_at(b, at + 2)?;
    let mut at = at + 4;
    let mut edns = false;
    for _ in 0..header.arcount {
        let (_, after_name) = parse_name(b, at)?;
        let rtype = u16_at(b, after_name)?;
        let rdlen = usize::from(u16_at(b, after_name + 8)?);
        at = after_name + 10 + rdlen;
        if at > b.len() {
            return None;
        }
        edns |= rtype == TYPE_OPT;
    }
    Some((
        Question {
            labels,
            qtype,
            qclass,
        },
        edns,
    ))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

/// The name at `start` as labels, and the offset just past it where it
/// was written (its first pointer ends it there).
fn parse_name(b: &[u8], start: usize) -> Option<(Vec<&[u8]>, usize)> {
    let mut labels = Vec::new();
    let mut wire_len = 1;
    let mut at = start;
    // Where this run of labels began: a pointer must go before it.
    let mut run_start = start;
    let mut end = None;
    loop {
        let len = *b.get(at)?;
        match len {
            0 => return Some((labels, end.unwrap_or(at + 1))),
            l if l & POINTER == POINTER => {
                let target = usize::from(u16::from_be_bytes([l & !POINTER, *b.get(at + 1)?]));
                if target >= run_start {
                    return None;
                }
                end.get_or_insert(at + 2);
                at = target;
                run_start = target;
            }
            l if usize::from(l) <= MAX_LABEL => {
                let l = usize::from(l);
                wire_len += 1 + l;
                if wire_len > MAX_NAME {
                    return None;
                }
                labels.push(b.get(at + 1..at + 1 + l)?);
                at += 1 + l;
            }
            // 0x40 and 0x80: extended label types, obsolete and unused.
            _ => return None,
        }
    }
}

/// The one record an answer may carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    A(Ipv4Addr),
    /// The target name, as dot-separated text (`nas.warren`).
    Ptr(String),
}

/// An answer to a parsed query.
pub struct Reply<'q, 'a> {
    pub query: &'q Header,
    pub question: &'q Question<'a>,
    pub rcode: Rcode,
    pub authoritative: bool,
    pub answer: Option<(u32, Record)>,
    /// Answer with an OPT record of this payload size.
    pub edns_payload: Option<u16>,
}

impl Reply<'_, '_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(128);
        let mut flags = FLAG_QR | (self.query.flags & (0x0f << 11 | FLAG_RD)) | self.rcode as u16;
        if self.authoritative {
            flags |= FLAG_AA;
        }
        for w in [
            self.query.id,
            flags,
            1,
            u16::from(self.answer.is_some()),
            0,
            u16::from(self.edns_payload.is_some()),
        ] {
            out.extend_from_slice(&w.to_be_bytes());
        }
        for l in &self.question.labels {
            out.push(l.len() as u8);
            out.extend_from_slice(l);
        }
        out.push(0);
        out.extend_from_slice(&self.question.qtype.to_be_bytes());
        out.extend_from_slice(&self.question.qclass.to_be_bytes());
        if let Some((ttl, record)) = &self.answer {
            // The owner is the question's name: a pointer to it.
            out.extend_from_slice(&(u16::from(POINTER) << 8 | QUESTION_NAME_AT).to_be_bytes());
            let (rtype, rdata) = match record {
                Record::A(addr) => (TYPE_A, addr.octets().to_vec()),
                Record::Ptr(target) => (TYPE_PTR, encode_name(target)),
            };
            out.extend_from_slice(&rtype.to_be_bytes());
            out.extend_from_slice(&CLASS_IN.to_be_bytes());
            out.extend_from_slice(&ttl.to_be_bytes());
            out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
            out.extend_from_slice(&rdata);
        }
        if let Some(payload) = self.edns_payload {
            // Root owner, TYPE OPT, CLASS = payload size, TTL = extended
            // rcode 0, version 0, no flags; no options.
            out.push(0);
            out.extend_from_slice(&TYPE_OPT.to_be_bytes());
            out.extend_from_slice(&payload.to_be_bytes());
            out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        }
        out
    }
}

/// A reply of just the header: for queries too malformed to echo.
pub fn header_only(query: &Header, rcode: Rcode) -> Vec<u8> {
    let flags = FLAG_QR | (query.flags & (0x0f << 11 | FLAG_RD)) | rcode as u16;
    let mut out = Vec::with_capacity(HEADER_LEN);
    out.extend_from_slice(&query.id.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// `nas.warren` on the wire. Labels come from the coordinator's names
/// (letters, digits, dashes) and the configured domain; one too long is cut.
fn encode_name(name: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(name.len() + 2);
    for l in name.split('.').filter(|l| !l.is_empty()) {
        let l = &l.as_bytes()[..l.len().min(MAX_LABEL)];
        out.push(l.len() as u8);
        out.extend_from_slice(l);
    }
    out.push(0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(arcount: u16) -> Header {
        Header {
            id: 7,
            flags: FLAG_RD,
            qdcount: 1,
            ancount: 0,
            nscount: 0,
            arcount,
        }
    }

    fn msg(tail: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 7, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        b.extend_from_slice(tail);
        b
    }

    #[test]
    fn names_and_their_limits() {
        let b = msg(b"\x03nas\x06warren\x00\x00\x01\x00\x01");
        let (q, edns) = parse_query(&b, &header(0)).unwrap();
        assert_eq!(q.labels, [&b"nas"[..], b"warren"]);
        assert_eq!((q.qtype, q.qclass, edns), (TYPE_A, CLASS_IN, false));
        // A label of 64 and a name over 255 bytes.
        let mut long = vec![64];
        long.extend_from_slice(&[b'a'; 64]);
        long.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(parse_query(&msg(&long), &header(0)).is_none());
        let mut name = Vec::new();
        for _ in 0..5 {
            name.push(63);
            name.extend_from_slice(&[b'a'; 63]);
        }
        name.extend_from_slice(&[0, 0, 1, 0, 1]);
        assert!(parse_query(&msg(&name), &header(0)).is_none());
        // Extended label types.
        assert!(parse_query(&msg(b"\x41a\x00\x00\x01\x00\x01"), &header(0)).is_none());
    }

    #[test]
    fn pointers_go_backwards_only() {
        // The additional record's owner points back at "warren" in the question.
        let b = msg(b"\x03nas\x06warren\x00\x00\x01\x00\x01\xc0\x10\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x00");
        let (_, edns) = parse_query(&b, &header(1)).unwrap();
        assert!(edns);
        let (labels, end) = parse_name(&b, 28).unwrap();
        assert_eq!((labels, end), (vec![&b"warren"[..]], 30));
        // To itself, forwards, and a chain that comes back to where it began.
        assert!(parse_name(&msg(b"\xc0\x0c"), 12).is_none());
        assert!(parse_name(&msg(b"\xc0\x0e\x00"), 12).is_none());
        assert!(parse_name(&msg(b"\x01a\xc0\x0c"), 12).is_none());
        let b = msg(b"\x00\xc0\x0c\xc0\x0d");
        assert!(parse_name(&b, 15).is_some_and(|(l, _)| l.is_empty()));
        assert!(parse_name(&msg(b"\xc0\x0e\xc0\x0c"), 14).is_none());
    }

    #[test]
    fn cut_records_are_malformed() {
        let full =
            msg(b"\x03nas\x06warren\x00\x00\x01\x00\x01\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x02\x00");
        assert!(parse_query(&full, &header(1)).is_none(), "rdata runs off the end");
        assert!(parse_query(&full[..full.len() - 1], &header(1)).is_none());
        assert!(
            parse_query(&full[..26], &header(0)).is_none(),
            "question cut in its class"
        );
    }

    #[test]
    fn encoded_reply() {
        let h = header(0);
        let q = Question {
            labels: vec![b"NAS", b"warren"],
            qtype: TYPE_A,
            qclass: CLASS_IN,
        };
        let r = Reply {
            query: &h,
            question: &q,
            rcode: Rcode::NoError,
            authoritative: true,
            answer: Some((1, Record::A(Ipv4Addr::new(100, 64, 0, 9)))),
            edns_payload: None,
        }
        .encode();
        let want = msg(b"\x03NAS\x06warren\x00\x00\x01\x00\x01\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x01\x00\x04\x64\x40\x00\x09");
        assert_eq!(&r[..2], &want[..2]);
        assert_eq!(u16::from_be_bytes([r[2], r[3]]), FLAG_QR | FLAG_AA | FLAG_RD);
        assert_eq!(&r[4..12], &[0, 1, 0, 1, 0, 0, 0, 0]);
        assert_eq!(&r[12..], &want[12..]);
        assert_eq!(encode_name("nas.warren."), b"\x03nas\x06warren\x00");
    }
}

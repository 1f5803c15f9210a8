//! The rtnetlink wire format warren needs: building a request (netlink
//! header, fixed family header, rtattr TLVs, nests) and reading an answer's
//! fixed header and attributes. Reading is bounded: every length is checked
//! against what is there, a short read is `Malformed` naming what was being
//! read, and unknown attributes are skipped.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::socket::NlError;

/// Size of `struct nlmsghdr`.
pub const NLMSG_HEADER_LEN: usize = 16;
/// Size of `struct rtattr` (length and type, both u16).
const RTA_HEADER_LEN: usize = 4;
/// The type bits of an attribute (without NLA_F_NESTED / NLA_F_NET_BYTEORDER).
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLA_F_NESTED: u16 = 0x8000;

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// A request being built: `nlmsghdr`, the family's fixed header, attributes.
/// Flags and sequence number are filled in by [`Request::finish`].
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    /// A message of `kind` (RTM_*) starting with the fixed header `header`.
    pub fn new(kind: u16, header: &[u8]) -> Request {
        let mut buf = Vec::with_capacity(128);
        buf.extend_from_slice(&[0u8; NLMSG_HEADER_LEN]);
        buf[4..6].copy_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(header);
        buf.resize(align4(buf.len()), 0);
        Request { buf }
    }

    pub fn attr(&mut self, kind: u16, value: &[u8]) -> &mut Request {
        let len = (RTA_HEADER_LEN + value.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Request {
        self.attr(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string attribute (names, link kinds).
    pub fn str(&mut self, kind: u16, value: &str) -> &mut Request {
        let mut v = Vec::with_capacity(value.len() + 1);
        v.extend_from_slice(value.as_bytes());
        v.push(0);
        self.attr(kind, &v)
    }

    /// An address attribute: 4 bytes for IPv4, 16 for IPv6.
    pub fn ip(&mut self, kind: u16, addr: IpAddr) -> &mut Request {
        match addr {
            IpAddr::V4(a) => self.attr(kind, &a.octets()),
            IpAddr::V6(a) => self.attr(kind, &a.octets()),
        }
    }

    /// Opens a nested attribute; close it with [`Request::end_nest`].
    pub fn begin_nest(&mut self, kind: u16) -> usize {
        let start = self.buf.len();
        self.attr(kind | NLA_F_NESTED, &[]);
        start
    }

    /// Raw bytes inside a nest (e.g. the `ifinfomsg` a veth peer starts with).
    pub fn raw(&mut self, bytes: &[u8]) -> &mut Request {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn end_nest(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }

    /// The complete message with its length, `flags` and `seq` filled in.
    pub fn finish(mut self, flags: u16, seq: u32) -> Vec<u8> {
        let len = self.buf.len() as u32;
        self.buf[0..4].copy_from_slice(&len.to_ne_bytes());
        self.buf[6..8].copy_from_slice(&flags.to_ne_bytes());
        self.buf[8..12].copy_from_slice(&seq.to_ne_bytes());
        self.buf
    }
}

/// One attribute of an answer: its type (flag bits removed) and value.
#[derive(Clone, Copy, Debug)]
pub struct Attr<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

/// Walks the attributes in `buf`; yields an error (then stops) at the first
/// attribute whose length does not fit. `what` names the message for errors.
pub struct Attrs<'a> {
    buf: &'a [u8],
    what: &'static str,
}

pub fn attrs<'a>(buf: &'a [u8], what: &'static str) -> Attrs<'a> {
    Attrs { buf, what }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<Attr<'a>, NlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let bad = |buf: &mut &[u8], detail: String| {
            *buf = &[];
            Some(Err(NlError::Malformed(detail)))
        };
        if self.buf.len() < RTA_HEADER_LEN {
            let detail = format!("{} attribute header: {} bytes left", self.what, self.buf.len());
            return bad(&mut self.buf, detail);
        }
        let len = u16::from_ne_bytes([self.buf[0], self.buf[1]]) as usize;
        let kind = u16::from_ne_bytes([self.buf[2], self.buf[3]]) & NLA_TYPE_MASK;
        if len < RTA_HEADER_LEN || len > self.buf.len() {
            let detail = format!(
                "{} attribute {kind}: length {len} with {} bytes left",
                self.what,
                self.buf.len()
            );
            return bad(&mut self.buf, detail);
        }
        let value = &self.buf[RTA_HEADER_LEN..len];
        // The last attribute may be unpadded.
        self.buf = self.buf.get(align4(len)..).unwrap_or(&[]);
        Some(Ok(Attr { kind, value }))
    }
}

/// Splits an answer's payload into its fixed header of `N` bytes and the
/// attributes after it (aligned to 4).
pub fn split_header<'a, const N: usize>(
    payload: &'a [u8],
    what: &'static str,
) -> Result<(&'a [u8; N], &'a [u8]), NlError> {
    let header = payload
        .get(..N)
        .and_then(|h| <&[u8; N]>::try_from(h).ok())
        .ok_or_else(|| NlError::Malformed(format!("short {what} header: {} of {N} bytes", payload.len())))?;
    let rest = payload.get(align4(N)..).unwrap_or(&[]);
    Ok((header, rest))
}

impl<'a> Attr<'a> {
    pub fn u32(&self, what: &'static str) -> Result<u32, NlError> {
        self.value
            .get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| self.short(what))
    }

    /// A string attribute, up to its first NUL (which may be absent).
    pub fn string(&self) -> String {
        let end = self
            .value
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.value.len());
        String::from_utf8_lossy(&self.value[..end]).into_owned()
    }

    /// An address attribute: its length says the family.
    pub fn ip(&self, what: &'static str) -> Result<IpAddr, NlError> {
        if let Ok(b) = <[u8; 4]>::try_from(self.value) {
            Ok(IpAddr::V4(Ipv4Addr::from(b)))
        } else if let Ok(b) = <[u8; 16]>::try_from(self.value) {
            Ok(IpAddr::V6(Ipv6Addr::from(b)))
        } else {
            Err(self.short(what))
        }
    }

    fn short(&self, what: &'static str) -> NlError {
        NlError::Malformed(format!(
            "{what} attribute {}: {} bytes",
            self.kind,
            self.value.len()
        ))
    }
}

pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

//! The packets inside the tunnel: IPv4 carrying ICMP echo or UDP. Parsing
//! checks every length and checksum; building writes correct checksums. Only
//! what WG-STUN answers is understood; everything else is a drop reason.

use std::net::Ipv4Addr;

/// The one inner address WG-STUN has (DESIGN.md: reserved service address).
pub const WGSTUN_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 4);
pub const STUN_PORT: u16 = 3478;

const IPV4_HEADER_LEN: usize = 20;
const ICMP_HEADER_LEN: usize = 8;
const UDP_HEADER_LEN: usize = 8;
const PROTO_ICMP: u8 = 1;
const PROTO_UDP: u8 = 17;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;
const FLAG_DONT_FRAGMENT: u16 = 0x4000;
const FLAG_MORE_FRAGMENTS: u16 = 0x2000;
const FRAGMENT_OFFSET_MASK: u16 = 0x1fff;
const REPLY_TTL: u8 = 64;

#[derive(Debug, PartialEq, Eq)]
pub enum Inner<'a> {
    /// `rest` is everything after the ICMP type/code/checksum: identifier, sequence, data.
    EchoRequest { src: Ipv4Addr, rest: &'a [u8] },
    Udp {
        src: Ipv4Addr,
        src_port: u16,
        dst_port: u16,
        payload: &'a [u8],
    },
}

/// Why an inner packet is dropped; each has its own counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Drop {
    Malformed,
    BadChecksum,
    Fragment,
    NotForUs,
    /// TCP, other ICMP types, UDP to a port other than 3478, IPv6.
    NotServed,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Internet checksum (RFC 1071) of `data`, continuing from `sum`.
fn sum_words(mut sum: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u16::from_be_bytes([c[0], c[1]]) as u32;
    }
    if let [last] = chunks.remainder() {
        sum += (*last as u32) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn checksum(data: &[u8]) -> u16 {
    fold(sum_words(0, data))
}

fn udp_pseudo_sum(src: Ipv4Addr, dst: Ipv4Addr, udp_len: usize) -> u32 {
    let mut sum = sum_words(0, &src.octets());
    sum = sum_words(sum, &dst.octets());
    sum + PROTO_UDP as u32 + udp_len as u32
}

pub fn parse(packet: &[u8]) -> Result<Inner<'_>, Drop> {
    if packet.is_empty() {
        return Err(Drop::Malformed);
    }
    if packet[0] >> 4 != 4 {
        return Err(Drop::NotServed);
    }
    if packet.len() < IPV4_HEADER_LEN {
        return Err(Drop::Malformed);
    }
    let header_len = ((packet[0] & 0x0f) as usize) * 4;
    let total_len = be16(packet, 2) as usize;
    if header_len < IPV4_HEADER_LEN || total_len < header_len || total_len > packet.len() {
        return Err(Drop::Malformed);
    }
    let packet = &packet[..total_len];
    if checksum(&packet[..header_len]) != 0 {
        return Err(Drop::BadChecksum);
    }
    let frag = be16(packet, 6);
    if frag & (FLAG_MORE_FRAGMENTS | FRAGMENT_OFFSET_MASK) != 0 {
        return Err(Drop::Fragment);
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    if dst != WGSTUN_ADDR {
        return Err(Drop::NotForUs);
    }
    let body = &packet[header_len..];
    match packet[9] {
        PROTO_ICMP => {
            if body.len() < ICMP_HEADER_LEN {
                return Err(Drop::Malformed);
            }
            if checksum(body) != 0 {
                return Err(Drop::BadChecksum);
            }
            if body[0] != ICMP_ECHO_REQUEST || body[1] != 0 {
                return Err(Drop::NotServed);
            }
            Ok(Inner::EchoRequest {
                src,
                rest: &body[4..],
            })
        }
        PROTO_UDP => {
            if body.len() < UDP_HEADER_LEN {
                return Err(Drop::Malformed);
            }
            let udp_len = be16(body, 4) as usize;
            if udp_len < UDP_HEADER_LEN || udp_len > body.len() {
                return Err(Drop::Malformed);
            }
            let udp = &body[..udp_len];
            // A zero checksum means "none" in IPv4 UDP.
            if be16(udp, 6) != 0 && fold(sum_words(udp_pseudo_sum(src, dst, udp_len), udp)) != 0 {
                return Err(Drop::BadChecksum);
            }
            let dst_port = be16(udp, 2);
            if dst_port != STUN_PORT {
                return Err(Drop::NotServed);
            }
            Ok(Inner::Udp {
                src,
                src_port: be16(udp, 0),
                dst_port,
                payload: &udp[UDP_HEADER_LEN..],
            })
        }
        _ => Err(Drop::NotServed),
    }
}

fn push_ipv4_header(out: &mut Vec<u8>, proto: u8, src: Ipv4Addr, dst: Ipv4Addr, payload_len: usize) {
    let start = out.len();
    let total = (IPV4_HEADER_LEN + payload_len) as u16;
    out.extend_from_slice(&[0x45, 0]);
    out.extend_from_slice(&total.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&FLAG_DONT_FRAGMENT.to_be_bytes());
    out.extend_from_slice(&[REPLY_TTL, proto, 0, 0]);
    out.extend_from_slice(&src.octets());
    out.extend_from_slice(&dst.octets());
    let c = checksum(&out[start..]);
    out[start + 10..start + 12].copy_from_slice(&c.to_be_bytes());
}

/// Echo reply from 100.64.0.4 to `dst`, echoing identifier, sequence and data.
pub fn build_echo_reply(out: &mut Vec<u8>, dst: Ipv4Addr, rest: &[u8]) {
    // Type, code and checksum, then the echoed rest.
    push_ipv4_header(out, PROTO_ICMP, WGSTUN_ADDR, dst, 4 + rest.len());
    let icmp = out.len();
    out.extend_from_slice(&[ICMP_ECHO_REPLY, 0, 0, 0]);
    out.extend_from_slice(rest);
    let c = checksum(&out[icmp..]);
    out[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
}

/// UDP datagram from 100.64.0.4:`src_port` to `dst`:`dst_port`.
pub fn build_udp(out: &mut Vec<u8>, src_port: u16, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) {
    push_udp(out, WGSTUN_ADDR, src_port, dst, dst_port, payload);
}

/// Builds a packet *to* 100.64.0.4, as a client would: for tests and benches.
pub fn build_udp_to_server(out: &mut Vec<u8>, src: Ipv4Addr, src_port: u16, dst_port: u16, payload: &[u8]) {
    push_udp(out, src, src_port, WGSTUN_ADDR, dst_port, payload);
}

fn push_udp(out: &mut Vec<u8>, src: Ipv4Addr, src_port: u16, dst: Ipv4Addr, dst_port: u16, payload: &[u8]) {
    let udp_len = UDP_HEADER_LEN + payload.len();
    push_ipv4_header(out, PROTO_UDP, src, dst, udp_len);
    let udp = out.len();
    out.extend_from_slice(&src_port.to_be_bytes());
    out.extend_from_slice(&dst_port.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(payload);
    let mut c = fold(sum_words(udp_pseudo_sum(src, dst, udp_len), &out[udp..]));
    if c == 0 {
        c = 0xffff; // zero would mean "no checksum"
    }
    out[udp + 6..udp + 8].copy_from_slice(&c.to_be_bytes());
}

/// Parses a packet *from* 100.64.0.4 (the client's view): (src port, dst port, payload) of UDP.
pub fn parse_udp_from_server(packet: &[u8]) -> Option<(u16, u16, &[u8])> {
    if packet.len() < IPV4_HEADER_LEN + UDP_HEADER_LEN || packet[0] != 0x45 || packet[9] != PROTO_UDP {
        return None;
    }
    if checksum(&packet[..IPV4_HEADER_LEN]) != 0 {
        return None;
    }
    let total = (be16(packet, 2) as usize).min(packet.len());
    let udp = packet.get(IPV4_HEADER_LEN..total)?;
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let udp_len = be16(udp, 4) as usize;
    if udp_len != udp.len() || fold(sum_words(udp_pseudo_sum(src, dst, udp_len), udp)) != 0 {
        return None;
    }
    Some((be16(udp, 0), be16(udp, 2), &udp[UDP_HEADER_LEN..]))
}

/// Fuzz entry point (also run by the unit tests): parse, and answer what parses.
pub fn fuzz_parse(packet: &[u8]) -> usize {
    let mut out = Vec::new();
    match parse(packet) {
        Ok(Inner::EchoRequest { src, rest }) => build_echo_reply(&mut out, src, rest),
        Ok(Inner::Udp {
            src,
            src_port,
            payload,
            ..
        }) => build_udp(&mut out, STUN_PORT, src, src_port, payload),
        Err(_) => {}
    }
    out.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);

    fn echo_request(dst: Ipv4Addr) -> Vec<u8> {
        let mut out = Vec::new();
        let icmp_len = 8 + 5;
        push_ipv4_header(&mut out, PROTO_ICMP, CLIENT, dst, icmp_len);
        let at = out.len();
        out.extend_from_slice(&[ICMP_ECHO_REQUEST, 0, 0, 0, 0x12, 0x34, 0, 7]);
        out.extend_from_slice(b"hello");
        let c = checksum(&out[at..]);
        out[at + 2..at + 4].copy_from_slice(&c.to_be_bytes());
        out
    }

    #[test]
    fn checksum_matches_rfc1071_example() {
        // RFC 1071 section 3 example bytes sum to 0xddf2 before complement.
        assert_eq!(
            checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]),
            !0xddf2
        );
    }

    #[test]
    fn echo_request_gets_a_valid_reply() {
        let req = echo_request(WGSTUN_ADDR);
        let Ok(Inner::EchoRequest { src, rest }) = parse(&req) else {
            panic!("not parsed")
        };
        assert_eq!(src, CLIENT);
        let mut reply = Vec::new();
        build_echo_reply(&mut reply, src, rest);
        assert_eq!(reply.len(), req.len());
        assert_eq!(checksum(&reply[..20]), 0);
        assert_eq!(checksum(&reply[20..]), 0);
        assert_eq!(reply[20], ICMP_ECHO_REPLY);
        assert_eq!(&reply[12..16], &WGSTUN_ADDR.octets());
        assert_eq!(&reply[16..20], &CLIENT.octets());
        assert_eq!(&reply[24..], &req[24..], "identifier, sequence and data echoed");
    }

    #[test]
    fn udp_round_trips_with_checksums() {
        let mut pkt = Vec::new();
        build_udp_to_server(&mut pkt, CLIENT, 5555, STUN_PORT, b"stun!");
        assert_eq!(
            parse(&pkt),
            Ok(Inner::Udp {
                src: CLIENT,
                src_port: 5555,
                dst_port: STUN_PORT,
                payload: b"stun!"
            })
        );
        let mut reply = Vec::new();
        build_udp(&mut reply, STUN_PORT, CLIENT, 5555, b"answer");
        assert_eq!(
            parse_udp_from_server(&reply),
            Some((STUN_PORT, 5555, &b"answer"[..]))
        );
    }

    #[test]
    fn drop_reasons() {
        let mut pkt = Vec::new();
        build_udp_to_server(&mut pkt, CLIENT, 5555, 53, b"dns?");
        assert_eq!(parse(&pkt), Err(Drop::NotServed));

        let mut bad_udp = Vec::new();
        build_udp_to_server(&mut bad_udp, CLIENT, 5555, STUN_PORT, b"stun!");
        let last = bad_udp.len() - 1;
        bad_udp[last] ^= 1;
        assert_eq!(parse(&bad_udp), Err(Drop::BadChecksum));

        let mut bad_ip = echo_request(WGSTUN_ADDR);
        bad_ip[8] = 1; // TTL changed, header checksum now wrong
        assert_eq!(parse(&bad_ip), Err(Drop::BadChecksum));

        assert_eq!(
            parse(&echo_request(Ipv4Addr::new(100, 64, 0, 5))),
            Err(Drop::NotForUs)
        );

        let mut tcp = echo_request(WGSTUN_ADDR);
        tcp[9] = 6;
        tcp[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&tcp[..20]);
        tcp[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse(&tcp), Err(Drop::NotServed));

        let mut frag = echo_request(WGSTUN_ADDR);
        frag[6..8].copy_from_slice(&FLAG_MORE_FRAGMENTS.to_be_bytes());
        frag[10..12].copy_from_slice(&[0, 0]);
        let c = checksum(&frag[..20]);
        frag[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(parse(&frag), Err(Drop::Fragment));

        let full = echo_request(WGSTUN_ADDR);
        for cut in 0..full.len() {
            assert!(parse(&full[..cut]).is_err(), "truncated at {cut}");
        }
        assert_eq!(parse(&[0x60; 40]), Err(Drop::NotServed), "IPv6 is not served");
    }

    #[test]
    fn parser_never_panics_on_mangled_input() {
        let mut seeds = vec![echo_request(WGSTUN_ADDR)];
        let mut udp = Vec::new();
        build_udp_to_server(&mut udp, CLIENT, 1, STUN_PORT, &[0u8; 20]);
        seeds.push(udp);
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for seed in &seeds {
            for cut in 0..=seed.len() {
                fuzz_parse(&seed[..cut]);
            }
            for _ in 0..5000 {
                let mut m = seed.clone();
                for _ in 0..1 + next() % 4 {
                    let i = (next() as usize) % m.len();
                    m[i] = next() as u8;
                }
                fuzz_parse(&m);
            }
        }
    }
}

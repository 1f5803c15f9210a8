//! Encoder round trips (encode → frame → our dump parser), splitting edge
//! cases, and the parser's no-panic property over random and damaged input.

use std::net::SocketAddr;

use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST};

use super::*;

const FAKE_FAMILY: u16 = 0x20;

fn key(n: u32) -> Key {
    let mut k = [0u8; 32];
    k[..4].copy_from_slice(&n.to_be_bytes());
    k[31] = 0x42;
    Key(k)
}

fn ip(s: &str) -> AllowedIp {
    s.parse().unwrap()
}

fn peer_with_ips(n: u32, ips: Vec<AllowedIp>) -> PeerUpdate {
    let mut p = PeerUpdate::new(key(n));
    p.replace_allowed_ips = Some(ips);
    p
}

fn frame_all(msgs: Vec<WireguardMessage>) -> (Vec<u8>, Vec<usize>) {
    let mut all = Vec::new();
    let mut sizes = Vec::new();
    for (i, m) in msgs.into_iter().enumerate() {
        let bytes = frame(m, FAKE_FAMILY, NLM_F_REQUEST | NLM_F_ACK, i as u32 + 1);
        sizes.push(bytes.len());
        all.extend_from_slice(&bytes);
    }
    (all, sizes)
}

/// The peer flags of every peer entry in every message, in order.
fn peer_flags(msgs: &[WireguardMessage]) -> Vec<(Key, Option<WireguardPeerFlags>, usize)> {
    let mut out = Vec::new();
    for m in msgs {
        for a in &m.attributes {
            if let WireguardAttribute::Peers(peers) = a {
                for p in peers {
                    let mut k = None;
                    let mut flags = None;
                    let mut n_ips = 0;
                    for pa in &p.0 {
                        match pa {
                            WireguardPeerAttribute::PublicKey(b) => k = Some(Key(*b)),
                            WireguardPeerAttribute::Flags(f) => flags = Some(*f),
                            WireguardPeerAttribute::AllowedIps(l) => n_ips = l.len(),
                            _ => {}
                        }
                    }
                    out.push((k.unwrap(), flags, n_ips));
                }
            }
        }
    }
    out
}

#[test]
fn small_update_round_trips_in_one_message() {
    let mut a = peer_with_ips(1, vec![ip("10.0.0.2/32"), ip("fd00::2/128")]);
    a.endpoint = Some("203.0.113.5:51820".parse().unwrap());
    a.persistent_keepalive = Some(25);
    a.preshared_key = Some(key(99));
    let mut b = peer_with_ips(2, vec![ip("10.0.1.0/24")]);
    b.endpoint = Some("[2001:db8::7]:4500".parse::<SocketAddr>().unwrap());
    let update = DeviceUpdate {
        private_key: Some(key(7)),
        listen_port: Some(51820),
        fwmark: Some(0x51),
        peers: vec![a, b],
    };
    let msgs = encode_set("wg-test", &update, MAX_SET_MESSAGE);
    assert_eq!(msgs.len(), 1);
    let (bytes, _) = frame_all(msgs);
    let state = parse_dump(&bytes).unwrap();
    assert_eq!(state.private_key, Some(key(7)));
    assert_eq!(state.listen_port, 51820);
    assert_eq!(state.fwmark, 0x51);
    assert_eq!(state.peers.len(), 2);
    let p = &state.peers[0];
    assert_eq!(p.public_key, key(1));
    assert_eq!(p.preshared_key, Some(key(99)));
    assert_eq!(p.endpoint, Some("203.0.113.5:51820".parse().unwrap()));
    assert_eq!(p.persistent_keepalive, Some(25));
    assert_eq!(p.allowed_ips, vec![ip("10.0.0.2/32"), ip("fd00::2/128")]);
    assert_eq!(
        state.peers[1].endpoint,
        Some("[2001:db8::7]:4500".parse().unwrap())
    );
    assert_eq!(state.peers[1].allowed_ips, vec![ip("10.0.1.0/24")]);
}

#[test]
fn empty_update_sends_nothing_and_device_only_update_sends_one() {
    assert!(encode_set("wg0", &DeviceUpdate::default(), MAX_SET_MESSAGE).is_empty());
    let update = DeviceUpdate {
        listen_port: Some(1),
        ..Default::default()
    };
    let msgs = encode_set("wg0", &update, MAX_SET_MESSAGE);
    assert_eq!(msgs.len(), 1);
    assert!(
        !msgs[0]
            .attributes
            .iter()
            .any(|a| matches!(a, WireguardAttribute::Peers(_)))
    );
}

#[test]
fn ten_thousand_peers_split_under_the_budget_in_order() {
    let peers: Vec<PeerUpdate> = (0..10_000u32)
        .map(|i| {
            let a = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let mut p = peer_with_ips(i, vec![AllowedIp::new(a, 32).unwrap()]);
            p.endpoint = Some(SocketAddr::new(
                IpAddr::V4(Ipv4Addr::new(198, 51, 100, 1)),
                10_000 + i as u16,
            ));
            p.persistent_keepalive = Some(25);
            p
        })
        .collect();
    let update = DeviceUpdate {
        private_key: Some(key(1)),
        peers,
        ..Default::default()
    };
    let msgs = encode_set("wg0", &update, MAX_SET_MESSAGE);
    let flags = peer_flags(&msgs);
    assert_eq!(flags.len(), 10_000, "no peer split when one IP each");
    let (bytes, sizes) = frame_all(msgs);
    assert!(sizes.iter().all(|&s| s <= MAX_SET_MESSAGE), "{sizes:?}");
    // Full messages are really full: fewer than 1 KiB wasted each.
    assert!(
        sizes[..sizes.len() - 1]
            .iter()
            .all(|&s| s > MAX_SET_MESSAGE - 1024),
        "{sizes:?}"
    );
    let state = parse_dump(&bytes).unwrap();
    assert_eq!(state.peers.len(), 10_000);
    for (i, p) in state.peers.iter().enumerate() {
        assert_eq!(p.public_key, key(i as u32));
        assert_eq!(p.allowed_ips.len(), 1);
    }
}

#[test]
fn a_peer_too_big_for_one_message_continues_without_replace_flag() {
    let ips: Vec<AllowedIp> = (0..5_000u32)
        .map(|i| AllowedIp::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + (i << 8))), 24).unwrap())
        .collect();
    let mut before = peer_with_ips(1, vec![ip("192.0.2.1/32")]);
    before.endpoint = Some("192.0.2.1:1".parse().unwrap());
    let big = peer_with_ips(2, ips.clone());
    let after = peer_with_ips(3, vec![ip("fd00::3/128")]);
    let update = DeviceUpdate {
        listen_port: Some(5),
        peers: vec![before, big, after],
        ..Default::default()
    };
    let msgs = encode_set("wg0", &update, MAX_SET_MESSAGE);
    let flags = peer_flags(&msgs);
    let parts: Vec<_> = flags.iter().filter(|(k, _, _)| *k == key(2)).collect();
    assert!(
        parts.len() >= 4,
        "5,000 IPs need several messages: {}",
        parts.len()
    );
    assert_eq!(parts[0].1, Some(WireguardPeerFlags::ReplaceAllowedIps));
    assert!(parts[1..].iter().all(|(_, f, n)| f.is_none() && *n > 0));
    assert_eq!(parts.iter().map(|p| p.2).sum::<usize>(), 5_000);
    let (bytes, sizes) = frame_all(msgs);
    assert!(sizes.iter().all(|&s| s <= MAX_SET_MESSAGE), "{sizes:?}");
    let state = parse_dump(&bytes).unwrap();
    assert_eq!(state.peers.len(), 3);
    assert_eq!(state.peers[1].allowed_ips, ips);
    assert_eq!(state.peers[2].allowed_ips, vec![ip("fd00::3/128")]);
}

#[test]
fn tiny_budgets_still_make_progress_and_keep_everything() {
    let peers: Vec<PeerUpdate> = (0..20u32)
        .map(|i| peer_with_ips(i, (0..7).map(|j| ip(&format!("10.{i}.{j}.0/24"))).collect()))
        .collect();
    let update = DeviceUpdate {
        private_key: Some(key(5)),
        peers,
        ..Default::default()
    };
    for budget in [0, 64, 120, 200, 300, 1000] {
        let msgs = encode_set("wg0", &update, budget);
        let (bytes, _) = frame_all(msgs);
        let state = parse_dump(&bytes).unwrap();
        assert_eq!(state.peers.len(), 20, "budget {budget}");
        assert!(
            state.peers.iter().all(|p| p.allowed_ips.len() == 7),
            "budget {budget}"
        );
        assert_eq!(state.private_key, Some(key(5)));
    }
}

#[test]
fn remove_and_clear_allowed_ips() {
    let mut gone = peer_with_ips(1, vec![ip("10.0.0.1/32")]);
    gone.remove = true;
    let cleared = peer_with_ips(2, vec![]);
    let mut untouched_ips = PeerUpdate::new(key(3));
    untouched_ips.persistent_keepalive = Some(0);
    let update = DeviceUpdate {
        peers: vec![gone, cleared, untouched_ips],
        ..Default::default()
    };
    let msgs = encode_set("wg0", &update, MAX_SET_MESSAGE);
    let flags = peer_flags(&msgs);
    assert_eq!(flags[0], (key(1), Some(WireguardPeerFlags::RemoveMe), 0));
    assert_eq!(flags[1], (key(2), Some(WireguardPeerFlags::ReplaceAllowedIps), 0));
    assert_eq!(flags[2], (key(3), None, 0));
}

#[test]
fn dump_continuation_merges_only_at_message_start() {
    // Same key twice within one message is two entries (the kernel never
    // sends that; we must not merge silently across unrelated peers).
    let update = DeviceUpdate {
        peers: vec![
            peer_with_ips(1, vec![ip("10.0.0.1/32")]),
            peer_with_ips(1, vec![ip("10.0.0.2/32")]),
        ],
        ..Default::default()
    };
    let (bytes, _) = frame_all(encode_set("wg0", &update, MAX_SET_MESSAGE));
    assert_eq!(parse_dump(&bytes).unwrap().peers.len(), 2);
}

/// A small deterministic generator, so a failure reproduces.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn parser_never_panics_on_random_truncated_or_mutated_input() {
    let mut a = peer_with_ips(1, vec![ip("10.0.0.2/32"), ip("fd00::2/128")]);
    a.endpoint = Some("[2001:db8::7]:4500".parse().unwrap());
    a.preshared_key = Some(key(9));
    let update = DeviceUpdate {
        private_key: Some(key(7)),
        listen_port: Some(51820),
        peers: vec![a, peer_with_ips(2, vec![ip("10.1.0.0/16")])],
        ..Default::default()
    };
    let (valid, _) = frame_all(encode_set("wg0", &update, 200));
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    for len in 0..valid.len() {
        let _ = parse_dump(&valid[..len]);
    }
    for _ in 0..20_000 {
        let mut buf = valid.clone();
        for _ in 0..(rng.next() % 8 + 1) {
            let i = (rng.next() as usize) % buf.len();
            buf[i] = rng.next() as u8;
        }
        let cut = (rng.next() as usize) % (buf.len() + 1);
        let _ = parse_dump(&buf[..cut]);
        let _ = parse_dump(&buf);
    }
    for _ in 0..5_000 {
        let len = (rng.next() % 300) as usize;
        let buf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let _ = parse_dump(&buf);
        let mut p = DumpParser::new();
        let _ = p.feed(&buf);
    }
}

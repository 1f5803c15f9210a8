//! The responder core against real boringtun clients, in process: handshake,
//! STUN inside the tunnel, roaming, ICMP, bad input, floods.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::inner::{self, STUN_PORT};
use super::responder::{Responder, ResponderConfig, SESSION_IDLE_TIMEOUT};
use crate::keys::Key;
use crate::stun::Message;
use crate::stun::message::binding_request;

const CLIENT_INNER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);

struct Client {
    tunn: Tunn,
    buf: Vec<u8>,
}

impl Client {
    fn new(server: &Responder) -> Client {
        let private = StaticSecret::from(Key::generate_private().0);
        let server_public = PublicKey::from(server.public_key().0);
        Client {
            tunn: Tunn::new(private, server_public, None, None, 7, None),
            buf: vec![0u8; 65_536],
        }
    }

    fn initiation(&mut self) -> Vec<u8> {
        match self.tunn.format_handshake_initiation(&mut self.buf, true) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("no initiation: {other:?}"),
        }
    }

    /// Feeds a datagram from the server; returns the datagram to send back, or the inner packet.
    fn receive(&mut self, bytes: &[u8]) -> (Option<Vec<u8>>, Option<Vec<u8>>) {
        match self
            .tunn
            .decapsulate(Some("192.0.2.1".parse().unwrap()), bytes, &mut self.buf)
        {
            TunnResult::WriteToNetwork(p) => (Some(p.to_vec()), None),
            TunnResult::WriteToTunnelV4(p, _) => (None, Some(p.to_vec())),
            TunnResult::Done => (None, None),
            other => panic!("client could not take server datagram: {other:?}"),
        }
    }

    fn seal(&mut self, inner: &[u8]) -> Vec<u8> {
        match self.tunn.encapsulate(inner, &mut self.buf) {
            TunnResult::WriteToNetwork(p) => p.to_vec(),
            other => panic!("client could not seal: {other:?}"),
        }
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn responder(max_sessions: usize, handshakes_per_sec: u64) -> Responder {
    let mut c = ResponderConfig::new(Key::generate_private());
    c.max_sessions = max_sessions;
    c.handshakes_per_sec = handshakes_per_sec;
    Responder::new(&c)
}

/// Runs the handshake from `from`; afterwards the server holds a confirmed session.
fn connect(server: &mut Responder, client: &mut Client, now: Instant, from: SocketAddr) {
    let init = client.initiation();
    server.handle_input(now, from, &init);
    let resp = server.poll_transmit().expect("handshake response");
    assert_eq!(resp.dst, from);
    let (keepalive, _) = client.receive(&resp.payload);
    server.handle_input(now, from, &keepalive.expect("client confirms with a keepalive"));
    assert!(server.poll_transmit().is_none());
}

fn stun_request(tid: [u8; 12]) -> Vec<u8> {
    let mut stun = Vec::new();
    binding_request(&mut stun, &tid, true);
    let mut pkt = Vec::new();
    inner::build_udp_to_server(&mut pkt, CLIENT_INNER, 40_000, STUN_PORT, &stun);
    pkt
}

/// Sends a Binding request inside the tunnel from `from`; returns the XOR-MAPPED-ADDRESS answered.
fn ask(server: &mut Responder, client: &mut Client, now: Instant, from: SocketAddr) -> SocketAddr {
    let tid = [from.port() as u8; 12];
    let sealed = client.seal(&stun_request(tid));
    server.handle_input(now, from, &sealed);
    let t = server.poll_transmit().expect("an answer");
    assert_eq!(t.dst, from, "answer goes where the request came from");
    let (_, inner_pkt) = client.receive(&t.payload);
    let inner_pkt = inner_pkt.expect("an inner packet");
    let (sport, dport, payload) =
        inner::parse_udp_from_server(&inner_pkt).expect("valid UDP from 100.64.0.4");
    assert_eq!((sport, dport), (STUN_PORT, 40_000));
    let m = Message::decode(payload).expect("valid STUN");
    assert!(m.has_fingerprint);
    assert_eq!(m.transaction_id, tid);
    m.xor_mapped_address().expect("XOR-MAPPED-ADDRESS")
}

#[test]
fn stun_inside_the_tunnel_reports_the_outer_address_and_follows_roaming() {
    let mut server = responder(100, 100);
    let mut client = Client::new(&server);
    let now = Instant::now();
    let first = addr("203.0.113.5:51820");
    connect(&mut server, &mut client, now, first);
    assert_eq!(ask(&mut server, &mut client, now, first), first);
    // The NAT gave the client a new mapping: the next answer says so.
    let roamed = addr("203.0.113.5:61001");
    assert_eq!(ask(&mut server, &mut client, now, roamed), roamed);
    let moved = addr("198.51.100.77:1234");
    assert_eq!(ask(&mut server, &mut client, now, moved), moved);
    let s = server.stats();
    assert_eq!((s.handshakes, s.stun_answered, s.keepalives), (1, 3, 1));
    assert_eq!(server.session_count(), 1);
}

#[test]
fn ping_is_answered_and_everything_else_dropped() {
    let mut server = responder(100, 100);
    let mut client = Client::new(&server);
    let now = Instant::now();
    let from = addr("203.0.113.5:51820");
    connect(&mut server, &mut client, now, from);

    // ICMP echo request, built by hand.
    let mut ping = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 1, 0, 0];
    ping.extend_from_slice(&CLIENT_INNER.octets());
    ping.extend_from_slice(&inner::WGSTUN_ADDR.octets());
    ping.extend_from_slice(&[8, 0, 0, 0, 0xab, 0xcd, 0, 1, b'x', b'y']);
    let total = ping.len() as u16;
    ping[2..4].copy_from_slice(&total.to_be_bytes());
    let c = inner::checksum(&ping[..20]);
    ping[10..12].copy_from_slice(&c.to_be_bytes());
    let c = inner::checksum(&ping[20..]);
    ping[22..24].copy_from_slice(&c.to_be_bytes());
    let sealed = client.seal(&ping);
    server.handle_input(now, from, &sealed);
    let t = server.poll_transmit().expect("echo reply");
    let (_, reply) = client.receive(&t.payload);
    let reply = reply.expect("inner reply");
    assert_eq!(reply[20], 0, "echo reply");
    assert_eq!(&reply[24..], &ping[24..]);

    // UDP to another port, STUN that is not a Binding request, a packet for another address.
    let mut other_port = Vec::new();
    inner::build_udp_to_server(&mut other_port, CLIENT_INNER, 1, 53, b"dns");
    let mut not_binding = Vec::new();
    inner::build_udp_to_server(
        &mut not_binding,
        CLIENT_INNER,
        1,
        STUN_PORT,
        b"definitely not stun at all",
    );
    let mut elsewhere = ping.clone();
    elsewhere[19] = 5;
    for pkt in [other_port, not_binding, elsewhere] {
        let sealed = client.seal(&pkt);
        server.handle_input(now, from, &sealed);
        assert!(server.poll_transmit().is_none(), "no answer to anything else");
    }
    let s = server.stats();
    assert_eq!(s.echo_answered, 1);
    assert_eq!(s.inner_not_served, 2);
    // The changed address also breaks the header checksum.
    assert_eq!(s.inner_bad_checksum + s.inner_not_for_us, 1);
}

#[test]
fn garbage_truncated_forged_and_replayed_handshakes_are_counted_and_ignored() {
    let mut server = responder(100, 100);
    let mut client = Client::new(&server);
    let now = Instant::now();
    let from = addr("203.0.113.5:51820");
    let init = client.initiation();

    server.handle_input(now, from, b"hello, is this WireGuard?");
    server.handle_input(now, from, &init[..100]);
    let mut forged = init.clone();
    forged[50] ^= 1; // breaks mac1
    server.handle_input(now, from, &forged);
    // An initiation for a different server key: mac1 does not match ours.
    let other = responder(10, 10);
    let mut stranger = Client::new(&other);
    server.handle_input(now, from, &stranger.initiation());
    // Data for a session that does not exist.
    let mut data = vec![4u8, 0, 0, 0, 0x01, 0x02, 0x03, 0x04];
    data.resize(64, 0);
    server.handle_input(now, from, &data);
    assert!(server.poll_transmit().is_none());
    assert_eq!(server.session_count(), 0);

    // The genuine initiation works, its replay does not.
    server.handle_input(now, from, &init);
    let resp = server.poll_transmit().expect("handshake response");
    server.handle_input(now, from, &init);
    assert!(
        server.poll_transmit().is_none(),
        "replayed initiation is not answered"
    );
    let (keepalive, _) = client.receive(&resp.payload);
    server.handle_input(now, from, &keepalive.unwrap());
    // A data packet with a corrupted tag.
    let mut sealed = client.seal(&stun_request([1; 12]));
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    server.handle_input(now, from, &sealed);
    assert!(server.poll_transmit().is_none());

    let s = server.stats();
    assert_eq!(s.not_wireguard, 2, "{s:?}");
    assert_eq!(s.bad_mac, 2, "{s:?}");
    assert_eq!(s.unknown_session, 1, "{s:?}");
    assert_eq!(s.handshake_rejected, 1, "{s:?}");
    assert_eq!(s.decrypt_failed, 1, "{s:?}");
    assert_eq!(s.handshakes, 1, "{s:?}");
    assert_eq!(server.session_count(), 1);
    // Still serving.
    assert_eq!(ask(&mut server, &mut client, now, from), from);
}

#[test]
fn session_table_stays_bounded_under_a_flood_of_distinct_keys() {
    const FLOOD: usize = 10_000;
    const MAX: usize = 500;
    let mut server = responder(MAX, u64::MAX / 4);
    let now = Instant::now();
    // One real client first; it goes quiet while the flood arrives.
    let mut early = Client::new(&server);
    connect(&mut server, &mut early, now, addr("203.0.113.1:1"));
    let mut last = None;
    for i in 0..FLOOD {
        let mut c = Client::new(&server);
        let from = SocketAddr::new("198.51.100.1".parse().unwrap(), 1024 + (i % 60_000) as u16);
        server.handle_input(now, from, &c.initiation());
        while server.poll_transmit().is_some() {}
        assert!(server.session_count() <= MAX);
        last = Some((c, from));
    }
    let s = server.stats();
    assert_eq!(s.handshakes as usize, FLOOD + 1);
    assert_eq!(server.session_count(), MAX);
    assert_eq!(s.sessions_evicted as usize, FLOOD + 1 - MAX);
    // The newest initiator still completes its handshake and gets answers.
    let (mut c, from) = last.unwrap();
    // Re-handshake: its response was drained above.
    connect(&mut server, &mut c, now, from);
    assert_eq!(ask(&mut server, &mut c, now, from), from);
    // The early, least recently used client was evicted.
    let sealed = early.seal(&stun_request([9; 12]));
    server.handle_input(now, addr("203.0.113.1:1"), &sealed);
    assert!(server.poll_transmit().is_none());
    assert!(server.stats().unknown_session >= 1);
}

#[test]
fn cookie_replies_engage_under_a_handshake_flood() {
    const RATE: u64 = 20;
    let mut server = responder(10_000, RATE);
    let now = Instant::now();
    let mut cookies = 0;
    for i in 0..500u16 {
        let mut c = Client::new(&server);
        server.handle_input(
            now,
            SocketAddr::new("198.51.100.1".parse().unwrap(), 2000 + i),
            &c.initiation(),
        );
        while let Some(t) = server.poll_transmit() {
            if t.payload[0] == 3 {
                cookies += 1;
            }
        }
    }
    let s = server.stats();
    assert!(cookies > 400, "cookie replies: {cookies}, {s:?}");
    assert_eq!(s.cookie_replies, cookies);
    assert!(
        server.session_count() <= 2 * RATE as usize,
        "{}",
        server.session_count()
    );
}

#[test]
fn idle_sessions_expire() {
    let mut server = responder(100, 100);
    let mut client = Client::new(&server);
    let start = Instant::now();
    let from = addr("203.0.113.5:51820");
    connect(&mut server, &mut client, start, from);
    let mut now = start;
    let deadline = start + SESSION_IDLE_TIMEOUT + Duration::from_secs(5);
    let mut steps = 0;
    while server.session_count() > 0 && now < deadline {
        now = server
            .poll_timeout()
            .expect("a timer while sessions exist")
            .max(now);
        server.handle_timeout(now);
        while server.poll_transmit().is_some() {}
        steps += 1;
        assert!(steps < 1000);
    }
    assert_eq!(server.session_count(), 0);
    assert!(now >= start + SESSION_IDLE_TIMEOUT);
    assert_eq!(server.stats().sessions_expired, 1);
}

#[test]
fn mangled_datagrams_never_panic_and_never_create_sessions() {
    let mut server = responder(100, 1_000_000);
    let mut client = Client::new(&server);
    let now = Instant::now();
    let from = addr("203.0.113.5:51820");
    let init = client.initiation();
    connect(&mut server, &mut client, now, from);
    let data = client.seal(&stun_request([2; 12]));
    let mut state = 0x853c_49e6_748f_ea9bu64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for seed in [&init, &data] {
        for cut in 0..seed.len() {
            server.handle_input(now, from, &seed[..cut]);
        }
        for _ in 0..3000 {
            let mut m = seed.clone();
            for _ in 0..1 + next() % 3 {
                let i = (next() as usize) % m.len();
                m[i] = next() as u8;
            }
            server.handle_input(now, from, &m);
        }
    }
    while server.poll_transmit().is_some() {}
    assert_eq!(server.session_count(), 1, "only the genuine client has a session");
    assert_eq!(ask(&mut server, &mut client, now, from), from);
}

/// The mio shell on loopback sockets, in process: plain STUN and STUN through the tunnel.
#[test]
fn spawned_server_answers_on_real_sockets() {
    let key = Key::generate_private();
    let config = super::Config {
        listen: addr("127.0.0.1:0"),
        stun_listen: Some(addr("127.0.0.1:0")),
        private_key: key,
        max_sessions: 16,
        handshakes_per_sec: 100,
        stun_requests_per_source: 0,
        stats_interval: None,
    };
    let (wg, stun, _thread) = super::spawn(config).unwrap();
    let (answered, _) = super::load::plain_stun_rounds(stun.unwrap(), 4, Duration::from_millis(200)).unwrap();
    assert!(answered > 0);
    let mut clients = super::load::Clients::new(wg, key.public_key(), 2).unwrap();
    let connected = clients
        .connect_all(2, Instant::now() + Duration::from_secs(10))
        .unwrap();
    assert_eq!(connected, 2);
    let (answered, wrong, _) = clients.stun_rounds(2, Duration::from_millis(200)).unwrap();
    assert!(answered > 0);
    assert_eq!(wrong, 0);
}

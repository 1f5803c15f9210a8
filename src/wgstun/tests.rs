//! The responder core against real boringtun clients, in process: handshake,
//! STUN inside the tunnel, roaming, ICMP, bad input, floods.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use super::inner::{self, STUN_PORT};
use super::responder::{
    DEFAULT_HANDSHAKES_PER_SOURCE, DEFAULT_MAX_SESSIONS_PER_SOURCE, Responder, ResponderConfig,
    SESSION_IDLE_TIMEOUT,
};
use crate::keys::Key;
use crate::stun::Message;
use crate::stun::message::binding_request;

const CLIENT_INNER: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 9);
const WG_COOKIE_REPLY: u8 = 3;

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
    responder_capped(max_sessions, DEFAULT_MAX_SESSIONS_PER_SOURCE, handshakes_per_sec)
}

fn responder_capped(max_sessions: usize, per_source: usize, handshakes_per_sec: u64) -> Responder {
    let mut c = ResponderConfig::new(Key::generate_private());
    c.max_sessions = max_sessions;
    c.max_sessions_per_source = per_source;
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

/// Handshakes `client` from `from` as WireGuard does when the server demands
/// a cookie: the cookie reply is taken in and the initiation sent again, now
/// with mac2. Confirms the session with the client's keepalive. Returns how
/// many cookie replies it took (0 or 1), or None if the server dropped the
/// initiation (its source used up this second's handshakes).
fn connect_proving(
    server: &mut Responder,
    client: &mut Client,
    now: Instant,
    from: SocketAddr,
) -> Option<usize> {
    for cookies in 0..2 {
        server.handle_input(now, from, &client.initiation());
        let t = server.poll_transmit()?;
        assert_eq!(t.dst, from);
        match client.receive(&t.payload) {
            (Some(keepalive), _) => {
                server.handle_input(now, from, &keepalive);
                assert!(server.poll_transmit().is_none());
                return Some(cookies);
            }
            (None, None) => assert_eq!(t.payload[0], WG_COOKIE_REPLY),
            other => panic!("unexpected answer to an initiation: {other:?}"),
        }
    }
    panic!("no session after answering a cookie reply");
}

/// Moves the clock one housekeeping tick on.
fn next_second(server: &mut Responder, now: &mut Instant) {
    *now += Duration::from_secs(1);
    server.handle_timeout(*now);
    while server.poll_transmit().is_some() {}
}

/// `n` fresh keys from `ip` (one port each), as fast as the server lets them:
/// each answers its cookie reply and confirms its session, and when the
/// server drops one (budget spent) it tries again the next second. `ask_each`
/// makes each send a STUN request too. Returns the seconds it took.
fn flood_proving(server: &mut Responder, now: &mut Instant, ip: &str, n: usize, ask_each: bool) -> u32 {
    let mut seconds = 0;
    for i in 0..n {
        let mut c = Client::new(server);
        let from = SocketAddr::new(ip.parse().unwrap(), 1024 + (i % 60_000) as u16);
        while connect_proving(server, &mut c, *now, from).is_none() {
            next_second(server, now);
            seconds += 1;
            c = Client::new(server);
        }
        if ask_each {
            assert_eq!(ask(server, &mut c, *now, from), from);
        }
    }
    seconds
}

#[test]
fn a_flooding_source_that_answers_cookies_gets_few_handshakes_and_replaces_only_its_own_sessions() {
    const MAX: usize = 64;
    const PER_SOURCE: usize = 8;
    const FLOOD: usize = 4 * MAX;
    let mut server = responder_capped(MAX, PER_SOURCE, 10);
    let mut now = Instant::now();
    let legit_from = addr("203.0.113.20:51820");
    let mut legit = Client::new(&server);
    connect(&mut server, &mut legit, now, legit_from);
    assert_eq!(ask(&mut server, &mut legit, now, legit_from), legit_from);
    let seconds = flood_proving(&mut server, &mut now, "198.51.100.50", FLOOD, false);
    let s = server.stats();
    // Its handshakes per second are the per-source budget, not what it can send.
    assert!(
        seconds as usize >= FLOOD / DEFAULT_HANDSHAKES_PER_SOURCE as usize - 1,
        "{FLOOD} sessions in {seconds} s: {s:?}"
    );
    assert!(s.source_over_budget >= seconds as u64, "{s:?}");
    assert_eq!(s.sessions_created as usize, FLOOD + 1, "{s:?}");
    assert_eq!(server.session_count(), PER_SOURCE + 1, "{s:?}");
    assert_eq!(s.evicted_at_source_cap, s.sessions_evicted, "{s:?}");
    assert_eq!(s.evicted_asked, 0, "{s:?}");
    // The real client never lost its session.
    assert_eq!(ask(&mut server, &mut legit, now, legit_from), legit_from);
    // Its re-key while everyone must prove: a cookie first, then it is through.
    for i in 0..20 {
        let mut c = Client::new(&server);
        server.handle_input(
            now,
            addr(&format!("198.51.100.50:{}", 30_000 + i)),
            &c.initiation(),
        );
    }
    while server.poll_transmit().is_some() {}
    assert_eq!(connect_proving(&mut server, &mut legit, now, legit_from), Some(1));
    assert_eq!(ask(&mut server, &mut legit, now, legit_from), legit_from);
}

#[test]
fn a_full_table_gives_way_to_never_asked_sessions_of_big_sources() {
    const MAX: usize = 120;
    const PER_SOURCE: usize = 40;
    let mut server = responder_capped(MAX, PER_SOURCE, u64::MAX / 4);
    let mut now = Instant::now();
    let mut legit: Vec<(Client, SocketAddr)> = (0..10)
        .map(|i| {
            let from = addr(&format!("203.0.113.{}:51820", 20 + i));
            let mut c = Client::new(&server);
            connect(&mut server, &mut c, now, from);
            assert_eq!(ask(&mut server, &mut c, now, from), from);
            (c, from)
        })
        .collect();
    // Five flooders at their caps together want 200 sessions: the table is full long before.
    for f in 0..5 {
        flood_proving(
            &mut server,
            &mut now,
            &format!("198.51.100.{}", 50 + f),
            PER_SOURCE,
            f == 0,
        );
    }
    assert_eq!(server.session_count(), MAX);
    let s = server.stats();
    assert_eq!(s.evicted_asked, 0, "only sessions that never asked went: {s:?}");
    // Two more flooders that ask, as clients do: the 70 silent sessions go
    // first, then those of the biggest sources, never a lone client's.
    flood_proving(&mut server, &mut now, "198.51.100.98", PER_SOURCE, true);
    flood_proving(&mut server, &mut now, "198.51.100.99", PER_SOURCE, true);
    let s = server.stats();
    assert_eq!(s.evicted_asked, 10, "{s:?}");
    for (c, from) in &mut legit {
        assert_eq!(
            ask(&mut server, c, now, *from),
            *from,
            "a real client was evicted: {s:?}"
        );
    }
}

#[test]
fn a_spoofed_flood_fills_free_room_only_and_meets_cookies_at_a_full_table() {
    const FLOOD: usize = 2_000;
    const MAX: usize = 300;
    let mut server = responder(MAX, u64::MAX / 4);
    let now = Instant::now();
    // One real client first; it asked once and goes quiet while the flood arrives.
    let early_from = addr("203.0.113.1:1");
    let mut early = Client::new(&server);
    connect(&mut server, &mut early, now, early_from);
    assert_eq!(ask(&mut server, &mut early, now, early_from), early_from);
    // Initiations from addresses that never see the answers: no cookie is ever answered.
    for i in 0..FLOOD {
        let mut c = Client::new(&server);
        let from = SocketAddr::new(
            std::net::Ipv4Addr::from(0xc633_6400 + i as u32).into(),
            1024 + (i % 60_000) as u16,
        );
        server.handle_input(now, from, &c.initiation());
        while server.poll_transmit().is_some() {}
        assert!(server.session_count() <= MAX);
    }
    let s = server.stats();
    assert_eq!(server.session_count(), MAX);
    assert_eq!(s.sessions_created as usize, MAX, "{s:?}");
    assert_eq!(s.sessions_evicted, 0, "{s:?}");
    assert_eq!(s.cookie_replies as usize, FLOOD + 1 - MAX, "{s:?}");
    // A newcomer who proves its address gets in, at a spoofed session's cost.
    let (mut late, late_from) = (Client::new(&server), addr("192.0.2.77:4000"));
    assert_eq!(connect_proving(&mut server, &mut late, now, late_from), Some(1));
    assert_eq!(ask(&mut server, &mut late, now, late_from), late_from);
    assert_eq!(server.stats().sessions_evicted, 1);
    assert_eq!(server.stats().evicted_asked, 0);
    assert_eq!(ask(&mut server, &mut early, now, early_from), early_from);
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
        server.session_count() <= RATE as usize,
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
        max_sessions_per_source: 16,
        handshakes_per_sec: 100,
        handshakes_per_source: 100,
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

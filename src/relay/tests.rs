//! The real relay server on loopback, driven by in-process clients that speak
//! the protocol over blocking sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::RELAY_PROFILE;
use super::admission::SourceLimits;
use super::client::{Event, RelayClient};
use super::client_conn::Limits;
use super::frame::RelayFrame;
use super::load::connect_from;
use super::server::{RelayConfig, RelayGuards, RelayHandle, RelayServer, RelayStats};
use crate::control::channel::Channel;
use crate::control::noise::Profile;
use crate::keys::Key;

const DEADLINE: Duration = Duration::from_secs(10);

struct Relay {
    addr: SocketAddr,
    public: Key,
    handle: RelayHandle,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    fn start(limits: Limits) -> Relay {
        Relay::start_at("127.0.0.1:0".parse().unwrap(), Key::generate_private(), limits)
    }

    fn start_at(listen: SocketAddr, private_key: Key, limits: Limits) -> Relay {
        Relay::from_server(
            RelayServer::bind(RelayConfig {
                listen,
                private_key,
                limits,
                max_clients: 100,
            })
            .unwrap(),
        )
    }

    fn start_guarded(limits: Limits, max_clients: usize, guards: RelayGuards) -> Relay {
        let cfg = RelayConfig {
            limits,
            max_clients,
            ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), Key::generate_private())
        };
        Relay::from_server(RelayServer::bind_guarded(cfg, guards).unwrap())
    }

    fn from_server(server: RelayServer) -> Relay {
        let addr = server.local_addr().unwrap();
        let public = server.public_key();
        let handle = server.handle();
        let thread = std::thread::spawn(move || server.run().unwrap());
        Relay {
            addr,
            public,
            handle,
            thread: Some(thread),
        }
    }

    /// Polls the server's counters until `ok` holds.
    fn wait_stats(&self, what: &str, ok: impl Fn(&RelayStats) -> bool) -> RelayStats {
        let end = Instant::now() + DEADLINE;
        loop {
            let s = self.handle.stats();
            if ok(&s) {
                return s;
            }
            assert!(Instant::now() < end, "waiting for {what}: {s:?}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Client {
    stream: TcpStream,
    ch: Channel,
    key: Key,
    /// What the client wrote to register: its first handshake message, then its first sealed message.
    handshake_wire: [Vec<u8>; 2],
}

impl Client {
    fn connect(relay: &Relay, key: Key) -> Client {
        Client::connect_with(relay, key, &RELAY_PROFILE)
    }

    fn connect_with(relay: &Relay, key: Key, profile: &Profile) -> Client {
        Client::handshake(relay, TcpStream::connect(relay.addr).unwrap(), key, profile)
    }

    /// A client from another loopback address (all of 127/8 is local), so
    /// the relay sees another source.
    fn connect_from(relay: &Relay, local: Ipv4Addr, key: Key) -> Client {
        let stream = connect_from(local, relay.addr).unwrap();
        Client::handshake(relay, stream, key, &RELAY_PROFILE)
    }

    fn handshake(relay: &Relay, stream: TcpStream, key: Key, profile: &Profile) -> Client {
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut ch = Channel::client_with(profile, &key, &relay.public).unwrap();
        // Registration happens on the first sealed message.
        ch.send(&RelayFrame::KeepAlive.encode().unwrap()).unwrap();
        let mut c = Client {
            stream,
            ch,
            key,
            handshake_wire: Default::default(),
        };
        c.handshake_wire[0] = c.ch.outgoing().to_vec();
        c.flush();
        let end = Instant::now() + DEADLINE;
        while !c.ch.is_open() {
            assert!(Instant::now() < end, "handshake did not finish");
            c.read_some().unwrap();
        }
        c.handshake_wire[1] = c.ch.outgoing().to_vec();
        c.flush();
        c
    }

    fn public(&self) -> Key {
        self.key.public_key()
    }

    fn flush(&mut self) {
        let out = self.ch.outgoing().to_vec();
        self.stream.write_all(&out).unwrap();
        self.ch.consume_outgoing(out.len());
    }

    fn read_some(&mut self) -> std::io::Result<usize> {
        let mut buf = [0u8; 65536];
        let n = self.stream.read(&mut buf)?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        self.ch
            .receive(&buf[..n])
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(n)
    }

    fn send(&mut self, f: &RelayFrame) {
        self.ch.send(&f.encode().unwrap()).unwrap();
        self.flush();
    }

    fn send_to(&mut self, to: Key, payload: &[u8]) {
        self.send(&RelayFrame::SendTo {
            key: to,
            payload: payload.to_vec(),
        });
    }

    /// Next frame other than a keepalive.
    fn recv(&mut self) -> std::io::Result<RelayFrame> {
        loop {
            while let Some(m) = self.ch.next_message() {
                let f = RelayFrame::decode(&m).unwrap();
                if f != RelayFrame::KeepAlive {
                    return Ok(f);
                }
            }
            self.read_some()?;
        }
    }

    /// True once the relay closed this connection.
    fn closed_by_relay(&mut self) -> bool {
        let end = Instant::now() + DEADLINE;
        while Instant::now() < end {
            match self.read_some() {
                Ok(_) => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                    return false;
                }
                Err(_) => return true,
            }
        }
        false
    }
}

fn recv_from(key: Key, payload: &[u8]) -> RelayFrame {
    RelayFrame::RecvFrom {
        key,
        payload: payload.to_vec(),
    }
}

#[test]
fn forwards_between_two_clients_both_ways() {
    let relay = Relay::start(Limits::default());
    let mut a = Client::connect(&relay, Key::generate_private());
    let mut b = Client::connect(&relay, Key::generate_private());
    a.send_to(b.public(), b"ping");
    assert_eq!(b.recv().unwrap(), recv_from(a.public(), b"ping"));
    b.send_to(a.public(), b"pong");
    assert_eq!(a.recv().unwrap(), recv_from(b.public(), b"pong"));
    let big = vec![0x5a; super::frame::MAX_PAYLOAD_LEN];
    a.send_to(b.public(), &big);
    assert_eq!(b.recv().unwrap(), recv_from(a.public(), &big));
    relay.wait_stats("two forwards", |s| s.forwarded == 3 && s.registered == 2);
}

#[test]
fn presence_is_told_to_clients_that_sent_to_the_key() {
    let relay = Relay::start(Limits::default());
    let mut a = Client::connect(&relay, Key::generate_private());
    let d_key = Key::generate_private();
    let d = d_key.public_key();
    a.send_to(d, b"anyone?");
    assert_eq!(a.recv().unwrap(), RelayFrame::PeerGone { key: d });
    let mut dc = Client::connect(&relay, d_key);
    assert_eq!(a.recv().unwrap(), RelayFrame::PeerPresent { key: d });
    a.send_to(d, b"hello");
    assert_eq!(dc.recv().unwrap(), recv_from(a.public(), b"hello"));
    drop(dc);
    assert_eq!(a.recv().unwrap(), RelayFrame::PeerGone { key: d });
}

#[test]
fn a_second_connection_with_the_same_key_replaces_the_first() {
    let relay = Relay::start(Limits::default());
    let b_key = Key::generate_private();
    let mut a = Client::connect(&relay, Key::generate_private());
    let mut b1 = Client::connect(&relay, b_key);
    let mut b2 = Client::connect(&relay, b_key);
    assert!(b1.closed_by_relay());
    a.send_to(b2.public(), b"to the new one");
    assert_eq!(b2.recv().unwrap(), recv_from(a.public(), b"to the new one"));
    relay.wait_stats("replacement", |s| s.replaced == 1 && s.registered == 2);
}

#[test]
fn impersonation_is_impossible() {
    let relay = Relay::start(Limits::default());
    let a_key = Key::generate_private();
    let mut a = Client::connect(&relay, a_key);
    let mut b = Client::connect(&relay, Key::generate_private());

    // Mallory holds her own key: what she sends is labelled with her key, not A's.
    let mut m = Client::connect(&relay, Key::generate_private());
    m.send_to(b.public(), b"i am a");
    assert_eq!(b.recv().unwrap(), recv_from(m.public(), b"i am a"));
    relay.wait_stats("three registered", |s| s.registered == 3);

    // Mallory replays what A wrote to register on a new connection. The relay
    // answers the handshake message, as it answers anyone's...
    let mut replay = TcpStream::connect(relay.addr).unwrap();
    replay.set_read_timeout(Some(DEADLINE)).unwrap();
    replay.write_all(&a.handshake_wire[0]).unwrap();
    let answered = replay.read(&mut [0u8; 4096]).unwrap_or(0);
    assert!(answered > 0, "the relay answered the replayed handshake");
    // ...but A's sealed message belongs to A's session, not to this one: the
    // relay closes the connection and A stays registered.
    replay.write_all(&a.handshake_wire[1]).unwrap();
    // (The answer above is one small write, read whole.)
    let closed = match replay.read(&mut [0u8; 4096]) {
        Ok(0) => true,
        Ok(n) => panic!("the relay sent {n} more bytes to the replaying connection"),
        Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => false,
        Err(_) => true,
    };
    assert!(closed, "the relay closed the replaying connection");
    let s = relay.wait_stats("the replay counted as bad input", |s| s.closed_bad_input == 1);
    assert_eq!((s.replaced, s.registered), (0, 3), "{s:?}");
    // A pinned relay key Mallory does not hold cannot answer A either (no relay impersonation).
    let (_, first) = crate::control::noise::initiate_with(&RELAY_PROFILE, &a_key, &relay.public).unwrap();
    assert!(crate::control::noise::respond_with(&RELAY_PROFILE, &Key::generate_private(), &first).is_err());

    // A's own connection still is A: it gets what is sent to A.
    b.send_to(a.public(), b"for a only");
    assert_eq!(a.recv().unwrap(), recv_from(b.public(), b"for a only"));
}

#[test]
fn bad_input_closes_only_that_connection() {
    let relay = Relay::start(Limits::default());
    let mut a = Client::connect(&relay, Key::generate_private());
    let mut b = Client::connect(&relay, Key::generate_private());

    // Plain garbage before any handshake.
    let mut g = TcpStream::connect(relay.addr).unwrap();
    g.set_read_timeout(Some(DEADLINE)).unwrap();
    g.write_all(b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n").unwrap();
    assert_eq!(
        g.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "garbage connection closed"
    );

    // A frame header announcing more than the maximum.
    let mut o = TcpStream::connect(relay.addr).unwrap();
    o.set_read_timeout(Some(DEADLINE)).unwrap();
    o.write_all(&[0, 0x10, 0, 0, 1, 1]).unwrap();
    assert_eq!(o.read(&mut [0u8; 16]).unwrap_or(0), 0, "oversized header closed");

    // A truncated handshake, then the client goes away.
    let mut t = TcpStream::connect(relay.addr).unwrap();
    t.write_all(&[0, 0, 0, 60, 1, 1, 9, 9]).unwrap();
    drop(t);

    // After a valid handshake: a relay frame over 64 KiB, split into Noise fragments.
    let loose = Profile {
        prologue: RELAY_PROFILE.prologue,
        max_message: 1 << 20,
    };
    let mut big = Client::connect_with(&relay, Key::generate_private(), &loose);
    let oversized = [&[1u8, 1][..], &b.public().0, &vec![1u8; 100_000]].concat();
    big.ch.send(&oversized).unwrap();
    big.flush();
    assert!(big.closed_by_relay());

    // After a valid handshake: a frame with an unknown version, and one truncated inside.
    let mut v = Client::connect(&relay, Key::generate_private());
    v.ch.send(&[9, 1, 2, 3]).unwrap();
    v.flush();
    assert!(v.closed_by_relay());
    let mut tr = Client::connect(&relay, Key::generate_private());
    tr.ch.send(&[1, 1, 2, 3]).unwrap();
    tr.flush();
    assert!(tr.closed_by_relay());

    relay.wait_stats("bad connections counted", |s| {
        s.closed_bad_input >= 5 && s.clients == 2
    });
    a.send_to(b.public(), b"still here");
    assert_eq!(b.recv().unwrap(), recv_from(a.public(), b"still here"));
}

/// A client that stops reading: its queue stays at the bound, datagrams for it
/// are dropped, and another pair keeps its round trips.
#[test]
fn slow_reader_is_bounded_and_does_not_stall_others() {
    let limits = Limits {
        queue_bytes: 128 * 1024,
        rate_bytes_per_sec: 1 << 40,
        burst_bytes: 1 << 40,
        ..Limits::default()
    };
    let relay = Relay::start(limits);
    let slow = Client::connect(&relay, Key::generate_private());
    // A small receive window so the test fills the path quickly; the relay's own bound is what is checked.
    crate::sockopt::set_buffer(&slow.stream, libc::SO_RCVBUF, 16 * 1024);
    let slow_key = slow.public();
    let mut flood = Client::connect(&relay, Key::generate_private());
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flood = stop.clone();
    let flooder = std::thread::spawn(move || {
        let payload = vec![7u8; 16 * 1024];
        let mut sent = 0u64;
        // Paced at about 8 MiB/s: far more than the slow reader takes, while
        // leaving the shared CPU to the relay and the pair being timed.
        // Bounded: at most 1 GiB even if the test below never says stop.
        while !stop_flood.load(Ordering::SeqCst) && sent < 1 << 30 {
            flood.send_to(slow_key, &payload);
            sent += payload.len() as u64;
            std::thread::sleep(Duration::from_millis(2));
        }
        sent
    });
    // The slow reader's socket buffers fill first, then its relay queue, then drops start.
    relay.wait_stats("the slow reader's queue to overflow", |s| {
        s.dropped_queue_full > 100
    });

    let mut a = Client::connect(&relay, Key::generate_private());
    let mut b = Client::connect(&relay, Key::generate_private());
    let mut worst = Duration::ZERO;
    let started = Instant::now();
    for i in 0..30u32 {
        let t = Instant::now();
        a.send_to(b.public(), &i.to_be_bytes());
        assert_eq!(b.recv().unwrap(), recv_from(a.public(), &i.to_be_bytes()));
        b.send_to(a.public(), &i.to_be_bytes());
        assert_eq!(a.recv().unwrap(), recv_from(b.public(), &i.to_be_bytes()));
        worst = worst.max(t.elapsed());
    }
    let during = relay.handle.stats();
    stop.store(true, Ordering::SeqCst);
    let flooded = flooder.join().unwrap();
    log!(
        "slow reader: flooded {} MiB, max queued {} bytes (bound {}), dropped {}, other pair's round trips: worst {:?}, mean {:?}",
        flooded >> 20,
        during.max_queued_bytes,
        limits.queue_bytes,
        during.dropped_queue_full,
        worst,
        started.elapsed() / 30
    );
    assert!(during.max_queued_bytes <= limits.queue_bytes, "{during:?}");
    assert!(during.dropped_queue_full > 100);
    // A relay that blocked on the slow reader would never deliver (the reads above
    // would time out). The bound on the round trip is loose on purpose: the
    // test suite runs in parallel on a shared 2-core machine with a debug build.
    assert!(worst < Duration::from_secs(5), "worst round trip {worst:?}");
    drop(slow);
}

#[test]
fn max_clients_refuses_more() {
    let server = RelayServer::bind(RelayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        private_key: Key::generate_private(),
        limits: Limits::default(),
        max_clients: 2,
    })
    .unwrap();
    let relay = Relay::from_server(server);
    let _a = Client::connect(&relay, Key::generate_private());
    let _b = Client::connect(&relay, Key::generate_private());
    // Registered on their first sealed message, just after the handshake.
    relay.wait_stats("two registered", |s| s.registered == 2);
    let mut c = TcpStream::connect(relay.addr).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(
        c.read(&mut [0u8; 16]).unwrap_or(0),
        0,
        "third client closed at once"
    );
    relay.wait_stats("refusal", |s| s.rejected_full == 1 && s.clients == 2);
}

/// The I/O shell for a [`RelayClient`] over a real socket, polled with a short sleep.
struct Shell {
    client: RelayClient,
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl Shell {
    fn new(addr: SocketAddr, relay_key: Key, key: Key) -> Shell {
        Shell {
            client: RelayClient::new(key, relay_key, Instant::now()),
            addr,
            stream: None,
        }
    }

    /// Runs until `want` matches an event (true) or the deadline passes (false).
    fn run_until(&mut self, want: impl FnMut(&Event) -> bool) -> bool {
        self.run_for(DEADLINE, want)
    }

    fn run_for(&mut self, limit: Duration, mut want: impl FnMut(&Event) -> bool) -> bool {
        let end = Instant::now() + limit;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < end {
            let now = Instant::now();
            if self.client.poll_timeout().is_some_and(|t| t <= now) {
                self.client.handle_timeout(now);
            }
            while let Some(ev) = self.client.poll_event() {
                match &ev {
                    Event::Connect => match TcpStream::connect(self.addr) {
                        Ok(s) => {
                            s.set_nonblocking(true).unwrap();
                            self.stream = Some(s);
                            self.client.on_tcp_connected(now);
                        }
                        Err(e) => self.client.on_tcp_closed(now, &e.to_string()),
                    },
                    Event::Close(_) => self.stream = None,
                    _ => {}
                }
                if want(&ev) {
                    return true;
                }
            }
            let Some(s) = &mut self.stream else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            let out = self.client.outgoing().to_vec();
            match s.write(&out) {
                Ok(n) => self.client.consume_outgoing(n),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => {
                    self.stream = None;
                    self.client.on_tcp_closed(now, &e.to_string());
                    continue;
                }
            }
            match s.read(&mut buf) {
                Ok(0) => {
                    self.stream = None;
                    self.client.on_tcp_closed(now, "closed by the relay");
                }
                Ok(n) => self.client.on_bytes(now, &buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(2)),
                Err(e) => {
                    self.stream = None;
                    self.client.on_tcp_closed(now, &e.to_string());
                }
            }
        }
        false
    }
}

/// Two relay clients over real sockets; the relay restarts (same key, same
/// port) and both reconnect by themselves and traffic flows again.
#[test]
fn clients_reconnect_after_a_relay_restart_and_traffic_resumes() {
    let relay_key = Key::generate_private();
    let relay = Relay::start_at("127.0.0.1:0".parse().unwrap(), relay_key, Limits::default());
    let addr = relay.addr;
    let (ka, kb) = (Key::generate_private(), Key::generate_private());
    let mut a = Shell::new(addr, relay.public, ka);
    let mut b = Shell::new(addr, relay.public, kb);
    assert!(a.run_until(|e| *e == Event::Open));
    assert!(b.run_until(|e| *e == Event::Open));
    let exchange = |a: &mut Shell, b: &mut Shell, what: &[u8]| {
        // Datagram semantics: resend until one arrives, as WireGuard would retransmit.
        for _ in 0..20 {
            a.client.send_to(Instant::now(), kb.public_key(), what);
            a.run_for(Duration::from_millis(50), |_| false);
            if b.run_for(Duration::from_millis(500), |e| {
                matches!(e, Event::Received { from, payload } if *from == ka.public_key() && payload == what)
            }) {
                return;
            }
        }
        panic!("no delivery of {what:?}");
    };
    exchange(&mut a, &mut b, b"before restart");

    drop(relay);
    let relay = Relay::start_at(addr, relay_key, Limits::default());
    assert!(a.run_until(|e| *e == Event::Open), "a reconnected");
    assert!(b.run_until(|e| *e == Event::Open), "b reconnected");
    exchange(&mut a, &mut b, b"after restart");
    relay.wait_stats("both back", |s| s.registered == 2 && s.forwarded >= 1);
}

/// One address opens connections as fast as it can (never finishing a
/// handshake) and then registers as many keys as it may: the relay refuses
/// the excess at once, and clients from other addresses still register and
/// forward while the flood goes on.
#[test]
fn a_flooding_source_does_not_crowd_out_other_clients() {
    let guards = RelayGuards {
        per_source: SourceLimits {
            connects_per_sec: 20,
            connect_burst: 10,
            max_pending: 4,
            max_clients: 6,
        },
        ..RelayGuards::for_relay(20)
    };
    let relay = Relay::start_guarded(Limits::default(), 20, guards);
    let flooder_ip = Ipv4Addr::new(127, 0, 0, 1);
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flood = stop.clone();
    let addr = relay.addr;
    let flooder = std::thread::spawn(move || {
        let mut held = std::collections::VecDeque::new();
        let mut attempts = 0u32;
        // Bounded: at most 5,000 attempts, holding the last 64 open.
        while !stop_flood.load(Ordering::SeqCst) && attempts < 5000 {
            attempts += 1;
            if let Ok(s) = connect_from(flooder_ip, addr) {
                held.push_back(s);
                if held.len() > 64 {
                    held.pop_front();
                }
            }
        }
        attempts
    });
    relay.wait_stats("the flood to be refused", |s| {
        s.refused_rate + s.refused_pending > 200
    });

    let mut a = Client::connect_from(&relay, Ipv4Addr::new(127, 0, 0, 2), Key::generate_private());
    let mut b = Client::connect_from(&relay, Ipv4Addr::new(127, 0, 0, 3), Key::generate_private());
    for i in 0..10u32 {
        a.send_to(b.public(), &i.to_be_bytes());
        assert_eq!(b.recv().unwrap(), recv_from(a.public(), &i.to_be_bytes()));
        b.send_to(a.public(), &i.to_be_bytes());
        assert_eq!(a.recv().unwrap(), recv_from(b.public(), &i.to_be_bytes()));
    }
    let during = relay.wait_stats("both registered during the flood", |s| s.registered == 2);
    stop.store(true, Ordering::SeqCst);
    let attempts = flooder.join().unwrap();
    log!("flood: {attempts} connection attempts; relay: {during:?}");
    assert!(
        during.clients <= 2 + 4,
        "the flooder holds at most its pending cap: {during:?}"
    );
    assert_eq!(during.rejected_full, 0, "the relay never filled up: {during:?}");

    // The same address registering made-up keys gets at most its share of the
    // relay (the rate limit lets it try again after the flood stopped).
    let mut extra = Vec::new();
    let end = Instant::now() + DEADLINE;
    while relay.handle.stats().refused_source_full == 0 {
        assert!(
            Instant::now() < end,
            "no per-source cap: {:?}",
            relay.handle.stats()
        );
        let Ok(stream) = connect_from(flooder_ip, relay.addr) else {
            continue;
        };
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut ch = Channel::client_with(&RELAY_PROFILE, &Key::generate_private(), &relay.public).unwrap();
        ch.send(&RelayFrame::KeepAlive.encode().unwrap()).unwrap();
        let mut c = Client {
            stream,
            ch,
            key: Key::generate_private(),
            handshake_wire: Default::default(),
        };
        c.flush();
        // A refused connection is closed before it is answered.
        let mut opened = true;
        while !c.ch.is_open() {
            if c.read_some().is_err() {
                opened = false;
                break;
            }
        }
        if opened {
            c.flush();
            extra.push(c);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = relay.wait_stats("the extra clients registered", |s| {
        s.registered == 2 + extra.len()
    });
    assert!(extra.len() <= 6, "{} clients from one source: {s:?}", extra.len());
    // Others still get in.
    let mut c = Client::connect_from(&relay, Ipv4Addr::new(127, 0, 0, 4), Key::generate_private());
    c.send_to(a.public(), b"late");
    assert_eq!(a.recv().unwrap(), recv_from(c.public(), b"late"));
}

/// Several clients stop reading while a flooder sends to them: all queues
/// together never pass the relay's budget (datagrams are dropped and counted
/// instead), and a pair that keeps reading still gets every round trip.
#[test]
fn queue_budget_holds_with_slow_readers_while_a_fast_pair_forwards() {
    let limits = Limits {
        queue_bytes: 128 * 1024,
        rate_bytes_per_sec: 1 << 40,
        burst_bytes: 1 << 40,
        ..Limits::default()
    };
    let budget = 3 * limits.queue_bytes;
    let guards = RelayGuards {
        total_queue_bytes: budget,
        ..RelayGuards::for_relay(100)
    };
    let relay = Relay::start_guarded(limits, 100, guards);
    let mut a = Client::connect(&relay, Key::generate_private());
    let mut b = Client::connect(&relay, Key::generate_private());
    let slow: Vec<Client> = (0..4)
        .map(|_| {
            let c = Client::connect(&relay, Key::generate_private());
            crate::sockopt::set_buffer(&c.stream, libc::SO_RCVBUF, 16 * 1024);
            c
        })
        .collect();
    let slow_keys: Vec<Key> = slow.iter().map(Client::public).collect();
    let mut flood = Client::connect(&relay, Key::generate_private());
    let stop = Arc::new(AtomicBool::new(false));
    let stop_flood = stop.clone();
    let flooder = std::thread::spawn(move || {
        let payload = vec![7u8; 16 * 1024];
        let mut sent = 0u64;
        // Paced at about 2 MiB/s over the four: enough to fill their socket
        // buffers and queues in a few seconds (once full, any rate keeps them
        // full), while leaving the shared CPU to the relay; bounded at 1 GiB.
        while !stop_flood.load(Ordering::SeqCst) && sent < 1 << 30 {
            for k in &slow_keys {
                flood.send_to(*k, &payload);
                sent += payload.len() as u64;
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        sent
    });
    // Four full queues would be 512 KiB: the budget (384 KiB) runs out first.
    relay.wait_stats("the budget to refuse datagrams", |s| s.dropped_budget > 50);

    let mut worst = Duration::ZERO;
    for i in 0..30u32 {
        let t = Instant::now();
        let payload = [&i.to_be_bytes()[..], &[1u8; 1200]].concat();
        a.send_to(b.public(), &payload);
        assert_eq!(b.recv().unwrap(), recv_from(a.public(), &payload));
        b.send_to(a.public(), &payload);
        assert_eq!(a.recv().unwrap(), recv_from(b.public(), &payload));
        worst = worst.max(t.elapsed());
        log!("round trip {i}: {:?}", t.elapsed());
        let s = relay.handle.stats();
        assert!(s.max_total_queued_bytes <= budget, "{s:?}");
    }
    let during = relay.handle.stats();
    stop.store(true, Ordering::SeqCst);
    let flooded = flooder.join().unwrap();
    log!(
        "budget: flooded {} MiB, max total queued {} of {budget}, now {}, max one client {}, \
         dropped (budget {}, own queue {}), fast pair worst round trip {worst:?}",
        flooded >> 20,
        during.max_total_queued_bytes,
        during.total_queued_bytes,
        during.max_queued_bytes,
        during.dropped_budget,
        during.dropped_queue_full
    );
    assert!(during.max_total_queued_bytes <= budget, "{during:?}");
    assert!(during.max_queued_bytes <= limits.queue_bytes, "{during:?}");
    assert!(during.dropped_budget > 50, "{during:?}");
    // Nearly the whole budget was in use: the bound was what held, not a lull.
    assert!(during.max_total_queued_bytes > budget / 2, "{during:?}");
    assert!(worst < Duration::from_secs(5), "worst round trip {worst:?}");
    // Closing the slow readers gives their bytes back.
    drop(slow);
    relay.wait_stats("queues released", |s| s.total_queued_bytes < limits.queue_bytes);
}

#[test]
fn a_queue_budget_below_two_client_queues_is_refused() {
    let cfg = RelayConfig::new("127.0.0.1:0".parse().unwrap(), Key::generate_private());
    let guards = RelayGuards {
        total_queue_bytes: cfg.limits.queue_bytes,
        ..RelayGuards::for_relay(cfg.max_clients)
    };
    let err = RelayServer::bind_guarded(cfg, guards).err().expect("refused");
    assert!(err.to_string().contains("twice"), "{err}");
}

/// More connections waiting than the relay accepts in one loop turn: it comes
/// back for the rest by itself (the listener's readiness edge fired only once).
#[test]
fn a_burst_of_connections_beyond_one_accept_turn_is_all_accepted() {
    let guards = RelayGuards {
        per_source: SourceLimits::unlimited(),
        ..RelayGuards::for_relay(400)
    };
    let cfg = RelayConfig {
        max_clients: 400,
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), Key::generate_private())
    };
    let server = RelayServer::bind_guarded(cfg, guards).unwrap();
    // The kernel completes these into the listen queue before the relay runs
    // (120: more than one accept turn, fewer than the 128 of the smallest
    // listen queue a kernel gives).
    let addr = server.local_addr().unwrap();
    let held: Vec<TcpStream> = (0..120).map(|_| TcpStream::connect(addr).unwrap()).collect();
    let relay = Relay::from_server(server);
    relay.wait_stats("all 120 accepted", |s| s.clients == held.len());
}

/// Per-source limits that never bind, for tests of the relay-wide pools.
fn no_source_limits(pool: usize, max_clients: usize) -> RelayGuards {
    RelayGuards {
        max_pending: pool,
        per_source: SourceLimits::unlimited(),
        ..RelayGuards::for_relay(max_clients)
    }
}

/// Holds `n` connections from `local` that never send a byte.
fn hold_silent(relay: &Relay, local: Ipv4Addr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| connect_from(local, relay.addr).unwrap()).collect()
}

/// Strangers keep far more connections in their handshake than there are
/// client slots: they wait in their own pool (the oldest pushed out), and a
/// new client still registers into a free slot and gets its traffic.
#[test]
fn pending_handshakes_never_take_registered_slots() {
    let relay = Relay::start_guarded(Limits::default(), 3, no_source_limits(8, 3));
    let mut a = Client::connect(&relay, Key::generate_private());
    let _b = Client::connect(&relay, Key::generate_private());
    relay.wait_stats("two registered", |s| s.registered == 2);
    let held: Vec<TcpStream> = (10..15)
        .flat_map(|i| hold_silent(&relay, Ipv4Addr::new(127, 0, 0, i), 8))
        .collect();
    let s = relay.wait_stats("the strangers' 40 connections taken in", |s| {
        s.evicted_pending + s.pending as u64 == 40
    });
    assert_eq!((s.pending, s.evicted_pending), (8, 32), "{s:?}");

    let mut c = Client::connect_from(&relay, Ipv4Addr::new(127, 0, 0, 2), Key::generate_private());
    a.send_to(c.public(), b"through");
    assert_eq!(c.recv().unwrap(), recv_from(a.public(), b"through"));
    let s = relay.wait_stats("three registered", |s| s.registered == 3);
    assert_eq!(s.rejected_full, 0, "{s:?}");
    assert!(s.pending <= 8, "{s:?}");

    // Every slot is taken by a registered client: the next one is refused at once.
    let mut d = connect_from(Ipv4Addr::new(127, 0, 0, 3), relay.addr).unwrap();
    d.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(d.read(&mut [0u8; 16]).unwrap_or(0), 0, "closed when full");
    relay.wait_stats("refused as full", |s| s.rejected_full == 1 && s.registered == 3);
    drop(held);
}

/// Being pushed out of the pending pool costs the source a token, as a
/// refusal does: a source that keeps the pool full runs out of its rate.
#[test]
fn eviction_from_the_pending_pool_costs_the_source_its_rate() {
    let guards = RelayGuards {
        max_pending: 10,
        per_source: SourceLimits {
            connects_per_sec: 1,
            connect_burst: 30,
            max_pending: 0,
            max_clients: 0,
        },
        ..RelayGuards::for_relay(10)
    };
    let relay = Relay::start_guarded(Limits::default(), 10, guards);
    let flooder = Ipv4Addr::new(127, 0, 0, 20);
    let mut held = hold_silent(&relay, flooder, 10);
    relay.wait_stats("the flooder fills the pool", |s| s.pending == 10);
    // Another source pushes out all ten: ten tokens the flooder pays.
    held.extend(hold_silent(&relay, Ipv4Addr::new(127, 0, 0, 21), 10));
    relay.wait_stats("the flooder's ten pushed out", |s| s.evicted_pending == 10);
    // 30 - 10 - 10 = 10 tokens left (plus one a second): of 20 more attempts
    // about half are refused by the rate. Without the charge all 20 get in.
    held.extend(hold_silent(&relay, flooder, 20));
    let s = relay.wait_stats("the 20 attempts taken in", |s| {
        s.refused_rate + s.evicted_pending == 10 + 20
    });
    assert!(s.refused_rate >= 8, "eviction cost the flooder nothing: {s:?}");
}

/// "Relay full" costs the refused source a token: once a slot frees, a source
/// that kept knocking at the full relay has spent its rate.
#[test]
fn relay_full_refusals_cost_the_source_its_rate() {
    let guards = RelayGuards {
        per_source: SourceLimits {
            connects_per_sec: 1,
            connect_burst: 30,
            max_pending: 0,
            max_clients: 0,
        },
        ..RelayGuards::for_relay(1)
    };
    let relay = Relay::start_guarded(Limits::default(), 1, guards);
    let only = Client::connect_from(&relay, Ipv4Addr::new(127, 0, 0, 22), Key::generate_private());
    relay.wait_stats("the one slot taken", |s| s.registered == 1);
    let knocker = Ipv4Addr::new(127, 0, 0, 23);
    let held = hold_silent(&relay, knocker, 30);
    relay.wait_stats("30 refused as full", |s| s.rejected_full == 30);
    drop(only);
    relay.wait_stats("the slot freed", |s| s.registered == 0);
    let held2 = hold_silent(&relay, knocker, 10);
    let s = relay.wait_stats("10 more attempts taken in", |s| {
        s.refused_rate + s.pending as u64 == 10
    });
    assert!(s.refused_rate >= 8, "refusals cost the source nothing: {s:?}");
    drop((held, held2));
}

/// A key the relay was told to refuse (the coordinator removed its node):
/// its connection is closed at once, those who talk to it hear it is gone,
/// and a new connection with it is refused.
#[test]
fn a_refused_key_is_closed_at_once_and_cannot_register_again() {
    let relay = Relay::start(Limits::default());
    let a_key = Key::generate_private();
    let mut a = Client::connect(&relay, a_key);
    let mut b = Client::connect(&relay, Key::generate_private());
    b.send_to(a.public(), b"hi");
    assert_eq!(a.recv().unwrap(), recv_from(b.public(), b"hi"));

    relay.handle.refuse_key(a.public());
    assert!(a.closed_by_relay(), "the removed key's connection is closed");
    assert_eq!(b.recv().unwrap(), RelayFrame::PeerGone { key: a.public() });

    let mut again = Client::connect(&relay, a_key);
    assert!(
        again.closed_by_relay(),
        "a new connection with the removed key is closed"
    );
    b.send_to(a_key.public_key(), b"anyone?");
    let s = relay.wait_stats("both refusals counted", |s| {
        s.refused_removed == 2 && s.dropped_no_peer == 1
    });
    assert_eq!((s.registered, s.forwarded), (1, 1), "{s:?}");
}

/// A separate relay's member set from the coordinator's feed: before any set
/// every key registers; a set closes registered keys outside it and refuses
/// them from then on; a delta adds and removes keys.
#[test]
fn the_member_set_gates_registration_and_closes_keys_that_leave_it() {
    use super::members::MemberUpdate;
    let relay = Relay::start(Limits::default());
    let (a_key, b_key) = (Key::generate_private(), Key::generate_private());
    let mut a = Client::connect(&relay, a_key);
    let mut b = Client::connect(&relay, b_key);
    relay.wait_stats("both registered with no set known", |s| s.registered == 2);

    relay
        .handle
        .update_members(MemberUpdate::Full(vec![b_key.public_key()]));
    assert!(a.closed_by_relay(), "a key outside the first set is closed");
    assert!(
        Client::connect(&relay, a_key).closed_by_relay(),
        "and cannot register again"
    );
    assert!(
        Client::connect(&relay, Key::generate_private()).closed_by_relay(),
        "nor can a key that was never a member"
    );
    b.send_to(b.public(), b"self");
    assert_eq!(
        b.recv().unwrap(),
        recv_from(b.public(), b"self"),
        "a member is served"
    );

    relay.handle.update_members(MemberUpdate::Delta {
        added: vec![a_key.public_key()],
        removed: vec![b_key.public_key()],
    });
    assert!(b.closed_by_relay(), "a removed member is closed");
    let mut a = Client::connect(&relay, a_key);
    a.send_to(a.public(), b"back");
    assert_eq!(
        a.recv().unwrap(),
        recv_from(a.public(), b"back"),
        "an added member registers"
    );
    // The counters are published after the turn's writes: wait for both.
    relay.wait_stats("every refusal counted and the added member registered", |s| {
        s.refused_removed == 4 && s.registered == 1
    });
}

/// A coordinator and a relay wired as `warren server` wires its embedded
/// relay: every removed node's key is handed to the relay.
struct Mesh {
    coord_addr: SocketAddr,
    admin: std::path::PathBuf,
    stopper: crate::coord::server::Stopper,
    thread: Option<JoinHandle<()>>,
    relay: Relay,
}

impl Mesh {
    fn start(state: &std::path::Path) -> Mesh {
        use crate::coord::server::{Server, ServerConfig};
        let cfg = ServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: state.to_path_buf(),
            db: state.join("server.db"),
            advertise: vec![],
        };
        let mut server = Server::bind(&cfg).unwrap();
        let relay = Relay::start(Limits::default());
        let handle = relay.handle.clone();
        server.set_on_removed(move |k| handle.refuse_key(k)).unwrap();
        let (coord_addr, stopper) = (server.local_addr(), server.stopper());
        let thread = std::thread::spawn(move || server.run().unwrap());
        Mesh {
            coord_addr,
            admin: cfg.admin_socket(),
            stopper,
            thread: Some(thread),
            relay,
        }
    }

    fn admin(&self, req: crate::coord::admin::AdminRequest) -> crate::coord::admin::AdminResponse {
        crate::coord::admin::request(&self.admin, &req).unwrap()
    }

    /// Joins a node with `key` through a fresh invite, as `warren up --join` does.
    fn join(&self, key: &Key, name: &str) {
        use crate::control::messages::{self, ClientMessage, PROTOCOL_VERSION, ServerMessage};
        use crate::coord::admin::{AdminRequest, AdminResponse};
        let AdminResponse::Invite { token, .. } = self.admin(AdminRequest::Invite {
            reusable: false,
            expires_in: None,
            name: None,
        }) else {
            panic!("no invite");
        };
        let token = crate::coord::invite::JoinToken::parse(&token).unwrap();
        let mut stream = TcpStream::connect(self.coord_addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut ch = Channel::client(key, &token.server_key).unwrap();
        ch.send(&messages::encode(&ClientMessage::Join {
            version: PROTOCOL_VERSION,
            secret: token.secret,
            name: Some(name.into()),
            hostname: name.into(),
            candidates: vec![],
            online_by_id: false,
            advertise: Default::default(),
            policy: false,
        }))
        .unwrap();
        let mut buf = [0u8; 65536];
        loop {
            stream.write_all(ch.outgoing()).unwrap();
            let n = ch.outgoing().len();
            ch.consume_outgoing(n);
            while let Some(m) = ch.next_message() {
                if let Ok(ServerMessage::Welcome { .. }) = messages::decode_server(&m) {
                    return;
                }
            }
            let n = stream.read(&mut buf).expect("welcome from the coordinator");
            assert!(n > 0, "coordinator closed before welcoming {name}");
            ch.receive(&buf[..n]).unwrap();
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `warren server remove`: the removed node's relay connection is closed at
/// once and a new one refused, also by a relay started after the removal
/// (a restarted server hands it the keys removed before).
#[test]
fn a_node_removed_by_the_coordinator_loses_the_relay_at_once() {
    use crate::coord::admin::AdminRequest;
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "warren-relay-removal-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let mesh = Mesh::start(&dir);
    let (c_key, d_key) = (Key::generate_private(), Key::generate_private());
    mesh.join(&c_key, "node-c");
    mesh.join(&d_key, "node-d");
    let mut c = Client::connect(&mesh.relay, c_key);
    let mut d = Client::connect(&mesh.relay, d_key);
    d.send_to(c.public(), b"still a member");
    assert_eq!(c.recv().unwrap(), recv_from(d.public(), b"still a member"));

    mesh.admin(AdminRequest::Remove {
        node: "node-c".into(),
    });
    assert!(
        c.closed_by_relay(),
        "the removed node's relay connection is closed"
    );
    assert_eq!(d.recv().unwrap(), RelayFrame::PeerGone { key: c.public() });
    let mut again = Client::connect(&mesh.relay, c_key);
    assert!(
        again.closed_by_relay(),
        "a new relay connection with the removed key is refused"
    );
    let s = mesh.relay.wait_stats("both refusals", |s| s.refused_removed == 2);
    assert_eq!(s.registered, 1, "{s:?}");

    // Server and relay restarted: the key removed before is refused from the start.
    drop((d, mesh));
    let mesh = Mesh::start(&dir);
    let mut after = Client::connect(&mesh.relay, c_key);
    assert!(
        after.closed_by_relay(),
        "a relay started later refuses the removed key too"
    );
    let d = Client::connect(&mesh.relay, d_key);
    mesh.relay
        .wait_stats("the member registered, the removed one refused", |s| {
            s.registered == 1 && s.refused_removed == 1
        });
    drop((d, mesh));
    let _ = std::fs::remove_dir_all(&dir);
}

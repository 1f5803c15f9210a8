//! The real relay server on loopback, driven by in-process clients that speak
//! the protocol over blocking sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::RELAY_PROFILE;
use super::client::{Event, RelayClient};
use super::client_conn::Limits;
use super::frame::RelayFrame;
use super::server::{RelayConfig, RelayHandle, RelayServer, RelayStats};
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
}

impl Client {
    fn connect(relay: &Relay, key: Key) -> Client {
        Client::connect_with(relay, key, &RELAY_PROFILE)
    }

    fn connect_with(relay: &Relay, key: Key, profile: &Profile) -> Client {
        let stream = TcpStream::connect(relay.addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        stream.set_nodelay(true).unwrap();
        let mut ch = Channel::client_with(profile, &key, &relay.public).unwrap();
        // Registration happens on the first sealed message.
        ch.send(&RelayFrame::KeepAlive.encode().unwrap()).unwrap();
        let mut c = Client { stream, ch, key };
        c.flush();
        let end = Instant::now() + DEADLINE;
        while !c.ch.is_open() {
            assert!(Instant::now() < end, "handshake did not finish");
            c.read_some().unwrap();
        }
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

    // Mallory replays A's captured first handshake message on a new connection:
    // the relay answers, but she cannot finish the handshake, so A stays registered.
    let (_, first) = crate::control::noise::initiate_with(&RELAY_PROFILE, &a_key, &relay.public).unwrap();
    let mut wire = Vec::new();
    crate::control::frame::encode(crate::control::frame::FrameKind::Handshake, &first, &mut wire);
    let mut replay = TcpStream::connect(relay.addr).unwrap();
    replay.write_all(&wire).unwrap();
    replay.write_all(&wire[..10]).unwrap();
    // A pinned relay key Mallory does not hold cannot answer A either (no relay impersonation).
    assert!(crate::control::noise::respond_with(&RELAY_PROFILE, &Key::generate_private(), &first).is_err());

    b.send_to(a.public(), b"for a only");
    assert_eq!(a.recv().unwrap(), recv_from(b.public(), b"for a only"));
    let s = relay.handle.stats();
    assert_eq!(s.replaced, 0, "{s:?}");
    drop(replay);
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
    super::server::set_buffer(&slow.stream, libc::SO_RCVBUF, 16 * 1024);
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
    eprintln!(
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

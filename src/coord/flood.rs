//! Hostile load for the coordinator (hidden `warren server flood`, the
//! flood tests and `integration/bench-coord-flood`): what a stranger who saw
//! one join token can do. Each connection comes from one of `sources`
//! loopback addresses (127.1.x.y) and, except for garbage, completes the
//! Noise handshake with a made-up key, then never says Hello or Join:
//!
//! - `fragments`: sends validly sealed "more fragments follow" frames, 64 KiB
//!   every 500 ms (under a per-connection input rate limit of 128 KiB/s), for
//!   as long as the coordinator reads;
//! - `big-frame`: announces a 64 KiB frame and sends all of it but the end;
//! - `hold`: sends all but the last byte of the largest opening allowed;
//! - `mix`: the three above in turn;
//! - `garbage`: connects, writes a few random bytes and resets, as fast as
//!   it can (no handshake);
//! - `hello`: the exception to "never says Hello": a proper Hello under the
//!   made-up key, which the coordinator refuses (unknown key) and closes.
//!
//! A connection the coordinator closes is opened again at once, until the time is up.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::inbound::MAX_BYTES_BEFORE_AUTH;
use crate::control::frame::{self, FrameDecoder, FrameKind, HEADER_LEN, MAX_FRAME_LEN, MAX_PAYLOAD_LEN};
use crate::control::messages::{self, ClientMessage, PROTOCOL_VERSION};
use crate::control::noise::{self, Initiating, Session};
use crate::keys::Key;

/// ChaChaPoly's tag: a fragment of this much plaintext fills one frame.
const FRAGMENT_PLAINTEXT: usize = MAX_PAYLOAD_LEN - 16;
const FRAGMENT_EVERY: Duration = Duration::from_millis(500);
/// Kernel send buffer per hostile socket: what is not taken is not sealed.
const SEND_BUFFER: libc::c_int = 64 * 1024;
/// Connections dialled but not yet answered, so the coordinator's listen
/// backlog does not overflow (dropped SYNs would only slow the flood down).
const MAX_OPENING: usize = 256;
/// Where the flood's source addresses start: 127.1.0.1, 127.1.0.2, ...
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 1, 0, 1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Fragments,
    BigFrame,
    Hold,
    Mix,
    Garbage,
    Hello,
}

impl std::str::FromStr for Mode {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Mode> {
        Ok(match s {
            "fragments" => Mode::Fragments,
            "big-frame" => Mode::BigFrame,
            "hold" => Mode::Hold,
            "mix" => Mode::Mix,
            "garbage" => Mode::Garbage,
            "hello" => Mode::Hello,
            _ => bail!("flood mode {s:?}: expected fragments, big-frame, hold, mix, garbage or hello"),
        })
    }
}

#[derive(Clone, Debug)]
pub struct FloodConfig {
    pub server: SocketAddr,
    pub server_key: Key,
    pub mode: Mode,
    /// Connections kept open at once (ignored for garbage).
    pub connections: usize,
    pub sources: usize,
    pub duration: Duration,
}

/// Counters, shared so a test can watch them while the flood runs.
#[derive(Debug, Default)]
pub struct FloodStats {
    /// Connections attempted.
    pub attempts: AtomicU64,
    /// Garbage connections that were established (and then sent garbage).
    pub connected: AtomicU64,
    /// Noise handshakes the coordinator answered.
    pub handshakes: AtomicU64,
    /// Connections the coordinator closed or reset.
    pub closed: AtomicU64,
    /// Most connections open at once.
    pub peak_open: AtomicU64,
    pub bytes_sent: AtomicU64,
}

impl FloodStats {
    pub fn line(&self) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "attempts={} connected={} handshakes={} closed={} peak_open={} sent_mib={}",
            g(&self.attempts),
            g(&self.connected),
            g(&self.handshakes),
            g(&self.closed),
            g(&self.peak_open),
            g(&self.bytes_sent) >> 20
        )
    }
}

pub fn source(i: usize, sources: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_SOURCE) + (i % sources.max(1)) as u32)
}

/// A TCP socket bound to `from` and connecting to `to`; non-blocking or not.
pub(crate) fn dial(
    from: Ipv4Addr,
    to: SocketAddr,
    nonblocking: bool,
) -> std::io::Result<std::net::TcpStream> {
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("the flood dials IPv4 only"));
    };
    let sa = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket calls on a descriptor owned by `fd` from creation on,
    // with pointers to live sockaddr_in values of the stated size.
    unsafe {
        let raw = libc::socket(libc::AF_INET, flags, 0);
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(raw);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let local = sa(SocketAddrV4::new(from, 0));
        if libc::bind(raw, &local as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let remote = sa(to);
        if libc::connect(raw, &remote as *const _ as *const libc::sockaddr, len) != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        // Reset on close: no TIME_WAIT per connection on the flooding side, so
        // its ports do not run out.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
        Ok(std::net::TcpStream::from_raw_fd(fd.into_raw_fd()))
    }
}

enum Stage {
    Handshaking(Box<Initiating>),
    Open(Box<Session>),
    /// Everything this mode sends is sent; only waiting to be closed.
    Holding,
}

struct Hostile {
    stream: TcpStream,
    mode: Mode,
    stage: Stage,
    decoder: FrameDecoder,
    out: Vec<u8>,
    next_fragment: Instant,
}

pub fn run(cfg: &FloodConfig, stats: &Arc<FloodStats>) -> Result<()> {
    super::load::raise_fd_limit();
    if cfg.mode == Mode::Garbage {
        return garbage(cfg, stats);
    }
    let mut poll = Poll::new().context("creating the flood's poll")?;
    let mut events = Events::with_capacity(1024);
    let mut conns: HashMap<usize, Hostile> = HashMap::new();
    let mut next = 0usize;
    let end = Instant::now() + cfg.duration;
    let mut buf = vec![0u8; 64 * 1024];
    let plaintext = vec![0x55u8; FRAGMENT_PLAINTEXT];
    while Instant::now() < end {
        let mut in_flight = opening(&conns);
        while conns.len() < cfg.connections && in_flight < MAX_OPENING {
            in_flight += 1;
            let slot = next;
            next += 1;
            stats.attempts.fetch_add(1, Ordering::Relaxed);
            let std = match dial(source(slot, cfg.sources), cfg.server, true) {
                Ok(s) => s,
                Err(_) => {
                    stats.closed.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
            crate::sockopt::set_buffer(&std, libc::SO_SNDBUF, SEND_BUFFER);
            let mut stream = TcpStream::from_std(std);
            poll.registry()
                .register(&mut stream, Token(slot), Interest::READABLE | Interest::WRITABLE)?;
            let (init, first) = noise::initiate(&Key::generate_private(), &cfg.server_key)?;
            let mut out = Vec::new();
            frame::encode(FrameKind::Handshake, &first, &mut out);
            let mode = match (cfg.mode, slot % 3) {
                (Mode::Mix, 0) => Mode::Fragments,
                (Mode::Mix, 1) => Mode::BigFrame,
                (Mode::Mix, _) => Mode::Hold,
                (m, _) => m,
            };
            conns.insert(
                slot,
                Hostile {
                    stream,
                    mode,
                    stage: Stage::Handshaking(Box::new(init)),
                    decoder: FrameDecoder::new(),
                    out,
                    next_fragment: Instant::now(),
                },
            );
            stats.peak_open.fetch_max(conns.len() as u64, Ordering::Relaxed);
        }
        poll.poll(&mut events, Some(Duration::from_millis(50)))?;
        let mut gone = Vec::new();
        for ev in events.iter() {
            let slot = ev.token().0;
            let Some(h) = conns.get_mut(&slot) else {
                continue;
            };
            if step(h, &mut buf, &plaintext, stats).is_err() {
                gone.push(slot);
            }
        }
        // Fragment senders also write when nothing woke them: keep pushing.
        let now = Instant::now();
        for (&slot, h) in conns.iter_mut() {
            let due = matches!(h.stage, Stage::Open(_)) && now >= h.next_fragment;
            if due && step(h, &mut buf, &plaintext, stats).is_err() {
                gone.push(slot);
            }
        }
        for slot in gone {
            if let Some(mut h) = conns.remove(&slot) {
                let _ = poll.registry().deregister(&mut h.stream);
                stats.closed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

fn opening(conns: &HashMap<usize, Hostile>) -> usize {
    conns
        .values()
        .filter(|h| matches!(h.stage, Stage::Handshaking(_)))
        .count()
}

/// Reads and writes what a hostile connection can; an error means it is closed.
fn step(h: &mut Hostile, buf: &mut [u8], plaintext: &[u8], stats: &FloodStats) -> std::io::Result<()> {
    let mut eof = false;
    loop {
        match h.stream.read(buf) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => h.decoder.push(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::NotConnected => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    if let Stage::Handshaking(_) = h.stage
        && let Ok(Some(f)) = h.decoder.next_frame()
    {
        let Stage::Handshaking(init) = std::mem::replace(&mut h.stage, Stage::Holding) else {
            unreachable!()
        };
        let session = init
            .complete(&f.payload)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        stats.handshakes.fetch_add(1, Ordering::Relaxed);
        if eof {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        h.stage = match h.mode {
            Mode::Fragments => Stage::Open(Box::new(session)),
            Mode::Hello => {
                let mut session = session;
                let hello = messages::encode(&ClientMessage::Hello {
                    version: PROTOCOL_VERSION,
                    hostname: "stranger".into(),
                    candidates: vec![],
                    online_by_id: false,
                    advertise: Default::default(),
                    policy: false,
                });
                session
                    .seal(&hello, &mut h.out)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                Stage::Holding
            }
            Mode::BigFrame => {
                let len = MAX_FRAME_LEN as u32;
                h.out.extend_from_slice(&len.to_be_bytes());
                h.out
                    .extend_from_slice(&[frame::FRAME_VERSION, FrameKind::Sealed as u8]);
                h.out.resize(h.out.len() + MAX_FRAME_LEN - 2 - 100, 0xaa);
                Stage::Holding
            }
            _ => {
                // The largest opening the coordinator accepts, all but its last byte.
                let handshake_frame = HEADER_LEN + 96;
                let len = (MAX_BYTES_BEFORE_AUTH - handshake_frame - 4) as u32;
                h.out.extend_from_slice(&len.to_be_bytes());
                h.out
                    .extend_from_slice(&[frame::FRAME_VERSION, FrameKind::Sealed as u8]);
                h.out.resize(h.out.len() + len as usize - 2 - 1, 0xaa);
                Stage::Holding
            }
        };
    }
    if eof {
        return Err(ErrorKind::UnexpectedEof.into());
    }
    loop {
        if let Stage::Open(session) = &mut h.stage
            && h.out.is_empty()
            && Instant::now() >= h.next_fragment
        {
            h.next_fragment = Instant::now() + FRAGMENT_EVERY;
            // A validly sealed fragment, marked "more follow": the kind is outside the seal.
            session
                .seal(plaintext, &mut h.out)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            h.out[5] = FrameKind::SealedMore as u8;
        }
        if h.out.is_empty() {
            return Ok(());
        }
        while !h.out.is_empty() {
            match h.stream.write(&h.out) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    h.out.drain(..n);
                    stats.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Connect, write garbage, reset; from two threads, until the time is up.
fn garbage(cfg: &FloodConfig, stats: &Arc<FloodStats>) -> Result<()> {
    let end = Instant::now() + cfg.duration;
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let (cfg, stats) = (cfg.clone(), stats.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 + t as u64;
                let mut next = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                let mut i = t;
                while Instant::now() < end {
                    stats.attempts.fetch_add(1, Ordering::Relaxed);
                    match dial(source(i, cfg.sources), cfg.server, false) {
                        Ok(mut s) => {
                            stats.connected.fetch_add(1, Ordering::Relaxed);
                            let junk: Vec<u8> = (0..64).map(|_| next() as u8).collect();
                            if s.write_all(&junk).is_ok() {
                                stats.bytes_sent.fetch_add(64, Ordering::Relaxed);
                            }
                        }
                        Err(_) => {
                            stats.closed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 2;
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

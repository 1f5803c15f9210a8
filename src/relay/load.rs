//! Load generator for the relay benchmark (`warren relay-load`, hidden):
//! many idle registered clients, and one pair forwarding as fast as it can.
//! Clients are blocking sockets driving the same Noise channel as real ones.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::RELAY_PROFILE;
use super::frame::RelayFrame;
use crate::control::channel::Channel;
use crate::keys::Key;

/// A TCP connection from `local` (port chosen by the kernel) to `to`; std
/// cannot bind before connecting.
pub fn connect_from(local: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use std::net::SocketAddrV4;
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = to else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sockaddr = |a: SocketAddrV4| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*a.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a fresh descriptor that the TcpStream takes over (and closes)
    // at once; bind and connect get pointers to live sockaddr_in values of
    // the stated length.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = TcpStream::from_raw_fd(fd);
        // Bounds a connect whose SYN the server's full listen queue drops.
        stream.set_write_timeout(Some(CONNECT_FROM_TIMEOUT))?;
        let from = sockaddr(SocketAddrV4::new(local, 0));
        if libc::bind(
            fd,
            &from as *const libc::sockaddr_in as *const libc::sockaddr,
            len,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        let to = sockaddr(to);
        if libc::connect(fd, &to as *const libc::sockaddr_in as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        stream.set_write_timeout(None)?;
        Ok(stream)
    }
}

/// A connect from [`connect_from`] fails after this (SO_SNDTIMEO bounds connect on Linux).
const CONNECT_FROM_TIMEOUT: Duration = Duration::from_secs(5);

/// A registered client on a blocking socket.
pub struct LoadClient {
    stream: TcpStream,
    ch: Channel,
    pub key: Key,
}

impl LoadClient {
    pub fn connect(relay: SocketAddr, relay_key: &Key) -> Result<LoadClient> {
        LoadClient::connect_as(relay, relay_key, Key::generate_private())
    }

    /// The same with a given private key (a node's, to see what the relay makes of it).
    pub fn connect_as(relay: SocketAddr, relay_key: &Key, key: Key) -> Result<LoadClient> {
        let stream = TcpStream::connect(relay).with_context(|| format!("connecting to relay {relay}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let mut ch = Channel::client_with(&RELAY_PROFILE, &key, relay_key)?;
        ch.send(&RelayFrame::KeepAlive.encode().expect("keepalive"))?;
        let mut c = LoadClient { stream, ch, key };
        c.flush()?;
        let mut buf = [0u8; 512];
        while !c.ch.is_open() {
            let n = c.stream.read(&mut buf).context("relay handshake")?;
            if n == 0 {
                bail!("relay closed the connection during the handshake");
            }
            c.ch.receive(&buf[..n])?;
        }
        c.flush()?;
        Ok(c)
    }

    fn flush(&mut self) -> Result<()> {
        self.stream
            .write_all(self.ch.outgoing())
            .context("writing to relay")?;
        let n = self.ch.outgoing().len();
        self.ch.consume_outgoing(n);
        Ok(())
    }
}

/// Connects `n` idle clients and returns them (they stay registered while held).
pub fn idle(relay: SocketAddr, relay_key: &Key, n: usize) -> Result<Vec<LoadClient>> {
    crate::rlimit::raise_fd_limit();
    (0..n)
        .map(|i| LoadClient::connect(relay, relay_key).with_context(|| format!("idle client {i}")))
        .collect()
}

#[derive(Debug)]
pub struct ForwardReport {
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
}

/// One client sends `payload_len`-byte datagrams to another for `seconds`;
/// counts what arrives. The receiver reads on its own thread.
pub fn forward(
    relay: SocketAddr,
    relay_key: &Key,
    payload_len: usize,
    seconds: f64,
) -> Result<ForwardReport> {
    let mut sender = LoadClient::connect(relay, relay_key)?;
    let mut receiver = LoadClient::connect(relay, relay_key)?;
    let to = receiver.key.public_key();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (rx_count, rx_stop) = (received.clone(), stop.clone());
    receiver
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)))?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while !rx_stop.load(Ordering::Relaxed) {
            let n = match receiver.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(_) => continue,
            };
            if receiver.ch.receive(&buf[..n]).is_err() {
                return;
            }
            while let Some(m) = receiver.ch.next_message() {
                if matches!(RelayFrame::decode(&m), Ok(RelayFrame::RecvFrom { .. })) {
                    rx_count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let frame = RelayFrame::SendTo {
        key: to,
        payload: vec![0x5a; payload_len],
    }
    .encode()?;
    let start = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while start.elapsed() < duration {
        // Batches of 32 per write: the sender is not what is being measured.
        for _ in 0..32 {
            sender.ch.send(&frame)?;
        }
        sender.flush()?;
        sent += 32;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let at_end = received.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    Ok(ForwardReport {
        sent,
        received: at_end,
        seconds: elapsed,
    })
}

impl LoadClient {
    /// Next relay frame other than a keepalive, or None when the read times out.
    fn next_frame(&mut self, buf: &mut [u8]) -> Result<Option<RelayFrame>> {
        loop {
            while let Some(m) = self.ch.next_message() {
                match RelayFrame::decode(&m)? {
                    RelayFrame::KeepAlive => {}
                    f => return Ok(Some(f)),
                }
            }
            let n = match self.stream.read(buf) {
                Ok(0) => bail!("relay closed the connection"),
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None);
                }
                Err(e) => return Err(e).context("reading from relay"),
            };
            self.ch.receive(&buf[..n])?;
        }
    }

    fn send_to(&mut self, to: Key, payload: &[u8]) -> Result<()> {
        let f = RelayFrame::SendTo {
            key: to,
            payload: payload.to_vec(),
        };
        self.ch.send(&f.encode()?)?;
        self.flush()
    }
}

/// Echoes every datagram back to its sender for `seconds`; calls `ready`
/// with its public key once registered. Returns how many it echoed.
pub fn echo(
    relay: SocketAddr,
    relay_key: &Key,
    own: Option<Key>,
    seconds: u64,
    ready: impl FnOnce(Key) -> Result<()>,
) -> Result<u64> {
    let mut c = LoadClient::connect_as(relay, relay_key, own.unwrap_or_else(Key::generate_private))?;
    c.stream.set_read_timeout(Some(Duration::from_millis(500)))?;
    ready(c.key.public_key())?;
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut buf = vec![0u8; 65536];
    let mut echoed = 0;
    while Instant::now() < end {
        if let Some(RelayFrame::RecvFrom { key, payload }) = c.next_frame(&mut buf)? {
            c.send_to(key, &payload)?;
            echoed += 1;
        }
    }
    Ok(echoed)
}

#[derive(Debug)]
pub struct PingReport {
    /// From the first connection attempt to the handshake done and the first sealed message sent.
    pub registered: Duration,
    pub sent: u32,
    pub received: u32,
    pub max_rtt: Duration,
}

/// Sends `count` numbered datagrams to `to`, each awaiting its echo for up to a second.
pub fn ping(relay: SocketAddr, relay_key: &Key, to: Key, count: u32) -> Result<PingReport> {
    let started = Instant::now();
    let mut c = LoadClient::connect(relay, relay_key)?;
    c.stream.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut buf = vec![0u8; 65536];
    let mut report = PingReport {
        registered: started.elapsed(),
        sent: 0,
        received: 0,
        max_rtt: Duration::ZERO,
    };
    for i in 0..count {
        let payload = format!("warren relay ping {i}");
        let t = Instant::now();
        c.send_to(to, payload.as_bytes())?;
        report.sent += 1;
        while t.elapsed() < Duration::from_secs(1) {
            match c.next_frame(&mut buf)? {
                Some(RelayFrame::RecvFrom { key, payload: p }) if key == to && p == payload.as_bytes() => {
                    report.received += 1;
                    report.max_rtt = report.max_rtt.max(t.elapsed());
                    break;
                }
                _ => {}
            }
        }
    }
    Ok(report)
}

/// Connection attempts each flooding source makes between two checks of the
/// connections it holds.
const FLOOD_BURST: usize = 64;

#[derive(Debug, Default)]
pub struct FloodReport {
    /// Connections opened (the relay may have closed them at once).
    pub attempts: u64,
    /// Held connections found closed by the relay and opened again.
    pub reopened: u64,
}

/// A stranger's flood, one thread per source address: each holds `hold`
/// connections that never send a byte (reopening those the relay closes)
/// and in between opens and drops connections as fast as it can, for
/// `seconds`. Dropped ones are reset (linger 0), so the flood does not run
/// out of ports on TIME_WAIT. Calls `holding` once every source has opened
/// its `hold` connections.
pub fn flood(
    relay: SocketAddr,
    sources: &[Ipv4Addr],
    hold: usize,
    seconds: f64,
    holding: impl FnOnce() -> Result<()>,
) -> Result<FloodReport> {
    crate::rlimit::raise_fd_limit();
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let filled = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = sources
        .iter()
        .map(|&src| {
            let filled = filled.clone();
            std::thread::spawn(move || flood_from(relay, src, hold, end, &filled))
        })
        .collect();
    while filled.load(Ordering::Relaxed) < sources.len() as u64 && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(10));
    }
    holding()?;
    let mut report = FloodReport::default();
    for t in threads {
        let r = t
            .join()
            .map_err(|_| anyhow::anyhow!("a flood thread panicked"))??;
        report.attempts += r.attempts;
        report.reopened += r.reopened;
    }
    Ok(report)
}

fn flood_from(
    relay: SocketAddr,
    src: Ipv4Addr,
    hold: usize,
    end: Instant,
    filled: &AtomicU64,
) -> Result<FloodReport> {
    let mut r = FloodReport::default();
    let mut first_round = true;
    let mut held: Vec<Option<TcpStream>> = (0..hold).map(|_| None).collect();
    let mut buf = [0u8; 64];
    while Instant::now() < end {
        for slot in held.iter_mut() {
            let alive = slot.as_mut().is_some_and(|s| match s.read(&mut buf) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::WouldBlock,
            });
            if alive {
                continue;
            }
            if slot.is_some() {
                r.reopened += 1;
            }
            *slot = None;
            r.attempts += 1;
            if let Ok(s) = connect_from(src, relay) {
                s.set_nonblocking(true)?;
                *slot = Some(s);
            }
        }
        if std::mem::take(&mut first_round) {
            filled.fetch_add(1, Ordering::Relaxed);
        }
        for _ in 0..FLOOD_BURST {
            r.attempts += 1;
            if let Ok(s) = connect_from(src, relay) {
                reset_on_close(&s);
            }
        }
    }
    Ok(r)
}

/// Closing sends a reset instead of a FIN: no TIME_WAIT on the flooder's port.
fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a descriptor we own, with a live value of the stated size.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

//! The mio shell around the WG-STUN core and the plain STUN core: owns the
//! two UDP sockets, feeds datagrams in, sends what comes out, sleeps until
//! the core's next timeout. Nothing here decides anything.

use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Events, Interest, Poll, Token};

use super::Config;
use super::metrics::{Snapshot, StatsHandle};
use super::responder::{Responder, ResponderConfig};
use crate::stun::server::StunServer;

const WG: Token = Token(0);
const STUN: Token = Token(1);
/// Datagrams taken from one socket before looking at the other, so a flood
/// on one port cannot starve the other.
const BATCH: usize = 64;
const RECV_BUF: usize = 65_536;

static STATS_REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigusr1(_: libc::c_int) {
    STATS_REQUESTED.store(true, Ordering::Relaxed);
}

pub struct Server {
    poll: Poll,
    wg: UdpSocket,
    stun: Option<UdpSocket>,
    responder: Responder,
    stun_server: StunServer,
    stats_interval: Option<Duration>,
    send_errors: u64,
    /// The counters as of the last loop turn, for the metrics thread.
    shared: StatsHandle,
}

impl Server {
    pub fn bind(config: &Config) -> Result<Server> {
        let poll = Poll::new().context("creating the WG-STUN event loop")?;
        let mut wg = UdpSocket::bind(config.listen)
            .with_context(|| format!("binding the WG-STUN socket to {}", config.listen))?;
        poll.registry()
            .register(&mut wg, WG, Interest::READABLE)
            .context("registering the WG-STUN socket")?;
        let stun = match config.stun_listen {
            Some(addr) => {
                let mut s =
                    UdpSocket::bind(addr).with_context(|| format!("binding the STUN socket to {addr}"))?;
                poll.registry()
                    .register(&mut s, STUN, Interest::READABLE)
                    .context("registering the STUN socket")?;
                Some(s)
            }
            None => None,
        };
        let responder = Responder::new(&ResponderConfig {
            private_key: config.private_key,
            max_sessions: config.max_sessions,
            max_sessions_per_source: config.max_sessions_per_source,
            handshakes_per_sec: config.handshakes_per_sec,
            handshakes_per_source: config.handshakes_per_source,
        });
        Ok(Server {
            poll,
            wg,
            stun,
            responder,
            stun_server: StunServer::new(config.stun_requests_per_source),
            stats_interval: config.stats_interval,
            send_errors: 0,
            shared: StatsHandle::default(),
        })
    }

    pub fn wg_addr(&self) -> Result<SocketAddr> {
        self.wg.local_addr().context("reading the WG-STUN socket address")
    }

    pub fn stun_addr(&self) -> Option<SocketAddr> {
        self.stun.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn stats_handle(&self) -> StatsHandle {
        self.shared.clone()
    }

    fn publish(&self) {
        if let Ok(mut s) = self.shared.0.lock() {
            *s = Snapshot {
                wg: self.responder.stats(),
                stun: self.stun_server.stats(),
                sessions: self.responder.session_count(),
                send_errors: self.send_errors,
            };
        }
    }

    pub fn stats_line(&self) -> String {
        let s = self.stun_server.stats();
        format!(
            "wgstun: {} send_errors={} | stun: answered={} malformed={} bad_fingerprint={} ignored={} rate_limited={}",
            self.responder.stats_line(),
            self.send_errors,
            s.answered,
            s.malformed,
            s.bad_fingerprint,
            s.ignored,
            s.rate_limited
        )
    }

    pub fn run(mut self) -> Result<()> {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            libc::signal(libc::SIGUSR1, on_sigusr1 as *const () as libc::sighandler_t);
        }
        log!(
            "warren wgstun: listening on {} (WireGuard, key {}){}; max {} sessions, {} per source",
            self.wg_addr()?,
            self.responder.public_key().short(),
            self.stun_addr()
                .map(|a| format!(" and {a} (STUN)"))
                .unwrap_or_default(),
            self.responder.session_capacity(),
            self.responder.session_capacity_per_source(),
        );
        let mut events = Events::with_capacity(16);
        let mut buf = vec![0u8; RECV_BUF];
        let mut next_stats = self.stats_interval.map(|d| Instant::now() + d);
        // Sockets that may still hold datagrams. Readiness is edge-triggered, so
        // a socket not drained to WouldBlock stays marked here and the next
        // poll does not sleep; a batch at a time, with the timers between,
        // so a flood that never lets the socket go empty still leaves the
        // housekeeping (budget reset, expiry, stats) running.
        let (mut wg_ready, mut stun_ready) = (false, false);
        loop {
            let now = Instant::now();
            let deadline = [self.responder.poll_timeout(), next_stats]
                .into_iter()
                .flatten()
                .min();
            let timeout = if wg_ready || stun_ready {
                Some(Duration::ZERO)
            } else {
                deadline.map(|d| d.saturating_duration_since(now))
            };
            match self.poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("waiting for WG-STUN sockets"),
            }
            for ev in events.iter() {
                match ev.token() {
                    WG => wg_ready = true,
                    STUN => stun_ready = true,
                    _ => {}
                }
            }
            if wg_ready {
                wg_ready = self.drain_wg(&mut buf)?;
            }
            if stun_ready {
                stun_ready = self.drain_stun(&mut buf)?;
            }
            let now = Instant::now();
            self.responder.handle_timeout(now);
            self.flush_wg();
            let periodic = next_stats.is_some_and(|t| now >= t);
            if periodic {
                next_stats = self.stats_interval.map(|d| now + d);
            }
            if STATS_REQUESTED.swap(false, Ordering::Relaxed) || periodic {
                log!("warren {}", self.stats_line());
            }
            self.publish();
        }
    }

    /// Up to BATCH datagrams; returns whether more may be waiting.
    fn drain_wg(&mut self, buf: &mut [u8]) -> Result<bool> {
        for _ in 0..BATCH {
            match self.wg.recv_from(buf) {
                Ok((n, from)) => {
                    self.responder.handle_input(Instant::now(), from, &buf[..n]);
                    self.flush_wg();
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e).context("receiving on the WG-STUN socket"),
            }
        }
        Ok(true)
    }

    fn drain_stun(&mut self, buf: &mut [u8]) -> Result<bool> {
        let Some(sock) = self.stun.as_ref() else {
            return Ok(false);
        };
        for _ in 0..BATCH {
            match sock.recv_from(buf) {
                Ok((n, from)) => {
                    if let Some(resp) = self.stun_server.handle_input(Instant::now(), from, &buf[..n])
                        && sock.send_to(resp, from).is_err()
                    {
                        self.send_errors += 1;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if transient(&e) => {}
                Err(e) => return Err(e).context("receiving on the STUN socket"),
            }
        }
        Ok(true)
    }

    fn flush_wg(&mut self) {
        while let Some(t) = self.responder.poll_transmit() {
            // UDP: a full send buffer or an unreachable client loses this datagram,
            // as the network could; WireGuard and STUN clients retry.
            if self.wg.send_to(&t.payload, t.dst).is_err() {
                self.send_errors += 1;
            }
            self.responder.recycle(t.payload);
        }
    }
}

/// Errors a UDP socket reports for an earlier datagram (ICMP unreachable etc.), not for itself.
fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}

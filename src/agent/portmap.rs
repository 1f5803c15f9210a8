//! The socket side of port mapping: one UDP socket connected to the default
//! route's router on port 5351 (PCP and NAT-PMP), the UPnP worker thread,
//! and the log lines. The decisions are `portmap::mapper`'s.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::UdpSocket;
use mio::{Interest, Registry, Token, Waker};

use crate::nat::candidate::Candidate;
use crate::portmap::mapper::{Event, Gateway, PortMapper, Status};
use crate::portmap::{pcp, upnp};

pub const SOCKET: Token = Token(6);
/// Datagrams read per readiness: a LAN host spoofing the router costs at most this per turn.
const READ_BUDGET: usize = 64;
/// How long a clean stop waits for the router to take the mappings back.
pub const RELEASE_DEADLINE: Duration = Duration::from_secs(3);
/// PCP and NAT-PMP messages are at most 1100 bytes.
const MAX_MESSAGE: usize = 1100;

pub struct PortMap {
    mapper: PortMapper,
    socket: Option<UdpSocket>,
    worker: Option<upnp::Worker>,
    buf: Vec<u8>,
    /// The last one-line error of the socket, logged once.
    last_error: Option<String>,
}

impl PortMap {
    /// `waker`: the loop's one waker (the resolver's; mio allows one per
    /// poll); the UPnP worker's answers are read whenever it fires.
    pub fn new(
        waker: Arc<Waker>,
        now: Instant,
        enabled: bool,
        wg_port: u16,
        check_port: u16,
        secret: [u8; 32],
    ) -> Result<PortMap> {
        // Without the `upnp` feature there is no client to run: no thread,
        // and every Discover fails at once with `upnp::NOT_BUILT`.
        let worker = if enabled && cfg!(feature = "upnp") {
            Some(upnp::Worker::spawn(waker).context("starting the UPnP worker thread")?)
        } else {
            None
        };
        Ok(PortMap {
            mapper: PortMapper::new(now, enabled, wg_port, check_port, secret),
            socket: None,
            worker,
            buf: vec![0; MAX_MESSAGE + 1],
            last_error: None,
        })
    }

    pub fn owns(t: Token) -> bool {
        t == SOCKET
    }

    /// The default route's router changed (or was read first): connect to it.
    pub fn set_router(&mut self, registry: &Registry, now: Instant, router: Option<Ipv4Addr>) {
        if !self.mapper.status().enabled {
            return;
        }
        let current = self
            .socket
            .as_ref()
            .and_then(|s| s.peer_addr().ok())
            .map(|a| a.ip());
        let gateway = match router {
            Some(r) if current == Some(IpAddr::V4(r)) => return,
            Some(r) => match self.connect(registry, r) {
                Ok(local) => Some(Gateway { router: r, local }),
                Err(e) => {
                    self.error(format!("{e:#}"));
                    None
                }
            },
            None => {
                if let Some(mut s) = self.socket.take() {
                    let _ = registry.deregister(&mut s);
                }
                None
            }
        };
        if let Some(g) = gateway {
            log!(
                "portmap: asking router {} (from {}) for mappings",
                g.router,
                g.local
            );
        }
        self.mapper.set_gateway(now, gateway);
        self.flush(now);
    }

    /// A socket connected to the router's 5351: the kernel drops datagrams
    /// from anyone else, and its local address is what PCP must name.
    fn connect(&mut self, registry: &Registry, router: Ipv4Addr) -> Result<Ipv4Addr> {
        if let Some(mut s) = self.socket.take() {
            let _ = registry.deregister(&mut s);
        }
        let server = SocketAddr::from((router, pcp::SERVER_PORT));
        let mut s = UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
            .context("opening the port-mapping socket")?;
        s.connect(server)
            .with_context(|| format!("connecting the port-mapping socket to {server}"))?;
        let local = match s
            .local_addr()
            .context("reading the port-mapping socket's address")?
        {
            SocketAddr::V4(a) => *a.ip(),
            SocketAddr::V6(a) => anyhow::bail!("port-mapping socket bound to IPv6 {a}"),
        };
        registry
            .register(&mut s, SOCKET, Interest::READABLE)
            .context("registering the port-mapping socket")?;
        self.socket = Some(s);
        Ok(local)
    }

    fn error(&mut self, msg: String) {
        if self.last_error.as_deref() != Some(&msg) {
            log_warn!("portmap: {msg}");
        }
        self.last_error = Some(msg);
    }

    pub fn ready(&mut self, now: Instant) {
        self.read(now);
        self.flush(now);
    }

    /// The loop's waker fired: the UPnP worker may have answered.
    pub fn worker_ready(&mut self, now: Instant) {
        let Some(w) = &self.worker else { return };
        let mut replies = Vec::new();
        while let Some(r) = w.try_recv() {
            replies.push(r);
        }
        for r in replies {
            self.mapper.handle_upnp(now, r);
        }
        self.flush(now);
    }

    fn read(&mut self, now: Instant) {
        let Some(s) = &self.socket else { return };
        let mut answers = Vec::new();
        let mut error = None;
        let mut closed = false;
        for _ in 0..READ_BUDGET {
            match s.recv_from(&mut self.buf) {
                Ok((n, from)) if n <= MAX_MESSAGE => answers.push((from, self.buf[..n].to_vec())),
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // ICMP port unreachable: the router runs no PCP/NAT-PMP server.
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => closed = true,
                Err(e) => {
                    error = Some(format!("reading from the router: {e}"));
                    break;
                }
            }
        }
        if let Some(e) = error {
            self.error(e);
        }
        for (from, bytes) in answers {
            self.mapper.handle_datagram(now, from, &bytes);
        }
        if closed {
            self.mapper.handle_port_closed(now);
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.mapper.poll_timeout().is_some_and(|t| t <= now) {
            self.mapper.handle_timeout(now);
            self.flush(now);
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.mapper.poll_timeout()
    }

    fn flush(&mut self, now: Instant) {
        while let Some((to, bytes)) = self.mapper.poll_transmit() {
            if let Some(s) = &self.socket
                && let Err(e) = s.send(&bytes)
                && e.kind() != ErrorKind::WouldBlock
                && e.kind() != ErrorKind::ConnectionRefused
            {
                self.error(format!("sending to {to}: {e}"));
            }
        }
        while let Some((id, command)) = self.mapper.poll_upnp() {
            let queued = self
                .worker
                .as_ref()
                .is_some_and(|w| w.submit(id, command.clone()));
            if !queued {
                let why = match self.worker {
                    Some(_) => "the UPnP worker is busy or gone",
                    None => upnp::NOT_BUILT,
                };
                let outcome = upnp::Outcome::Failed(why.into());
                self.mapper.handle_upnp(now, upnp::Reply { id, command, outcome });
            }
        }
        while let Some(e) = self.mapper.poll_event() {
            log(&e);
        }
    }

    pub fn candidate(&self) -> Option<Candidate> {
        self.mapper.candidate()
    }

    pub fn status(&self) -> Status {
        self.mapper.status()
    }

    /// A clean stop: give the mappings back, waiting at most `RELEASE_DEADLINE`.
    pub fn release(&mut self) {
        let (datagrams, ports) = self.mapper.release();
        let n = datagrams.len() + ports.len();
        if let Some(s) = &self.socket {
            // Twice: a lost delete leaves a forward open until its lease ends.
            for _ in 0..2 {
                for (_, d) in &datagrams {
                    let _ = s.send(d);
                }
            }
        }
        if let Some(w) = self.worker.take() {
            w.finish(&ports, RELEASE_DEADLINE);
        }
        if n > 0 {
            log!("portmap: gave {n} mappings back to the router");
        }
    }
}

fn log(e: &Event) {
    match e {
        Event::Chosen(p) => log!("portmap: the router speaks {p}"),
        Event::Mapped {
            protocol,
            socket,
            internal,
            external,
            lease,
        } => log!(
            "portmap: mapped {} {internal} -> {external} via {protocol} (lease {} s)",
            socket.as_str(),
            lease.as_secs()
        ),
        Event::Lost { protocol, why } => log_warn!("portmap: lost the {protocol} mappings: {why}"),
        Event::NothingAnswered { retry_in } => log!(
            "portmap: the router answers none of PCP, NAT-PMP and UPnP; asking again in {} s",
            retry_in.as_secs()
        ),
        Event::Refused {
            protocol,
            socket,
            why,
        } => {
            log_warn!("portmap: {protocol} refused the {} port: {why}", socket.as_str())
        }
    }
}

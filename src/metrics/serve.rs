//! The scrape endpoint as a mio source: a listener and a few connections,
//! driven by whoever owns the loop (the agent's own loop, or a thread of
//! its own for the server roles, see [`spawn`]). It never blocks: every
//! socket is non-blocking, each connection has one deadline for its whole
//! exchange, and there are at most [`MAX_CONNECTIONS`] of them; a stranger
//! holding more pushes out its own oldest, never the loop.

use std::io::{ErrorKind, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token};

use super::http::{self, MAX_REQUEST_LEN, Request};

/// Scrapes served at once. Prometheus scrapes one at a time; a few more
/// leave room for curl beside it.
pub const MAX_CONNECTIONS: usize = 8;
/// A connection's whole exchange, request to last byte of the answer: a
/// scrape of a loopback or LAN agent takes milliseconds.
pub const DEADLINE: Duration = Duration::from_secs(5);
/// Renders at most this often: a scrape costs a WireGuard query and the
/// text, so a client asking in a loop gets 10 a second and the loop its
/// time; a request waits for the next turn, and is still answered with
/// figures read after it arrived.
pub const MIN_RENDER_INTERVAL: Duration = Duration::from_millis(100);
/// Connections accepted per call, so a connect flood shares the loop.
const ACCEPTS_PER_TURN: usize = 16;

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Asked for the metrics (true: HEAD) and waits for [`Responder::answer`].
    waiting: Option<bool>,
    opened: Instant,
}

pub struct Responder {
    listener: TcpListener,
    listener_token: Token,
    /// Connections are `Token(base + slot)`.
    base: usize,
    conns: Vec<Option<Conn>>,
    /// The accept budget ran out with connections possibly still queued.
    accept_more: bool,
    last_render: Option<Instant>,
    /// Answers rendered since the start.
    pub renders: u64,
    /// Connections closed to make room for a newer one.
    pub evicted: u64,
    pub timed_out: u64,
}

impl Responder {
    /// Listens on `addr`: the listener is `listener_token`, connections take
    /// the tokens from `base` to `base + MAX_CONNECTIONS`.
    pub fn bind(
        registry: &Registry,
        addr: SocketAddr,
        listener_token: Token,
        base: usize,
    ) -> Result<Responder> {
        let mut listener =
            TcpListener::bind(addr).with_context(|| format!("metrics: listening on {addr}"))?;
        registry
            .register(&mut listener, listener_token, Interest::READABLE)
            .with_context(|| format!("metrics: registering the listener on {addr}"))?;
        Ok(Responder {
            listener,
            listener_token,
            base,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            accept_more: false,
            last_render: None,
            renders: 0,
            evicted: 0,
            timed_out: 0,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener.local_addr().context("metrics: listener address")
    }

    pub fn owns(&self, t: Token) -> bool {
        t == self.listener_token || (self.base..self.base + MAX_CONNECTIONS).contains(&t.0)
    }

    pub fn ready(&mut self, registry: &Registry, now: Instant, t: Token) {
        if t == self.listener_token {
            self.accept(registry, now);
        } else if let Some(slot) = t.0.checked_sub(self.base) {
            self.io(registry, slot);
        }
    }

    /// Some connection asked for the metrics and the last render is
    /// [`MIN_RENDER_INTERVAL`] ago: render them and call [`Responder::answer`].
    pub fn wants_body(&self, now: Instant) -> bool {
        self.waiting() && self.next_render().is_none_or(|t| now >= t)
    }

    fn waiting(&self) -> bool {
        self.conns.iter().flatten().any(|c| c.waiting.is_some())
    }

    fn next_render(&self) -> Option<Instant> {
        self.last_render.map(|t| t + MIN_RENDER_INTERVAL)
    }

    pub fn answer(&mut self, registry: &Registry, now: Instant, body: &str) {
        self.last_render = Some(now);
        self.renders += 1;
        for slot in 0..self.conns.len() {
            let Some(c) = self.conns[slot].as_mut() else {
                continue;
            };
            if let Some(head) = c.waiting.take() {
                c.output = http::ok(body, head);
                self.io(registry, slot);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.accept_more {
            return Some(Instant::now());
        }
        let render = self.next_render().filter(|_| self.waiting());
        self.conns
            .iter()
            .flatten()
            .map(|c| c.opened + DEADLINE)
            .chain(render)
            .min()
    }

    pub fn handle_timeout(&mut self, registry: &Registry, now: Instant) {
        if self.accept_more {
            self.accept(registry, now);
        }
        for slot in 0..self.conns.len() {
            if self.conns[slot]
                .as_ref()
                .is_some_and(|c| now >= c.opened + DEADLINE)
            {
                self.timed_out += 1;
                self.close(registry, slot);
            }
        }
    }

    fn accept(&mut self, registry: &Registry, now: Instant) {
        self.accept_more = false;
        for _ in 0..ACCEPTS_PER_TURN {
            let mut stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // Out of descriptors or a connection reset while queued: the
                // next readiness tries again.
                Err(_) => return,
            };
            let slot = match self.conns.iter().position(Option::is_none) {
                Some(s) => s,
                None => {
                    let oldest = (0..self.conns.len())
                        .min_by_key(|&s| self.conns[s].as_ref().map(|c| c.opened))
                        .unwrap_or(0);
                    self.evicted += 1;
                    self.close(registry, oldest);
                    oldest
                }
            };
            let token = Token(self.base + slot);
            if registry
                .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                .is_ok()
            {
                self.conns[slot] = Some(Conn {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    waiting: None,
                    opened: now,
                });
            }
        }
        self.accept_more = true;
    }

    /// Reads a request until it is complete, writes the answer, closes.
    fn io(&mut self, registry: &Registry, slot: usize) {
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.waiting.is_some() {
            return;
        }
        if c.output.is_empty() {
            let eof = crate::nonblock::read_available(&mut c.stream, &mut c.input, MAX_REQUEST_LEN);
            match http::parse(&c.input) {
                Request::Incomplete if eof => return self.close(registry, slot),
                Request::Incomplete => return,
                Request::Metrics { head } => {
                    c.waiting = Some(head);
                    return;
                }
                Request::Refuse(status) => c.output = http::refusal(status),
            }
        }
        while !c.output.is_empty() {
            match c.stream.write(&c.output) {
                Ok(n) if n > 0 => {
                    c.output.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                _ => break,
            }
        }
        self.close(registry, slot);
    }

    fn close(&mut self, registry: &Registry, slot: usize) {
        if let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) {
            let _ = registry.deregister(&mut c.stream);
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
        }
    }
}

/// Serves `render`'s text on `addr` from a thread of its own, for a role
/// whose loop has no room for it (or several roles in one process). Binds
/// before returning, so a busy address is the caller's error.
pub fn spawn(addr: SocketAddr, mut render: impl FnMut() -> String + Send + 'static) -> Result<SocketAddr> {
    const LISTENER: Token = Token(0);
    let mut poll = Poll::new().context("metrics: creating poll")?;
    let mut responder = Responder::bind(poll.registry(), addr, LISTENER, 1)?;
    let bound = responder.local_addr()?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let mut events = Events::with_capacity(16);
            loop {
                let timeout = responder
                    .poll_timeout()
                    .map(|t| t.saturating_duration_since(Instant::now()));
                if let Err(e) = poll.poll(&mut events, timeout)
                    && e.kind() != ErrorKind::Interrupted
                {
                    log_error!("metrics on {bound}: stopped: waiting for events: {e}");
                    return;
                }
                let now = Instant::now();
                for ev in events.iter() {
                    responder.ready(poll.registry(), now, ev.token());
                }
                let now = Instant::now();
                if responder.wants_body(now) {
                    let body = render();
                    responder.answer(poll.registry(), now, &body);
                }
                responder.handle_timeout(poll.registry(), Instant::now());
            }
        })
        .context("metrics: starting its thread")?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Read};

    fn scrape(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut out = String::new();
        BufReader::new(s).read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn scrapes_are_answered_while_strangers_hold_every_slot() {
        let mut n = 0u64;
        let addr = spawn("127.0.0.1:0".parse().unwrap(), move || {
            n += 1;
            format!("# TYPE x counter\nx_total {n}\n")
        })
        .unwrap();
        // Strangers that connect and never finish a request, more than the slots.
        let held: Vec<_> = (0..MAX_CONNECTIONS * 3)
            .map(|_| {
                let mut s = std::net::TcpStream::connect(addr).unwrap();
                s.write_all(b"GET /metr").unwrap();
                s
            })
            .collect();
        let a = scrape(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.ends_with("x_total 1\n"), "{a}");
        let b = scrape(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert!(b.ends_with("x_total 2\n"), "rendered per scrape: {b}");
        let nf = scrape(addr, b"GET /other HTTP/1.1\r\n\r\n");
        assert!(nf.starts_with("HTTP/1.1 404 "), "{nf}");
        let big = scrape(addr, &[b'x'; MAX_REQUEST_LEN]);
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        drop(held);
    }

    /// Each answer is rendered after its request came (the figure counts
    /// up), and a client asking in a loop makes at most one render per
    /// MIN_RENDER_INTERVAL.
    #[test]
    fn a_client_scraping_in_a_loop_is_answered_at_the_render_rate() {
        let mut n = 0u64;
        let addr = spawn("127.0.0.1:0".parse().unwrap(), move || {
            n += 1;
            format!("x_total {n}\n")
        })
        .unwrap();
        let t0 = Instant::now();
        let scrapes = 12u32;
        for i in 1..=scrapes {
            let a = scrape(addr, b"GET /metrics HTTP/1.1\r\n\r\n");
            assert!(a.ends_with(&format!("x_total {i}\n")), "{a}");
        }
        let elapsed = t0.elapsed();
        assert!(
            elapsed >= MIN_RENDER_INTERVAL * (scrapes - 1),
            "{scrapes} renders in {elapsed:?}"
        );
    }

    #[test]
    fn a_silent_connection_is_closed_at_its_deadline() {
        let mut poll = Poll::new().unwrap();
        let mut r = Responder::bind(poll.registry(), "127.0.0.1:0".parse().unwrap(), Token(0), 10).unwrap();
        let mut s = std::net::TcpStream::connect(r.local_addr().unwrap()).unwrap();
        let mut events = Events::with_capacity(8);
        let t0 = Instant::now();
        while r.conns.iter().all(Option::is_none) {
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
            for ev in events.iter() {
                r.ready(poll.registry(), t0, ev.token());
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "never accepted");
        }
        assert_eq!(r.poll_timeout(), Some(t0 + DEADLINE));
        r.handle_timeout(poll.registry(), t0 + DEADLINE);
        assert_eq!(r.timed_out, 1);
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(s.read(&mut buf).unwrap(), 0, "closed");
    }
}

//! Load generator for the coordinator benchmark (hidden `warren server load`):
//! many light nodes in one process and one mio loop, each a real Noise
//! channel that joins through a real invite. Light: full peer maps are
//! decrypted but not parsed; only the change being timed is looked for.
//! Held nodes behave like agents when the coordinator goes away: each
//! reconnects with the agent's backoff and jitter, so a coordinator restart
//! meets the herd it would meet in a real mesh.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::admin::{self, AdminRequest, AdminResponse};
use super::flood;
use super::invite::JoinToken;
use crate::agent::control::{BACKOFF_MAX, BACKOFF_MIN, CONNECT_TIMEOUT};
use crate::control::channel::Channel;
use crate::control::messages::{self, ClientMessage, PROTOCOL_VERSION};
use crate::keys::Key;

/// Where the light nodes' source addresses start when the coordinator is on
/// loopback: each node dials from its own address (127.2.0.1, 127.2.0.2, ...)
/// as nodes of a real mesh do. From one address, a herd of thousands meets
/// the coordinator's cap on pending connections per source, and every node
/// refused there backs off as an agent does: 3,000 nodes took 68.8 s to come
/// back after a restart that cost both processes 20 s of CPU.
const FIRST_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 2, 0, 1);
/// Connections dialled but not yet welcomed, so the listen backlog never overflows.
const MAX_IN_FLIGHT: usize = 64;
/// Each phase of the run must finish within this, or the benchmark fails.
const PHASE_DEADLINE: Duration = Duration::from_secs(600);
/// Light nodes ping like agents do, or the coordinator's idle timeout drops them during a long run.
const PING_EVERY: Duration = Duration::from_secs(20);
/// The map is considered settled after this long without traffic.
const QUIET: Duration = Duration::from_secs(2);
/// While held nodes are coming back, how often to say how many are.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);

struct Light {
    /// Kept across reconnects: the node is enrolled under it.
    key: Key,
    stream: Option<TcpStream>,
    ch: Channel,
    /// The coordinator's Welcome came: the connection is up (the agent's
    /// connect timeout ends here).
    greeted: bool,
    /// The full map came too: the node is back.
    welcomed: bool,
    /// Welcomed once: reconnects say Hello, as an enrolled agent does.
    enrolled: bool,
    got_change: Option<Instant>,
    /// While disconnected: when to dial again. While dialling: when to give up.
    deadline: Instant,
    failures: u32,
}

/// The agent's reconnect delay (see `agent::control`): exponential backoff
/// with equal jitter, half fixed and half random.
fn backoff(failures: u32, rng: &mut u64) -> Duration {
    let base = BACKOFF_MIN
        .saturating_mul(1u32 << failures.min(16))
        .min(BACKOFF_MAX);
    *rng ^= *rng << 13;
    *rng ^= *rng >> 7;
    *rng ^= *rng << 17;
    let frac = (*rng % 1000) as f64 / 1000.0;
    base / 2 + base.mul_f64(frac / 2.0)
}

/// Dials the coordinator for light node `i`: Join the first time, Hello once enrolled.
fn dial(
    poll: &Poll,
    server: SocketAddr,
    token: &JoinToken,
    i: usize,
    key: &Key,
    enrolled: bool,
) -> Result<(TcpStream, Channel)> {
    let mut stream = match server {
        SocketAddr::V4(s) if s.ip().is_loopback() => {
            let from = Ipv4Addr::from(u32::from(FIRST_SOURCE) + i as u32);
            TcpStream::from_std(
                flood::dial(from, server, true)
                    .with_context(|| format!("connecting to {server} from {from}"))?,
            )
        }
        _ => TcpStream::connect(server).with_context(|| format!("connecting to {server}"))?,
    };
    poll.registry()
        .register(&mut stream, Token(i), Interest::READABLE | Interest::WRITABLE)
        .context("registering a light node")?;
    let mut ch = Channel::client(key, &token.server_key)?;
    let msg = if enrolled {
        ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            hostname: "load".into(),
            candidates: vec![],
            online_by_id: true,
            advertise: Default::default(),
            policy: false,
        }
    } else {
        ClientMessage::Join {
            version: PROTOCOL_VERSION,
            secret: token.secret.clone(),
            name: Some(format!("load-{i}")),
            hostname: "load".into(),
            candidates: vec![],
            online_by_id: true,
            advertise: Default::default(),
            policy: false,
        }
    };
    ch.send(&messages::encode(&msg))?;
    Ok((stream, ch))
}

pub struct LoadReport {
    pub nodes: usize,
    pub connect_all: Duration,
    pub change_p50: Duration,
    pub change_p99: Duration,
    pub change_max: Duration,
}

pub use crate::rlimit::raise_fd_limit;

/// With `hold`, the nodes stay connected (pinging, reconnecting like agents
/// when the coordinator goes) until the process is killed and nothing is
/// timed: a populated mesh for measuring an agent or a restart against.
pub fn run(admin_socket: &Path, server: SocketAddr, nodes: usize, hold: bool) -> Result<LoadReport> {
    raise_fd_limit();
    let req = AdminRequest::Invite {
        reusable: true,
        expires_in: Some(3600),
        name: None,
    };
    let AdminResponse::Invite { token, .. } = admin::request(admin_socket, &req)? else {
        bail!("unexpected answer to the invite request");
    };
    let token = JoinToken::parse(&token)?;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(1024);
    let mut lights: Vec<Light> = Vec::with_capacity(nodes);
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let mut welcomed = 0usize;
    let mut last_traffic = Instant::now();
    let mut marker: Option<(Vec<u8>, Instant)> = None;
    let mut next_ping = Instant::now() + PING_EVERY;
    let mut announced = false;
    // When the first held node lost its connection, until all are back.
    let mut lost_since: Option<Instant> = None;
    let mut next_progress = Instant::now();
    let mut rng = u64::from(std::process::id()) | 1;

    loop {
        let now = Instant::now();
        // First connects are paced so the listen backlog never overflows.
        while lights.len() < nodes && lights.len() - welcomed < MAX_IN_FLIGHT {
            let key = Key::generate_private();
            let (stream, ch) = dial(&poll, server, &token, lights.len(), &key, false)?;
            lights.push(Light {
                key,
                stream: Some(stream),
                ch,
                greeted: false,
                welcomed: false,
                enrolled: false,
                got_change: None,
                deadline: now + PHASE_DEADLINE,
                failures: 0,
            });
        }
        // Reconnects are not paced: each node keeps its own jittered schedule, as agents do.
        if hold {
            for (i, l) in lights.iter_mut().enumerate() {
                if l.stream.is_none() && now >= l.deadline {
                    match dial(&poll, server, &token, i, &l.key, l.enrolled) {
                        Ok((stream, ch)) => {
                            l.stream = Some(stream);
                            l.ch = ch;
                            l.deadline = now + CONNECT_TIMEOUT;
                        }
                        Err(e) => {
                            log!("load: light node {i}: {e:#}");
                            l.deadline = now + backoff(l.failures, &mut rng);
                            l.failures = l.failures.saturating_add(1);
                        }
                    }
                } else if l.stream.is_some() && !l.greeted && now >= l.deadline {
                    lose(&poll, l, &mut welcomed, now, &mut rng);
                }
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        let now2 = Instant::now();
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(l) = lights.get_mut(i) else {
                continue;
            };
            let mut gone = None;
            while let Some(stream) = l.stream.as_mut() {
                match stream.read(&mut buf) {
                    Ok(0) => {
                        gone = Some("closed".to_string());
                        break;
                    }
                    Ok(n) => {
                        last_traffic = now2;
                        if let Err(e) = l.ch.receive(&buf[..n]) {
                            gone = Some(format!("channel: {e:#}"));
                            break;
                        }
                        while let Some(msg) = l.ch.next_message() {
                            if msg.starts_with(br#"{"type":"welcome""#) {
                                l.greeted = true;
                            }
                            // Back means the full map is in, not just the Welcome:
                            // the coordinator may send the map a little later.
                            if !l.welcomed && msg.starts_with(br#"{"type":"peer_map","#) {
                                l.welcomed = true;
                                l.enrolled = true;
                                l.failures = 0;
                                welcomed += 1;
                            }
                            if let Some((m, _)) = &marker
                                && l.got_change.is_none()
                                && msg.starts_with(br#"{"type":"peer_map_delta""#)
                                && msg.windows(m.len()).any(|w| w == m.as_slice())
                            {
                                l.got_change = Some(now2);
                            }
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::NotConnected => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => {
                        gone = Some(e.to_string());
                        break;
                    }
                }
            }
            if let Some(why) = gone {
                if !hold {
                    bail!("coordinator connection of light node {i}: {why}");
                }
                if lost_since.is_none() && welcomed == nodes {
                    lost_since = Some(now2);
                    next_progress = now2 + PROGRESS_EVERY;
                }
                lose(&poll, l, &mut welcomed, now2, &mut rng);
            }
        }
        let ping = now >= next_ping;
        if ping {
            next_ping = now + PING_EVERY;
        }
        for (i, l) in lights.iter_mut().enumerate() {
            let Some(stream) = l.stream.as_mut() else {
                continue;
            };
            if ping && l.welcomed {
                l.ch.send(&messages::encode(&ClientMessage::Ping { nonce: 0 }))?;
            }
            let out = l.ch.outgoing();
            if out.is_empty() {
                continue;
            }
            match stream.write(out) {
                Ok(n) => l.ch.consume_outgoing(n),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {}
                Err(e) if hold => {
                    log!("load: light node {i}: writing to the coordinator: {e}");
                    lose(&poll, l, &mut welcomed, now, &mut rng);
                }
                Err(e) => return Err(e).context("writing to the coordinator"),
            }
        }
        if let Some(t) = lost_since
            && welcomed < nodes
            && now2 >= next_progress
        {
            next_progress = now2 + PROGRESS_EVERY;
            log!(
                "load: {welcomed} of {nodes} nodes back {:.0} s after the first was lost",
                now2.duration_since(t).as_secs_f64()
            );
        }
        if let Some(t) = lost_since
            && welcomed == nodes
        {
            lost_since = None;
            log!(
                "load: all {nodes} nodes back {:.1} s after the first was lost",
                now2.duration_since(t).as_secs_f64()
            );
        }
        match &marker {
            None if hold && welcomed == nodes && !announced => {
                announced = true;
                log!(
                    "load: {nodes} nodes connected in {:.1} s; holding them until killed",
                    now.duration_since(started).as_secs_f64()
                );
            }
            None if hold => {}
            None if welcomed == nodes && now.duration_since(last_traffic) >= QUIET => {
                // Everyone is in and the joins' deltas have settled: time one change.
                let t0 = Instant::now();
                let new_name = "load-renamed".to_string();
                admin::request(
                    admin_socket,
                    &AdminRequest::Rename {
                        node: "load-0".into(),
                        new_name: new_name.clone(),
                    },
                )?;
                marker = Some((format!(r#""name":"{new_name}""#).into_bytes(), t0));
                log!(
                    "load: {nodes} nodes connected in {:.1} s; renaming load-0",
                    (t0 - started).as_secs_f64()
                );
            }
            None if now.duration_since(started) > PHASE_DEADLINE => {
                bail!(
                    "only {welcomed} of {nodes} light nodes were welcomed within {} s",
                    PHASE_DEADLINE.as_secs()
                )
            }
            Some((_, t0)) => {
                let done = lights.iter().filter(|l| l.got_change.is_some()).count();
                if done == nodes {
                    let mut lat: Vec<Duration> = lights
                        .iter()
                        .filter_map(|l| l.got_change.map(|t| t - *t0))
                        .collect();
                    lat.sort();
                    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
                    return Ok(LoadReport {
                        nodes,
                        connect_all: *t0 - started,
                        change_p50: pct(0.50),
                        change_p99: pct(0.99),
                        change_max: *lat.last().unwrap_or(&Duration::ZERO),
                    });
                }
                if now.duration_since(*t0) > PHASE_DEADLINE {
                    bail!("the change reached only {done} of {nodes} nodes");
                }
            }
            _ => {}
        }
    }
}

/// A held node's connection ended (or never got its welcome): hang up and
/// schedule the next dial as an agent would.
fn lose(poll: &Poll, l: &mut Light, welcomed: &mut usize, now: Instant, rng: &mut u64) {
    if let Some(mut s) = l.stream.take() {
        let _ = poll.registry().deregister(&mut s);
    }
    l.greeted = false;
    if l.welcomed {
        l.welcomed = false;
        *welcomed -= 1;
    }
    l.deadline = now + backoff(l.failures, rng);
    l.failures = l.failures.saturating_add(1);
}

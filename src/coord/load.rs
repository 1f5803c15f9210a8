//! Load generator for the coordinator benchmark (hidden `warren server load`):
//! many light nodes in one process and one mio loop, each a real Noise
//! channel that joins through a real invite. Light: full peer maps are
//! decrypted but not parsed; only the change being timed is looked for.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use super::admin::{self, AdminRequest, AdminResponse};
use super::invite::JoinToken;
use crate::control::channel::Channel;
use crate::control::messages::{self, ClientMessage, PROTOCOL_VERSION};
use crate::keys::Key;

/// Connections dialled but not yet welcomed, so the listen backlog never overflows.
const MAX_IN_FLIGHT: usize = 64;
/// Each phase of the run must finish within this, or the benchmark fails.
const PHASE_DEADLINE: Duration = Duration::from_secs(600);
/// Light nodes ping like agents do, or the coordinator's idle timeout drops them during a long run.
const PING_EVERY: Duration = Duration::from_secs(20);
/// The map is considered settled after this long without traffic.
const QUIET: Duration = Duration::from_secs(2);

struct Light {
    stream: TcpStream,
    ch: Channel,
    welcomed: bool,
    got_change: Option<Instant>,
}

pub struct LoadReport {
    pub nodes: usize,
    pub connect_all: Duration,
    pub change_p50: Duration,
    pub change_p99: Duration,
    pub change_max: Duration,
}

/// Raises the open-file limit to its hard maximum: one descriptor per connection.
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// With `hold`, the nodes stay connected (pinging) until the process is killed
/// and nothing is timed: a populated mesh for measuring an agent against.
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
    let mut lights: HashMap<usize, Light> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    let started = Instant::now();
    let (mut dialled, mut welcomed) = (0usize, 0usize);
    let mut last_traffic = Instant::now();
    let mut marker: Option<(Vec<u8>, Instant)> = None;
    let mut next_ping = Instant::now() + PING_EVERY;
    let mut announced = false;

    loop {
        let now = Instant::now();
        while dialled < nodes && dialled - welcomed < MAX_IN_FLIGHT {
            let mut stream = TcpStream::connect(server).with_context(|| format!("connecting to {server}"))?;
            poll.registry().register(
                &mut stream,
                Token(dialled),
                Interest::READABLE | Interest::WRITABLE,
            )?;
            let mut ch = Channel::client(&Key::generate_private(), &token.server_key)?;
            let join = ClientMessage::Join {
                version: PROTOCOL_VERSION,
                secret: token.secret.clone(),
                name: Some(format!("load-{dialled}")),
                hostname: "load".into(),
                candidates: vec![],
            };
            ch.send(&messages::encode(&join))?;
            lights.insert(
                dialled,
                Light {
                    stream,
                    ch,
                    welcomed: false,
                    got_change: None,
                },
            );
            dialled += 1;
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))?;
        let now2 = Instant::now();
        for ev in events.iter() {
            let Some(l) = lights.get_mut(&ev.token().0) else {
                continue;
            };
            loop {
                match l.stream.read(&mut buf) {
                    Ok(0) => bail!("coordinator closed light node {}", ev.token().0),
                    Ok(n) => {
                        last_traffic = now2;
                        l.ch.receive(&buf[..n]).context("light node channel")?;
                        while let Some(msg) = l.ch.next_message() {
                            if !l.welcomed && msg.starts_with(br#"{"type":"welcome""#) {
                                l.welcomed = true;
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
                    Err(e) => return Err(e).context("reading from the coordinator"),
                }
            }
        }
        let ping = now >= next_ping;
        if ping {
            next_ping = now + PING_EVERY;
        }
        for l in lights.values_mut() {
            if ping && l.welcomed {
                l.ch.send(&messages::encode(&ClientMessage::Ping { nonce: 0 }))?;
            }
            let out = l.ch.outgoing();
            if out.is_empty() {
                continue;
            }
            match l.stream.write(out) {
                Ok(n) => l.ch.consume_outgoing(n),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::NotConnected) => {}
                Err(e) => return Err(e).context("writing to the coordinator"),
            }
        }
        match &marker {
            None if hold && welcomed == nodes && !announced => {
                announced = true;
                eprintln!("load: {nodes} nodes connected; holding them until killed");
            }
            None if hold && welcomed == nodes => {}
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
                eprintln!(
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
                let done = lights.values().filter(|l| l.got_change.is_some()).count();
                if done == nodes {
                    let mut lat: Vec<Duration> = lights
                        .values()
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

//! The agent's name server: one UDP socket on the node's mesh address
//! (never a WAN address), answered by `dns::answer` from the peer map, and
//! the system's resolver pointed at it (systemd-resolved, or a block in a
//! hosts file). Every answer is rate-limited per source.

use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mio::net::UdpSocket;
use mio::{Interest, Registry, Token};

use crate::control::messages::PeerInfo;
use crate::dns::{NameTable, answer, hosts, resolved};
use crate::relay::admission::{Source, SourceBuckets};

pub const TOKEN: Token = Token(10);
/// Where resolvers look for a name server; `--dns-listen` moves it.
pub const DEFAULT_PORT: u16 = 53;
/// Answers a second per source, and the burst it may use at once. A node's
/// resolver asks for names, not floods: a stranger past this costs one
/// recv and a bucket check per datagram, and gets no answer.
const ANSWERS_PER_SEC: u32 = 100;
const ANSWER_BURST: u32 = 200;
/// Datagrams read per wake-up, so a flood cannot hold the loop: the rest is
/// read on the next turn (see `unread`).
const READS_PER_WAKE: usize = 256;
/// Queries are small; a longer datagram is cut here and answered FORMERR.
const MAX_QUERY: usize = 1232;
/// Dropped-over-the-limit queries are summed up at most this often.
const LIMITED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Where the name server listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listen {
    Off,
    /// The node's mesh address, on this port.
    Mesh(u16),
    /// A fixed address: loopback or a mesh address (checked by the CLI).
    At(SocketAddr),
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    pub listen: Listen,
    pub domain: String,
    /// The hosts file to keep a block of names in; none by default.
    pub hosts_file: Option<PathBuf>,
}

pub struct Dns {
    cfg: DnsConfig,
    table: NameTable,
    socket: Option<UdpSocket>,
    bound: Option<SocketAddr>,
    limits: SourceBuckets,
    unread: bool,
    last_error: Option<String>,
    /// The interface whose resolved settings are ours to revert.
    resolved_on: Option<String>,
    limited: u64,
    last_limited_log: Option<Instant>,
}

impl Dns {
    pub fn new(cfg: DnsConfig) -> Dns {
        Dns {
            table: NameTable::new(&cfg.domain),
            cfg,
            socket: None,
            bound: None,
            limits: SourceBuckets::new(ANSWERS_PER_SEC, ANSWER_BURST),
            unread: false,
            last_error: None,
            resolved_on: None,
            limited: 0,
            last_limited_log: None,
        }
    }

    pub fn owns(t: Token) -> bool {
        t == TOKEN
    }

    /// Datagrams were left unread by the last `ready`.
    pub fn unread(&self) -> bool {
        self.unread
    }

    /// The map changed: answers and the hosts block follow at once.
    pub fn set_nodes<'a>(&mut self, me: Option<&'a PeerInfo>, peers: impl Iterator<Item = &'a PeerInfo>) {
        let nodes = me
            .into_iter()
            .chain(peers)
            .map(|p| (p.name.as_str(), p.mesh_addr));
        let table = NameTable::with_nodes(&self.cfg.domain, nodes);
        if table == self.table {
            return;
        }
        self.table = table;
        self.write_hosts();
    }

    fn write_hosts(&mut self) {
        let Some(path) = self.cfg.hosts_file.clone() else {
            return;
        };
        if let Err(e) = hosts::update(&path, &self.table.entries()) {
            self.error(format!("{e:#}"));
        }
    }

    fn error(&mut self, msg: String) {
        if self.last_error.as_deref() != Some(&msg) {
            log!("agent: dns: {msg}");
        }
        self.last_error = Some(msg);
    }

    /// Listens where configured once `mesh_addr` is on the interface
    /// (called after each reconcile, so a failed bind is tried again).
    pub fn ensure_bound(&mut self, registry: &Registry, mesh_addr: Ipv4Addr, ifname: &str) {
        let want = match self.cfg.listen {
            Listen::Off => return,
            Listen::Mesh(port) => SocketAddr::new(IpAddr::V4(mesh_addr), port),
            Listen::At(a) => a,
        };
        if self.bound == Some(want) {
            return;
        }
        if let Some(mut old) = self.socket.take() {
            let _ = registry.deregister(&mut old);
        }
        self.bound = None;
        let mut socket = match UdpSocket::bind(want) {
            Ok(s) => s,
            Err(e) => return self.error(format!("listening on {want}: {e}")),
        };
        if let Err(e) = registry.register(&mut socket, TOKEN, Interest::READABLE) {
            return self.error(format!("registering the socket on {want}: {e}"));
        }
        log!("agent: dns: answering *.{} on {want}", self.table.domain());
        self.socket = Some(socket);
        self.bound = Some(want);
        self.last_error = None;
        // A fresh socket may have missed nothing, but reading costs nothing either.
        self.unread = true;
        if self.resolved_on.is_none() && resolved::present() {
            self.point_resolved(ifname, want);
        }
    }

    /// resolvectl talks D-Bus and may wait for it: a thread of its own, not the loop.
    fn point_resolved(&mut self, ifname: &str, server: SocketAddr) {
        let cmds = resolved::set_commands(ifname, server, &self.table.domain());
        let ifname = ifname.to_string();
        let domain = self.table.domain();
        self.resolved_on = Some(ifname.clone());
        let spawned = std::thread::Builder::new()
            .name("resolvectl".into())
            .spawn(move || {
                for c in &cmds {
                    if let Err(e) = resolved::resolvectl(c) {
                        log!("agent: dns: systemd-resolved for {ifname}: {e:#}");
                        return;
                    }
                }
                log!("agent: dns: systemd-resolved sends *.{domain} on {ifname} to {server}");
            });
        if let Err(e) = spawned {
            log!("agent: dns: starting resolvectl: {e}");
        }
    }

    /// Reads and answers what arrived, at most `READS_PER_WAKE` datagrams.
    pub fn ready(&mut self, now: Instant) {
        self.unread = false;
        let Some(socket) = self.socket.as_ref() else {
            return;
        };
        let own = self.bound.map(|a| a.ip());
        let mut buf = [0u8; MAX_QUERY];
        let mut drained = false;
        for _ in 0..READS_PER_WAKE {
            let (n, from) = match socket.recv_from(&mut buf) {
                Ok(r) => r,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    drained = true;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                // An ICMP error for an earlier answer: nothing to do about it.
                Err(_) => continue,
            };
            // Local processes could spend this CPU anyway; the limit is for others.
            let local = from.ip().is_loopback() || Some(from.ip()) == own;
            if !local && !self.limits.take(now, Source::of(from.ip())) {
                self.limited += 1;
                continue;
            }
            if let Some(reply) = answer(&buf[..n], &self.table) {
                // A full send buffer drops the answer; the client asks again.
                let _ = socket.send_to(&reply, from);
            }
        }
        self.unread = !drained;
        self.log_limited(now);
    }

    fn log_limited(&mut self, now: Instant) {
        if self.limited == 0
            || self
                .last_limited_log
                .is_some_and(|t| now.saturating_duration_since(t) < LIMITED_LOG_INTERVAL)
        {
            return;
        }
        log!(
            "agent: dns: dropped {} queries over the per-source limit ({ANSWERS_PER_SEC}/s) since the last report",
            self.limited
        );
        self.limited = 0;
        self.last_limited_log = Some(now);
    }

    /// On the way out: the hosts block goes, resolved forgets the link.
    pub fn stop(&mut self) {
        if let Some(path) = self.cfg.hosts_file.clone()
            && let Err(e) = hosts::update(&path, &[])
        {
            log!("agent: dns: {e:#}");
        }
        if let Some(ifname) = self.resolved_on.take()
            && let Err(e) = resolved::resolvectl(&resolved::revert_command(&ifname))
        {
            log!("agent: dns: systemd-resolved for {ifname}: {e:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Key;
    use mio::{Events, Poll};

    fn node(name: &str, last: u8) -> PeerInfo {
        PeerInfo {
            id: u64::from(last),
            name: name.into(),
            mesh_addr: Ipv4Addr::new(100, 64, 0, last),
            public_key: Key::generate_private().public_key(),
            candidates: Vec::new(),
            online: true,
            home_relay: None,
            routes: Vec::new(),
            exit: false,
        }
    }

    /// Asks `dns` for `name` over loopback, driving its socket from `poll`; the answer's rcode and A record.
    fn ask(dns: &mut Dns, poll: &mut Poll, name: &str) -> (u8, Option<Ipv4Addr>) {
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_nonblocking(true).unwrap();
        let mut q = vec![0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        client.send_to(&q, dns.bound.unwrap()).unwrap();
        let mut events = Events::with_capacity(8);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut buf = [0u8; 512];
        while Instant::now() < deadline {
            poll.poll(&mut events, Some(Duration::from_millis(50))).unwrap();
            dns.ready(Instant::now());
            if let Ok(n) = client.recv(&mut buf) {
                let r = &buf[..n];
                assert_eq!(&r[..2], &[0xab, 0xcd]);
                let addr =
                    (n >= 4 + q.len() + 12).then(|| Ipv4Addr::new(r[n - 4], r[n - 3], r[n - 2], r[n - 1]));
                return (r[3] & 0x0f, addr);
            }
        }
        panic!("no answer for {name} within 10 s");
    }

    #[test]
    fn answers_follow_the_map_and_the_hosts_block_goes_at_stop() {
        let dir = std::env::temp_dir().join(format!("warren-agent-dns-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let hosts = dir.join("hosts");
        std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
        let port = std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut dns = Dns::new(DnsConfig {
            listen: Listen::At(SocketAddr::from(([127, 0, 0, 1], port))),
            domain: "warren".into(),
            hosts_file: Some(hosts.clone()),
        });
        let mut poll = Poll::new().unwrap();
        let (me, pi) = (node("nas", 9), node("pi", 10));
        dns.set_nodes(Some(&me), [&pi].into_iter());
        dns.ensure_bound(poll.registry(), me.mesh_addr, "lo");
        assert_eq!(ask(&mut dns, &mut poll, "nas.warren"), (0, Some(me.mesh_addr)));
        assert_eq!(ask(&mut dns, &mut poll, "pi.warren"), (0, Some(pi.mesh_addr)));
        let text = std::fs::read_to_string(&hosts).unwrap();
        assert!(text.contains("100.64.0.10\tpi.warren\n"), "{text}");

        let camera = PeerInfo {
            name: "camera".into(),
            ..pi.clone()
        };
        dns.set_nodes(Some(&me), [&camera].into_iter());
        assert_eq!(ask(&mut dns, &mut poll, "camera.warren"), (0, Some(pi.mesh_addr)));
        assert_eq!(
            ask(&mut dns, &mut poll, "pi.warren").0,
            3,
            "NXDOMAIN for the old name"
        );
        assert!(std::fs::read_to_string(&hosts).unwrap().contains("camera.warren"));

        dns.stop();
        assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "127.0.0.1 localhost\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! UPnP IGD port mappings on a worker thread. The client (SSDP search, then
//! SOAP over HTTP, in the modules below) blocks, so one thread,
//! "warren-upnp", runs it. The agent's loop [`Worker::submit`]s
//! [`Command`]s, which never blocks; after each [`Reply`] the worker wakes
//! the loop through a [`mio::Waker`], and the loop takes replies with
//! [`Worker::try_recv`].
//!
//! Every call is bounded: the search by [`DISCOVER_TIMEOUT`] (the gateway's
//! description fetched inside that time), each SOAP call by
//! [`SOAP_TIMEOUT`], a Map's port hunt by [`MAP_BUDGET`] and a Check's table
//! walk by [`CHECK_BUDGET`] (each plus the one call under way). A call that
//! fails for want of an answer (refused, timed out, reset, not HTTP) drops
//! the gateway: every command but Discover then fails with [`NO_GATEWAY`]
//! until a Discover succeeds, so the driver re-discovers.
//!
//! Connection status is never asked (GetStatusInfo): some gateways call
//! themselves "not connected" and forward all the same (miniupnpd with a
//! documentation-prefix WAN address, see DESIGN.md), so mapping is only ever
//! judged by the router's answer to the mapping call itself.
//!
//! The client was igd-next until its HTTP stack (attohttpc, url, idna, http,
//! xml-rs: a third of a megabyte of the router build) outweighed the few
//! calls made here; it also sent SOAP to any `http_proxy` in the
//! environment. This one talks only to the address that answered the search.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[cfg(feature = "upnp")]
use igd::search_igd;
use mio::Waker;

// The client behind the worker's `Gateway` calls, one module per layer.
#[cfg(feature = "upnp")]
pub mod description;
#[cfg(feature = "upnp")]
pub mod http;
#[cfg(feature = "upnp")]
mod igd;
#[cfg(feature = "upnp")]
pub mod soap;
#[cfg(feature = "upnp")]
pub mod ssdp;
#[cfg(feature = "upnp")]
pub mod xml;

/// Commands waiting for the worker, besides the one it is running.
pub const QUEUE_LEN: usize = 16;
/// How long a Discover listens for SSDP answers, the gateway's description
/// fetch included (it gets the time left).
pub const DISCOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// The bound on each SOAP call (connect, request, the whole answer): a
/// router on the LAN answers in milliseconds, and a hung one holds up only
/// this worker, never the agent's loop.
pub const SOAP_TIMEOUT: Duration = Duration::from_secs(5);
/// A Map asks for no further port once this long has gone by.
pub const MAP_BUDGET: Duration = Duration::from_secs(10);
/// Ports after the wanted one a Map asks for when it is taken and the router
/// cannot pick one itself (no IGDv2 AddAnyPortMapping).
pub const FALLBACK_PORTS: u16 = 4;
/// A Check reads at most this many entries of the router's table
/// (GetGenericPortMappingEntry, which every IGD has). Home routers hold a
/// handful.
pub const MAX_CHECKED_ENTRIES: u32 = 64;
/// A Check reads no further entry once this long has gone by.
pub const CHECK_BUDGET: Duration = Duration::from_secs(10);
/// The reply to Map, Check and Unmap while the worker holds no gateway.
pub const NO_GATEWAY: &str = "no UPnP gateway discovered";
/// Why UPnP never answers in a build without the `upnp` feature.
pub const NOT_BUILT: &str = "UPnP IGD is not in this build (cargo feature upnp)";
const THREAD_NAME: &str = "warren-upnp";

// UPnP error codes (WANIPConnection:2, section 2.5) the worker acts on.
const INDEX_INVALID: u16 = 713;
const NO_SUCH_ENTRY: u16 = 714;
const CONFLICT: u16 = 718;
const SAME_PORT_VALUES_REQUIRED: u16 = 724;
const ONLY_PERMANENT_LEASES: u16 = 725;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// SSDP search for an IGD (at most [`DISCOVER_TIMEOUT`]), then its
    /// external address. Replaces any gateway the worker held, also when no
    /// gateway answers.
    Discover,
    /// AddPortMapping UDP `external_port` -> `internal`. If the router
    /// refuses that port as taken (ConflictInMappingEntry), AddAnyPortMapping
    /// (IGDv2), then the [`FALLBACK_PORTS`] ports after it; the reply says
    /// what was granted. A router that takes only permanent leases gets lease
    /// 0, and the reply says so (`lease_secs: 0`: it must be unmapped).
    Map {
        internal: SocketAddrV4,
        external_port: u16,
        lease_secs: u32,
        description: String,
    },
    /// Is `external_port` still mapped to `internal`?
    Check {
        internal: SocketAddrV4,
        external_port: u16,
    },
    /// DeletePortMapping UDP `external_port`; a port the router does not
    /// have counts as unmapped.
    Unmap { external_port: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `control`: the gateway's control URL host:port; `local`: our address
    /// toward it (the source address the router must map to); `external`:
    /// GetExternalIPAddress, None if it failed or gave 0.0.0.0 (why in
    /// `external_error`).
    Discovered {
        control: SocketAddr,
        local: Ipv4Addr,
        external: Option<IpAddr>,
        external_error: Option<String>,
    },
    Mapped {
        internal: SocketAddrV4,
        external_port: u16,
        lease_secs: u32,
    },
    Checked {
        external_port: u16,
        present: bool,
    },
    Unmapped {
        external_port: u16,
    },
    /// One line, e.g. "no UPnP gateway answered within 2 s" or
    /// "AddPortMapping 51820/udp on 10.1.0.1:5000: ...". Ends in "; dropped
    /// the gateway" when the gateway stopped answering.
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub id: u64,
    pub command: Command,
    pub outcome: Outcome,
}

/// The agent's handle on the worker thread.
pub struct Worker {
    /// None once `finish` or drop began: the thread then sees the queue close.
    commands: Option<SyncSender<(u64, Command)>>,
    replies: Receiver<Reply>,
    stop: StopRequest,
    /// Closes when the thread ends, however it ends: `finish` can wait on it
    /// with a deadline, which a JoinHandle cannot.
    exited: Receiver<()>,
    thread: Option<JoinHandle<()>>,
    /// Held here too: closing its descriptor as the thread dies would take
    /// the pending wake-up with it.
    _waker: Arc<Waker>,
}

/// Set once the agent stops, with the ports to unmap before the thread exits.
type StopRequest = Arc<Mutex<Option<Vec<u16>>>>;

impl Worker {
    /// Spawns the thread ("warren-upnp"). `waker` is woken after every reply.
    pub fn spawn(waker: Arc<Waker>) -> io::Result<Worker> {
        Worker::with_search(waker, Box::new(search_igd))
    }

    fn with_search(waker: Arc<Waker>, search: Search) -> io::Result<Worker> {
        let (commands, inbox) = mpsc::sync_channel(QUEUE_LEN);
        let (outbox, replies) = mpsc::channel();
        let (exit_signal, exited) = mpsc::channel();
        let stop = StopRequest::default();
        let (thread_waker, thread_stop) = (waker.clone(), stop.clone());
        let handle = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                let thread = Thread {
                    search,
                    gateway: None,
                    replies: outbox,
                    waker: thread_waker,
                    stop: thread_stop,
                    _exit_signal: exit_signal,
                };
                thread.run(inbox)
            })?;
        Ok(Worker {
            commands: Some(commands),
            replies,
            stop,
            exited,
            thread: Some(handle),
            _waker: waker,
        })
    }

    /// Never blocks; false if [`QUEUE_LEN`] commands are waiting already or
    /// the thread is gone.
    pub fn submit(&self, id: u64, command: Command) -> bool {
        self.commands
            .as_ref()
            .is_some_and(|c| c.try_send((id, command)).is_ok())
    }

    pub fn try_recv(&self) -> Option<Reply> {
        self.replies.try_recv().ok()
    }

    /// Clean stop: unmaps `unmaps`, then any Unmap still queued, and exits;
    /// other queued commands are dropped. Mappings the agent never heard of
    /// are undone too: those in replies it has not taken, and one granted by
    /// a Map that was still running. Waits at most `deadline` for the thread,
    /// so a hung router cannot hold up the agent's exit.
    pub fn finish(mut self, unmaps: &[u16], deadline: Duration) {
        let mut ports = unmaps.to_vec();
        {
            // Under the lock the thread sends replies with: a reply is either
            // drained here or sent after the stop, where the thread sees it.
            let mut stop = lock(&self.stop);
            while let Ok(reply) = self.replies.try_recv() {
                if let Outcome::Mapped { external_port, .. } = reply.outcome {
                    ports.push(external_port);
                }
            }
            *stop = Some(ports);
        }
        // Wakes a thread waiting for work.
        self.commands = None;
        match self.exited.recv_timeout(deadline) {
            Err(RecvTimeoutError::Timeout) => log!(
                "agent: UPnP worker still busy after {} ms; not waiting for it",
                deadline.as_millis()
            ),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(t) = self.thread.take() {
                    let _ = t.join();
                }
            }
        }
    }
}

impl Drop for Worker {
    /// Dropped without `finish`: the thread stops after its current command
    /// (still running queued Unmaps); nothing waits for it.
    fn drop(&mut self) {
        lock(&self.stop).get_or_insert_with(Vec::new);
        self.commands = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Finds a gateway: the SSDP search, or a simulated router in tests.
type Search = Box<dyn FnMut() -> Result<Box<dyn Gateway>, String> + Send>;

/// The worker thread's state.
struct Thread {
    search: Search,
    gateway: Option<Box<dyn Gateway>>,
    replies: Sender<Reply>,
    waker: Arc<Waker>,
    stop: StopRequest,
    /// Dropped with the thread, also while unwinding from a panic.
    _exit_signal: Sender<()>,
}

impl Drop for Thread {
    /// Also on a panic: the loop wakes, and finds `submit` failing.
    fn drop(&mut self) {
        let _ = self.waker.wake();
    }
}

impl Thread {
    fn run(mut self, inbox: Receiver<(u64, Command)>) {
        loop {
            let next = inbox.recv().ok();
            let stop = lock(&self.stop).clone();
            if let Some(unmaps) = stop {
                return self.wind_down(unmaps, next, &inbox);
            }
            let Some((id, command)) = next else { return };
            let outcome = self.execute(&command);
            let mut stop = lock(&self.stop);
            if let Some(unmaps) = stop.as_mut() {
                // Nobody will read this reply: a mapping it grants is undone.
                if let Outcome::Mapped { external_port, .. } = outcome {
                    unmaps.push(external_port);
                }
                let unmaps = unmaps.clone();
                drop(stop);
                return self.wind_down(unmaps, None, &inbox);
            }
            let _ = self.replies.send(Reply { id, command, outcome });
            drop(stop);
            let _ = self.waker.wake();
        }
    }

    /// The stop: the ports asked for, then the Unmaps still queued (cleanup
    /// too); everything else queued is moot once the agent goes.
    fn wind_down(
        &mut self,
        mut ports: Vec<u16>,
        next: Option<(u64, Command)>,
        inbox: &Receiver<(u64, Command)>,
    ) {
        for (_, command) in next.into_iter().chain(inbox.try_iter()) {
            if let Command::Unmap { external_port } = command {
                ports.push(external_port);
            }
        }
        let mut seen = HashSet::new();
        ports.retain(|p| seen.insert(*p));
        if self.gateway.is_none() && !ports.is_empty() {
            log!("agent: UPnP at exit: {NO_GATEWAY}; mappings of {ports:?} stay until their leases end");
            return;
        }
        for external_port in ports {
            if let Outcome::Failed(why) = self.execute(&Command::Unmap { external_port }) {
                log!("agent: UPnP at exit: {why}");
            }
        }
    }

    fn execute(&mut self, command: &Command) -> Outcome {
        let Some(gateway) = self.gateway.as_deref() else {
            return match command {
                Command::Discover => self.discover(),
                _ => Outcome::Failed(NO_GATEWAY.into()),
            };
        };
        let result = match command {
            Command::Discover => return self.discover(),
            Command::Map {
                internal,
                external_port,
                lease_secs,
                description,
            } => map(gateway, *internal, *external_port, *lease_secs, description),
            Command::Check {
                internal,
                external_port,
            } => check(gateway, *internal, *external_port),
            Command::Unmap { external_port } => unmap(gateway, *external_port),
        };
        match result {
            Ok(outcome) => outcome,
            Err(f) if f.transport => {
                self.gateway = None;
                Outcome::Failed(one_line(&format!("{}; dropped the gateway", f.text)))
            }
            Err(f) => Outcome::Failed(one_line(&f.text)),
        }
    }

    fn discover(&mut self) -> Outcome {
        // A search that finds nothing also forgets the old gateway: it did not
        // answer this time either.
        self.gateway = None;
        let gateway = match (self.search)() {
            Ok(g) => g,
            Err(why) => return Outcome::Failed(one_line(&why)),
        };
        let control = gateway.control();
        let local = match local_address_toward(control) {
            Ok(a) => a,
            Err(e) => {
                return Outcome::Failed(one_line(&format!(
                    "no IPv4 route to the UPnP gateway {control}: {e}"
                )));
            }
        };
        let what = format!("GetExternalIPAddress on {control}");
        let (external, external_error) = match gateway.external_ip() {
            Ok(ip) if ip.is_unspecified() => (None, Some(format!("{what}: no external address ({ip})"))),
            Ok(ip) => (Some(ip), None),
            Err(e @ CallError::Transport(_)) => {
                return Outcome::Failed(one_line(&format!("{what}: {e}")));
            }
            // Not fatal: the mapping calls may still work, and the driver
            // learns the address another way (STUN).
            Err(e) => (None, Some(one_line(&format!("{what}: {e}")))),
        };
        self.gateway = Some(gateway);
        Outcome::Discovered {
            control,
            local,
            external,
            external_error,
        }
    }
}

/// Why one command failed.
struct Failure {
    text: String,
    /// The gateway did not answer: it is dropped.
    transport: bool,
}

fn failed(what: String, e: CallError) -> Failure {
    Failure {
        transport: matches!(e, CallError::Transport(_)),
        text: format!("{what}: {e}"),
    }
}

fn map(
    gateway: &dyn Gateway,
    internal: SocketAddrV4,
    want: u16,
    mut lease_secs: u32,
    description: &str,
) -> Result<Outcome, Failure> {
    let control = gateway.control();
    let add = |port: u16| format!("AddPortMapping {port}/udp on {control}");
    if want == 0 || internal.port() == 0 {
        return Err(Failure {
            text: format!("{}: port 0 cannot be mapped (to {internal})", add(want)),
            transport: false,
        });
    }
    let started = Instant::now();
    let mut fallbacks = (1..=FALLBACK_PORTS).filter_map(|k| want.checked_add(k));
    let mut asked_any = false;
    let mut same_ports_only = false;
    let mut port = want;
    let mapped = |external_port, lease_secs| {
        Ok(Outcome::Mapped {
            internal,
            external_port,
            lease_secs,
        })
    };
    loop {
        match gateway.add_port(port, internal, lease_secs, description) {
            Ok(()) => return mapped(port, lease_secs),
            Err(CallError::Upnp(ONLY_PERMANENT_LEASES, _)) if lease_secs != 0 => {
                lease_secs = 0;
                continue;
            }
            Err(CallError::Upnp(SAME_PORT_VALUES_REQUIRED, _)) if port != internal.port() => {
                same_ports_only = true;
                port = internal.port();
                continue;
            }
            Err(CallError::Upnp(CONFLICT, _)) => {}
            Err(e) => return Err(failed(add(port), e)),
        }
        // `port` is someone else's: let the router choose (IGDv2), else try
        // the next few.
        if !asked_any {
            asked_any = true;
            let any = format!("AddAnyPortMapping for {internal} on {control}");
            match gateway.add_any_port(internal, lease_secs, description) {
                Ok(granted) => return mapped(granted, lease_secs),
                Err(CallError::Unsupported) => {}
                Err(CallError::Upnp(ONLY_PERMANENT_LEASES, _)) if lease_secs != 0 => {
                    match gateway.add_any_port(internal, 0, description) {
                        Ok(granted) => return mapped(granted, 0),
                        Err(e) => return Err(failed(format!("{any} (permanent lease)"), e)),
                    }
                }
                Err(e) => return Err(failed(any, e)),
            }
        }
        let next = fallbacks.next().filter(|_| !same_ports_only);
        match next {
            Some(p) if started.elapsed() < MAP_BUDGET => port = p,
            _ => {
                let tried = if port == want || same_ports_only {
                    port.to_string()
                } else {
                    format!("{want}-{port}")
                };
                let why = if same_ports_only {
                    "the router maps only to the same port number (SamePortValuesRequired)".into()
                } else if next.is_some() {
                    format!("out of time after {} s", MAP_BUDGET.as_secs())
                } else {
                    "the router cannot pick a port (no AddAnyPortMapping)".into()
                };
                return Err(Failure {
                    text: format!(
                        "AddPortMapping {tried}/udp on {control}: taken by another client \
                         (ConflictInMappingEntry), and {why}"
                    ),
                    transport: false,
                });
            }
        }
    }
}

fn check(gateway: &dyn Gateway, internal: SocketAddrV4, port: u16) -> Result<Outcome, Failure> {
    let control = gateway.control();
    let started = Instant::now();
    let checked = |present| {
        Ok(Outcome::Checked {
            external_port: port,
            present,
        })
    };
    for index in 0..MAX_CHECKED_ENTRIES {
        if index > 0 && started.elapsed() >= CHECK_BUDGET {
            return Err(Failure {
                text: format!(
                    "GetGenericPortMappingEntry on {control}: {port}/udp not among the first {index} \
                     entries read in {} s",
                    CHECK_BUDGET.as_secs()
                ),
                transport: false,
            });
        }
        let entry = match gateway.entry(index) {
            Ok(e) => e,
            // Past the end of the table: 713 by the standard, 714 on some.
            Err(CallError::Upnp(INDEX_INVALID | NO_SUCH_ENTRY, _)) => return checked(false),
            Err(e) => {
                return Err(failed(
                    format!("GetGenericPortMappingEntry {index} on {control}"),
                    e,
                ));
            }
        };
        if entry.udp && entry.external_port == port {
            let ours = entry.internal_client.trim().parse::<Ipv4Addr>() == Ok(*internal.ip())
                && entry.internal_port == internal.port();
            return checked(ours && entry.enabled);
        }
    }
    Err(Failure {
        text: format!(
            "GetGenericPortMappingEntry on {control}: {port}/udp not among the first \
             {MAX_CHECKED_ENTRIES} entries"
        ),
        transport: false,
    })
}

fn unmap(gateway: &dyn Gateway, port: u16) -> Result<Outcome, Failure> {
    match gateway.remove_port(port) {
        Ok(()) | Err(CallError::Upnp(NO_SUCH_ENTRY, _)) => Ok(Outcome::Unmapped { external_port: port }),
        Err(e) => Err(failed(
            format!("DeletePortMapping {port}/udp on {}", gateway.control()),
            e,
        )),
    }
}

/// Our source address toward the gateway: `connect` on a UDP socket only
/// consults the routing table, nothing is sent.
fn local_address_toward(gateway: SocketAddr) -> io::Result<Ipv4Addr> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
    socket.connect(gateway)?;
    match socket.local_addr()?.ip() {
        IpAddr::V4(a) => Ok(a),
        IpAddr::V6(a) => Err(io::Error::other(format!("{a} is not IPv4"))),
    }
}

/// Whitespace runs (the newlines of a SOAP body) become one space.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
fn upnp(code: u16, name: &str) -> CallError {
    CallError::Upnp(code, name.into())
}

/// How one call to the gateway failed.
// Made only by a gateway: the real one (feature `upnp`) or the tests' router.
#[cfg_attr(not(feature = "upnp"), allow(dead_code))]
#[derive(Debug, Clone, PartialEq, Eq)]
enum CallError {
    /// No answer: refused, timed out, reset, not HTTP. The gateway is dropped.
    Transport(String),
    /// The gateway answered with a UPnP error: code, description.
    Upnp(u16, String),
    /// The gateway does not offer the action.
    Unsupported,
    /// It answered something else that we could not read.
    Other(String),
}

impl fmt::Display for CallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallError::Transport(why) | CallError::Other(why) => f.write_str(why),
            CallError::Upnp(code, description) => write!(f, "UPnP error {code} {description}"),
            CallError::Unsupported => f.write_str("not offered by the gateway"),
        }
    }
}

/// One entry of the router's port mapping table.
struct Entry {
    external_port: u16,
    udp: bool,
    internal_client: String,
    internal_port: u16,
    enabled: bool,
}

/// The calls the worker makes, each bounded: a real gateway (igd.rs), or a
/// simulated router in tests.
trait Gateway {
    /// The control URL's host:port.
    fn control(&self) -> SocketAddr;
    fn external_ip(&self) -> Result<IpAddr, CallError>;
    fn add_port(
        &self,
        external_port: u16,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Result<(), CallError>;
    /// IGDv2 AddAnyPortMapping: the router picks the port. [`CallError::Unsupported`] on IGDv1.
    fn add_any_port(
        &self,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Result<u16, CallError>;
    /// GetGenericPortMappingEntry `index`.
    fn entry(&self, index: u32) -> Result<Entry, CallError>;
    fn remove_port(&self, external_port: u16) -> Result<(), CallError>;
}

/// Without the `upnp` feature the worker has no client: every Discover fails.
#[cfg(not(feature = "upnp"))]
fn search_igd() -> Result<Box<dyn Gateway>, String> {
    Err(NOT_BUILT.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The client's parsers on miniupnpd's own answers (fixtures/capture.sh),
    /// mutated and cut: never a panic, and the mutations still reach the
    /// success paths, not only the errors.
    #[cfg(feature = "upnp")]
    #[test]
    fn client_parsers_take_mutated_gateway_answers() {
        let fixture = |name: &str| {
            let path = format!("{}/src/portmap/upnp/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let answers: Vec<Vec<u8>> = ["add", "add-conflict", "entry", "entry-past-end", "external-ip"]
            .iter()
            .map(|n| fixture(&format!("soap-{n}.http")))
            .collect();
        let body = |http: &[u8]| {
            let at = http.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            http[at + 4..].to_vec()
        };
        let description = fixture("description-miniupnpd.xml");
        let utf8 = |parse: fn(&str) -> bool| move |b: &[u8]| std::str::from_utf8(b).is_ok_and(parse);
        let mut next = crate::testutil::xorshift(0x1900);
        let mut mutate = |seeds: &[Vec<u8>], parse: &dyn Fn(&[u8]) -> bool| {
            crate::testutil::mutated_accepted(seeds, 500, &mut next, parse)
        };
        let ssdp = mutate(&[fixture("ssdp-miniupnpd.txt")], &ssdp::fuzz_parse);
        let http = mutate(&answers, &http::fuzz_parse);
        let mut xml_seeds: Vec<Vec<u8>> = answers.iter().map(|a| body(a)).collect();
        xml_seeds.push(description.clone());
        let xml = mutate(&xml_seeds, &utf8(xml::fuzz_read));
        let desc = mutate(&[description], &utf8(description::fuzz_parse));
        let entry = [vec![0], body(&answers[2])].concat();
        let soap = mutate(&[entry], &soap::fuzz_parse);
        for (what, accepted, of) in [
            ("ssdp", ssdp, 500),
            ("http", http, 2_500),
            ("xml", xml, 3_000),
            ("description", desc, 500),
            ("soap", soap, 500),
        ] {
            assert!(
                accepted > of / 20,
                "{what}: only {accepted} of {of} mutated inputs accepted"
            );
        }
    }
    use mio::{Events, Poll, Token};
    use std::collections::BTreeMap;

    const TOKEN: Token = Token(3);
    const DEADLINE: Duration = Duration::from_secs(30);
    const CONTROL: &str = "127.0.0.1:5000";
    const WAN: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 20));

    fn me(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port)
    }

    fn other(port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(Ipv4Addr::new(127, 0, 0, 9), port)
    }

    fn map_cmd(internal: SocketAddrV4, external_port: u16) -> Command {
        Command::Map {
            internal,
            external_port,
            lease_secs: 3600,
            description: "warren test".into(),
        }
    }

    /// A call that blocks until released: `entered` is told when it starts.
    struct Hold {
        call: String,
        entered: Sender<()>,
        release: Receiver<()>,
    }

    /// A router's state; every call is logged ("search", "add 51820", ...).
    struct Sim {
        table: BTreeMap<u16, SocketAddrV4>,
        any_port: bool,
        permanent_only: bool,
        same_ports_only: bool,
        /// Every call fails as with a router that has gone away.
        down: bool,
        external: Result<IpAddr, CallError>,
        calls: Vec<String>,
        hold: Option<Hold>,
    }

    type SharedSim = Arc<Mutex<Sim>>;

    fn sim() -> SharedSim {
        Arc::new(Mutex::new(Sim {
            table: BTreeMap::new(),
            any_port: false,
            permanent_only: false,
            same_ports_only: false,
            down: false,
            external: Ok(WAN),
            calls: Vec::new(),
            hold: None,
        }))
    }

    /// Makes the next call named `call` block; returns (entered, release).
    fn hold(s: &SharedSim, call: &str) -> (Receiver<()>, Sender<()>) {
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel();
        lock(s).hold = Some(Hold {
            call: call.into(),
            entered: entered_tx,
            release: release_rx,
        });
        (entered, release)
    }

    /// Logs `call`, blocks if it is held, fails if the router is down.
    fn enter(s: &SharedSim, call: String) -> Result<MutexGuard<'_, Sim>, CallError> {
        let mut g = lock(s);
        g.calls.push(call.clone());
        if g.hold.as_ref().is_some_and(|h| h.call == call) {
            let h = g.hold.take().unwrap();
            drop(g);
            let _ = h.entered.send(());
            let _ = h.release.recv();
            g = lock(s);
        }
        if g.down {
            return Err(CallError::Transport("Connection refused (os error 111)".into()));
        }
        Ok(g)
    }

    struct SimGateway(SharedSim);

    impl Gateway for SimGateway {
        fn control(&self) -> SocketAddr {
            CONTROL.parse().unwrap()
        }
        fn external_ip(&self) -> Result<IpAddr, CallError> {
            enter(&self.0, "external".into())?.external.clone()
        }
        fn add_port(&self, port: u16, internal: SocketAddrV4, lease: u32, _: &str) -> Result<(), CallError> {
            let mut s = enter(&self.0, format!("add {port}"))?;
            if s.permanent_only && lease != 0 {
                return Err(upnp(ONLY_PERMANENT_LEASES, "OnlyPermanentLeasesSupported"));
            }
            if s.same_ports_only && port != internal.port() {
                return Err(upnp(SAME_PORT_VALUES_REQUIRED, "SamePortValuesRequired"));
            }
            match s.table.get(&port) {
                Some(holder) if *holder != internal => Err(upnp(CONFLICT, "ConflictInMappingEntry")),
                _ => {
                    s.table.insert(port, internal);
                    Ok(())
                }
            }
        }
        fn add_any_port(&self, internal: SocketAddrV4, _: u32, _: &str) -> Result<u16, CallError> {
            let mut s = enter(&self.0, "add-any".into())?;
            if !s.any_port {
                return Err(CallError::Unsupported);
            }
            let port = (60000..).find(|p| !s.table.contains_key(p)).unwrap();
            s.table.insert(port, internal);
            Ok(port)
        }
        fn entry(&self, index: u32) -> Result<Entry, CallError> {
            let s = enter(&self.0, format!("entry {index}"))?;
            let (port, internal) = s
                .table
                .iter()
                .nth(index as usize)
                .ok_or_else(|| upnp(INDEX_INVALID, "SpecifiedArrayIndexInvalid"))?;
            Ok(Entry {
                external_port: *port,
                udp: true,
                internal_client: internal.ip().to_string(),
                internal_port: internal.port(),
                enabled: true,
            })
        }
        fn remove_port(&self, port: u16) -> Result<(), CallError> {
            let mut s = enter(&self.0, format!("remove {port}"))?;
            match s.table.remove(&port) {
                Some(_) => Ok(()),
                None => Err(upnp(NO_SUCH_ENTRY, "NoSuchEntryInArray")),
            }
        }
    }

    fn spawn_sim(s: &SharedSim) -> (Poll, Worker) {
        let poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).unwrap());
        let s = s.clone();
        let search: Search = Box::new(move || {
            drop(enter(&s, "search".into()).map_err(|_| "no UPnP gateway answered within 2 s".to_string())?);
            Ok(Box::new(SimGateway(s.clone())))
        });
        (poll, Worker::with_search(waker, search).unwrap())
    }

    /// The next reply, waiting for the waker between tries.
    fn next_reply(poll: &mut Poll, w: &Worker) -> Reply {
        let end = Instant::now() + DEADLINE;
        let mut events = Events::with_capacity(4);
        loop {
            if let Some(r) = w.try_recv() {
                return r;
            }
            assert!(Instant::now() < end, "no reply from the UPnP worker");
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        }
    }

    fn run(poll: &mut Poll, w: &Worker, command: Command) -> Outcome {
        assert!(w.submit(1, command.clone()));
        let r = next_reply(poll, w);
        assert_eq!((r.id, &r.command), (1, &command));
        r.outcome
    }

    fn calls(s: &SharedSim) -> Vec<String> {
        std::mem::take(&mut lock(s).calls)
    }

    /// Releases the held call once `finish` has asked the worker to stop.
    fn release_after_stop(w: &Worker, release: Sender<()>) -> JoinHandle<()> {
        let stop = w.stop.clone();
        std::thread::spawn(move || {
            let end = Instant::now() + DEADLINE;
            while lock(&stop).is_none() && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = release.send(());
        })
    }

    #[test]
    fn commands_before_discovery_fail_without_touching_the_network() {
        // The real worker: with no Discover, no packet is ever sent.
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).unwrap());
        let w = Worker::spawn(waker).unwrap();
        for command in [
            map_cmd(me(51820), 51820),
            Command::Check {
                internal: me(51820),
                external_port: 51820,
            },
            Command::Unmap { external_port: 51820 },
        ] {
            assert_eq!(run(&mut poll, &w, command), Outcome::Failed(NO_GATEWAY.into()));
        }
        w.finish(&[51820], DEADLINE);
    }

    #[test]
    fn queue_is_bounded_and_submit_never_blocks() {
        let s = sim();
        let (entered, release) = hold(&s, "search");
        let (mut poll, w) = spawn_sim(&s);
        assert!(w.submit(0, Command::Discover));
        entered.recv_timeout(DEADLINE).unwrap();
        let started = Instant::now();
        for id in 1..=QUEUE_LEN as u64 {
            assert!(w.submit(id, Command::Unmap { external_port: 7 }), "command {id}");
        }
        assert!(!w.submit(99, Command::Unmap { external_port: 7 }));
        assert!(started.elapsed() < Duration::from_secs(1));
        release.send(()).unwrap();
        assert!(matches!(
            next_reply(&mut poll, &w).outcome,
            Outcome::Discovered { .. }
        ));
        for id in 1..=QUEUE_LEN as u64 {
            let r = next_reply(&mut poll, &w);
            assert_eq!((r.id, r.outcome), (id, Outcome::Unmapped { external_port: 7 }));
        }
        assert!(w.try_recv().is_none());
        // Room again.
        assert!(w.submit(100, Command::Discover));
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn discover_map_check_unmap() {
        let s = sim();
        let (mut poll, w) = spawn_sim(&s);
        assert_eq!(
            run(&mut poll, &w, Command::Discover),
            Outcome::Discovered {
                control: CONTROL.parse().unwrap(),
                local: Ipv4Addr::LOCALHOST,
                external: Some(WAN),
                external_error: None,
            }
        );
        assert_eq!(
            run(&mut poll, &w, map_cmd(me(51820), 51820)),
            Outcome::Mapped {
                internal: me(51820),
                external_port: 51820,
                lease_secs: 3600,
            }
        );
        assert_eq!(lock(&s).table.get(&51820), Some(&me(51820)));
        let check = |internal| Command::Check {
            internal,
            external_port: 51820,
        };
        let present = |present| Outcome::Checked {
            external_port: 51820,
            present,
        };
        assert_eq!(run(&mut poll, &w, check(me(51820))), present(true));
        assert_eq!(run(&mut poll, &w, check(me(1))), present(false));
        lock(&s).table.insert(40000, other(40000));
        assert_eq!(run(&mut poll, &w, check(me(51820))), present(true));
        for _ in 0..2 {
            // The second time the router no longer has it: unmapped all the same.
            assert_eq!(
                run(&mut poll, &w, Command::Unmap { external_port: 51820 }),
                Outcome::Unmapped { external_port: 51820 }
            );
        }
        assert_eq!(run(&mut poll, &w, check(me(51820))), present(false));
        assert!(!lock(&s).table.contains_key(&51820));
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn a_taken_port_is_replaced_by_one_the_router_picks_or_the_next_free() {
        let s = sim();
        let (mut poll, w) = spawn_sim(&s);
        run(&mut poll, &w, Command::Discover);
        {
            let mut g = lock(&s);
            g.any_port = true;
            g.table.insert(40000, other(40000));
        }
        calls(&s);
        let granted = |port| Outcome::Mapped {
            internal: me(51820),
            external_port: port,
            lease_secs: 3600,
        };
        assert_eq!(run(&mut poll, &w, map_cmd(me(51820), 40000)), granted(60000));
        assert_eq!(calls(&s), ["add 40000", "add-any"]);

        // IGDv1: the next ports in turn.
        lock(&s).any_port = false;
        lock(&s).table.insert(40001, other(40001));
        assert_eq!(run(&mut poll, &w, map_cmd(me(51820), 40000)), granted(40002));
        assert_eq!(calls(&s), ["add 40000", "add-any", "add 40001", "add 40002"]);

        for p in 40002..=40000 + FALLBACK_PORTS {
            lock(&s).table.insert(p, other(p));
        }
        match run(&mut poll, &w, map_cmd(me(51820), 40000)) {
            Outcome::Failed(why) => assert!(
                why.contains("40000-40004/udp on 127.0.0.1:5000") && why.contains("Conflict"),
                "{why}"
            ),
            o => panic!("{o:?}"),
        }
        // The refusals were answers: the gateway is kept.
        assert_eq!(
            run(&mut poll, &w, Command::Unmap { external_port: 60000 }),
            Outcome::Unmapped { external_port: 60000 }
        );
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn a_router_that_takes_only_permanent_leases_gets_lease_0() {
        let s = sim();
        lock(&s).permanent_only = true;
        let (mut poll, w) = spawn_sim(&s);
        run(&mut poll, &w, Command::Discover);
        assert_eq!(
            run(&mut poll, &w, map_cmd(me(51820), 51820)),
            Outcome::Mapped {
                internal: me(51820),
                external_port: 51820,
                lease_secs: 0,
            }
        );
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn a_router_that_maps_only_to_the_same_port_gets_the_internal_one() {
        let s = sim();
        lock(&s).same_ports_only = true;
        let (mut poll, w) = spawn_sim(&s);
        run(&mut poll, &w, Command::Discover);
        calls(&s);
        assert_eq!(
            run(&mut poll, &w, map_cmd(me(51820), 40000)),
            Outcome::Mapped {
                internal: me(51820),
                external_port: 51820,
                lease_secs: 3600,
            }
        );
        lock(&s).table.insert(51821, other(51821));
        match run(&mut poll, &w, map_cmd(me(51821), 40000)) {
            Outcome::Failed(why) => assert!(why.contains("SamePortValuesRequired"), "{why}"),
            o => panic!("{o:?}"),
        }
        // No neighbours tried: they cannot be the same port either.
        assert_eq!(
            calls(&s),
            ["add 40000", "add 51820", "add 40000", "add 51821", "add-any"]
        );
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn a_gateway_that_stops_answering_is_dropped_until_discovered_again() {
        let s = sim();
        let (mut poll, w) = spawn_sim(&s);
        run(&mut poll, &w, Command::Discover);
        lock(&s).down = true;
        match run(&mut poll, &w, map_cmd(me(51820), 51820)) {
            Outcome::Failed(why) => assert_eq!(
                why,
                "AddPortMapping 51820/udp on 127.0.0.1:5000: Connection refused (os error 111); \
                 dropped the gateway"
            ),
            o => panic!("{o:?}"),
        }
        calls(&s);
        let check = Command::Check {
            internal: me(51820),
            external_port: 51820,
        };
        assert_eq!(
            run(&mut poll, &w, check.clone()),
            Outcome::Failed(NO_GATEWAY.into())
        );
        assert!(calls(&s).is_empty(), "no call without a gateway");
        assert!(matches!(
            run(&mut poll, &w, Command::Discover),
            Outcome::Failed(why) if why == "no UPnP gateway answered within 2 s"
        ));
        lock(&s).down = false;
        assert!(matches!(
            run(&mut poll, &w, Command::Discover),
            Outcome::Discovered { .. }
        ));
        assert!(matches!(
            run(&mut poll, &w, check),
            Outcome::Checked { present: false, .. }
        ));
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn a_refused_external_address_is_reported_on_one_line_and_the_gateway_kept() {
        let s = sim();
        lock(&s).external = Err(upnp(501, "Action\n  Failed\r\n"));
        let (mut poll, w) = spawn_sim(&s);
        assert_eq!(
            run(&mut poll, &w, Command::Discover),
            Outcome::Discovered {
                control: CONTROL.parse().unwrap(),
                local: Ipv4Addr::LOCALHOST,
                external: None,
                external_error: Some(
                    "GetExternalIPAddress on 127.0.0.1:5000: UPnP error 501 Action Failed".into()
                ),
            }
        );
        lock(&s).external = Ok(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        assert!(matches!(
            run(&mut poll, &w, Command::Discover),
            Outcome::Discovered {
                external: None,
                external_error: Some(_),
                ..
            }
        ));
        assert!(matches!(
            run(&mut poll, &w, map_cmd(me(51820), 51820)),
            Outcome::Mapped { .. }
        ));
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn finish_is_bounded_when_the_worker_is_stuck() {
        let s = sim();
        let (entered, release) = hold(&s, "search");
        let (_poll, w) = spawn_sim(&s);
        assert!(w.submit(1, Command::Discover));
        entered.recv_timeout(DEADLINE).unwrap();
        let started = Instant::now();
        w.finish(&[51820], Duration::from_millis(200));
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(200) && took < Duration::from_secs(2),
            "{took:?}"
        );
        // Let the stray thread go: no gateway, so the unmap fails and it exits.
        drop(release);
    }

    #[test]
    fn finish_unmaps_first_then_queued_unmaps_and_drops_the_rest() {
        let s = sim();
        let (mut poll, w) = spawn_sim(&s);
        run(&mut poll, &w, Command::Discover);
        for p in [100, 200, 300] {
            run(&mut poll, &w, map_cmd(me(p), p));
        }
        let (entered, release) = hold(&s, "entry 0");
        assert!(w.submit(
            2,
            Command::Check {
                internal: me(100),
                external_port: 100,
            }
        ));
        entered.recv_timeout(DEADLINE).unwrap();
        calls(&s);
        for (id, command) in [
            (3, map_cmd(me(400), 400)),
            (4, Command::Unmap { external_port: 200 }),
            (5, Command::Discover),
            (6, Command::Unmap { external_port: 100 }),
        ] {
            assert!(w.submit(id, command));
        }
        let releaser = release_after_stop(&w, release);
        w.finish(&[300, 100], DEADLINE);
        releaser.join().unwrap();
        assert_eq!(calls(&s), ["remove 300", "remove 100", "remove 200"]);
        assert!(lock(&s).table.is_empty());
    }

    #[test]
    fn finish_undoes_mappings_the_agent_never_heard_of() {
        let s = sim();
        let (mut poll, w) = spawn_sim(&s);
        run(&mut poll, &w, Command::Discover);
        // One granted in a reply not yet taken...
        assert!(w.submit(2, map_cmd(me(100), 100)));
        let end = Instant::now() + DEADLINE;
        while !lock(&s).table.contains_key(&100) {
            assert!(Instant::now() < end);
            std::thread::sleep(Duration::from_millis(5));
        }
        // ...and one still being asked for when the agent stops.
        let (entered, release) = hold(&s, "add 200");
        assert!(w.submit(3, map_cmd(me(200), 200)));
        entered.recv_timeout(DEADLINE).unwrap();
        let releaser = release_after_stop(&w, release);
        w.finish(&[], DEADLINE);
        releaser.join().unwrap();
        assert!(lock(&s).table.is_empty(), "{:?}", lock(&s).table);
        let c = calls(&s);
        assert!(
            c.ends_with(&["add 200".to_string(), "remove 100".into(), "remove 200".into()]),
            "{c:?}"
        );
    }

    #[test]
    fn a_dropped_worker_stops_its_thread() {
        let s = sim();
        let (entered, release) = hold(&s, "search");
        let (_poll, w) = spawn_sim(&s);
        assert!(w.submit(1, Command::Discover));
        assert!(w.submit(2, Command::Discover));
        entered.recv_timeout(DEADLINE).unwrap();
        // Keep the receiver that the thread's exit closes.
        let mut w = w;
        let exited = std::mem::replace(&mut w.exited, mpsc::channel().1);
        drop(w);
        release.send(()).unwrap();
        assert_eq!(exited.recv_timeout(DEADLINE), Err(RecvTimeoutError::Disconnected));
        assert_eq!(
            calls(&s),
            ["search", "external"],
            "the queued Discover was dropped"
        );
    }

    #[test]
    fn a_worker_that_died_refuses_commands_and_wakes_the_loop() {
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).unwrap());
        let w = Worker::with_search(waker, Box::new(|| panic!("upnp test: worker dies"))).unwrap();
        assert!(w.submit(1, Command::Discover));
        let mut events = Events::with_capacity(4);
        let end = Instant::now() + DEADLINE;
        while w.submit(2, Command::Discover) {
            assert!(Instant::now() < end, "the worker did not die");
            poll.poll(&mut events, Some(Duration::from_millis(100))).unwrap();
        }
        assert!(w.try_recv().is_none());
        w.finish(&[], DEADLINE);
    }

    #[test]
    fn one_line_collapses() {
        assert_eq!(one_line(" a\r\n  b\tc "), "a b c");
    }

    /// Against Debian's miniupnpd in the network lab, run by
    /// integration/tests/portmap_upnp_worker.sh inside the LAN host's
    /// namespace. WARREN_LAB_HOOK is a command the test calls back with
    /// `nft-has PORT`, `nft-lacks PORT` (the router's forward) and `send PORT`
    /// (a datagram from the internet to the router's WAN address).
    #[test]
    #[ignore = "needs the network lab: integration/run lab portmap_upnp_worker"]
    fn lab_miniupnpd_round_trip() {
        fn var<T: std::str::FromStr>(name: &str) -> T {
            let v = std::env::var(name).unwrap_or_else(|_| panic!("{name} not set"));
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v:?} does not parse"))
        }
        let gateway: Ipv4Addr = var("WARREN_LAB_GATEWAY");
        let wan: IpAddr = var("WARREN_LAB_EXTERNAL");
        let local: Ipv4Addr = var("WARREN_LAB_LOCAL");
        let sender: IpAddr = var("WARREN_LAB_SENDER");
        let taken: u16 = var("WARREN_LAB_TAKEN");
        let hook_cmd: String = var("WARREN_LAB_HOOK");
        let hook = |verb: &str, port: u16| {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("{hook_cmd} {verb} {port}"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "hook {verb} {port}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).unwrap());
        let w = Worker::spawn(waker).unwrap();

        let outcome = run(&mut poll, &w, Command::Discover);
        println!("Discover: {outcome:?}");
        match outcome {
            Outcome::Discovered {
                control,
                local: l,
                external,
                ..
            } => {
                assert_eq!(control.ip(), IpAddr::V4(gateway));
                assert_eq!(l, local);
                assert_eq!(external, Some(wan));
            }
            o => panic!("{o:?}"),
        }

        let socket = UdpSocket::bind((local, 51820)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let internal = SocketAddrV4::new(local, 51820);
        let map = |external_port| Command::Map {
            internal,
            external_port,
            lease_secs: 600,
            description: "warren lab".into(),
        };
        let outcome = run(&mut poll, &w, map(51820));
        println!("Map 51820: {outcome:?}");
        assert_eq!(
            outcome,
            Outcome::Mapped {
                internal,
                external_port: 51820,
                lease_secs: 600,
            }
        );
        hook("nft-has", 51820);
        let mut got = None;
        for _ in 0..5 {
            hook("send", 51820);
            let mut buf = [0u8; 64];
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                got = Some((String::from_utf8_lossy(&buf[..n]).into_owned(), from.ip()));
                break;
            }
        }
        println!("datagram through {wan}:51820: {got:?}");
        assert_eq!(got, Some(("warren-lab 51820".to_string(), sender)));

        let check = |internal, external_port| Command::Check {
            internal,
            external_port,
        };
        let present = |external_port, present| Outcome::Checked {
            external_port,
            present,
        };
        assert_eq!(run(&mut poll, &w, check(internal, 51820)), present(51820, true));
        assert_eq!(
            run(&mut poll, &w, check(SocketAddrV4::new(local, 1), 51820)),
            present(51820, false)
        );
        assert_eq!(run(&mut poll, &w, check(internal, taken)), present(taken, false));
        assert_eq!(
            run(&mut poll, &w, Command::Unmap { external_port: 51820 }),
            Outcome::Unmapped { external_port: 51820 }
        );
        hook("nft-lacks", 51820);
        assert_eq!(run(&mut poll, &w, check(internal, 51820)), present(51820, false));
        println!("Check and Unmap 51820: ok");

        let outcome = run(&mut poll, &w, map(taken));
        println!("Map {taken} (held by another LAN host): {outcome:?}");
        match outcome {
            Outcome::Mapped { external_port, .. } => {
                assert_ne!(external_port, taken);
                hook("nft-has", external_port);
                hook("nft-has", taken);
                w.finish(&[external_port], DEADLINE);
                hook("nft-lacks", external_port);
                hook("nft-has", taken);
                println!("finish unmapped {external_port}");
            }
            Outcome::Failed(why) => {
                assert!(why.contains(&taken.to_string()) && !why.contains('\n'), "{why}");
                w.finish(&[], DEADLINE);
            }
            o => panic!("{o:?}"),
        }

        // A gateway that stops answering: refused at once, then silent. (A
        // fresh Poll: mio allows one Waker per Poll.)
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).unwrap());
        let w = Worker::spawn(waker).unwrap();
        let control = match run(&mut poll, &w, Command::Discover) {
            Outcome::Discovered { control, .. } => control,
            o => panic!("{o:?}"),
        };
        let timed = |poll: &mut Poll, command| {
            let started = Instant::now();
            let outcome = run(poll, &w, command);
            (outcome, started.elapsed())
        };
        let gone = |outcome: &Outcome| matches!(outcome, Outcome::Failed(why) if why.ends_with("; dropped the gateway"));
        let no_gateway = Outcome::Failed(NO_GATEWAY.into());
        hook("refuse", control.port());
        let (outcome, took) = timed(&mut poll, check(internal, 51820));
        println!(
            "Check, TCP {} refused: {outcome:?} after {took:?}",
            control.port()
        );
        assert!(
            gone(&outcome) && took < Duration::from_secs(2),
            "{outcome:?} after {took:?}"
        );
        assert_eq!(run(&mut poll, &w, check(internal, 51820)), no_gateway);
        hook("unblock", control.port());
        assert!(matches!(
            run(&mut poll, &w, Command::Discover),
            Outcome::Discovered { .. }
        ));
        hook("silence", control.port());
        let (outcome, took) = timed(&mut poll, map(51820));
        println!("Map, TCP {} silent: {outcome:?} after {took:?}", control.port());
        assert!(gone(&outcome), "{outcome:?}");
        assert!(took < SOAP_TIMEOUT + Duration::from_secs(2), "{took:?}");
        assert_eq!(run(&mut poll, &w, check(internal, 51820)), no_gateway);
        let (outcome, took) = timed(&mut poll, Command::Discover);
        println!(
            "Discover, TCP {} silent: {outcome:?} after {took:?}",
            control.port()
        );
        assert!(matches!(outcome, Outcome::Failed(_)), "{outcome:?}");
        assert!(took < DISCOVER_TIMEOUT + Duration::from_secs(1), "{took:?}");
        w.finish(&[], DEADLINE);
        hook("unblock", control.port());

        // An exit node in use: the agent's policy rules send everything but
        // the LAN's prefix and marked sockets into the mesh (a tun here). The
        // search still finds the gateway, as the agent marks its sockets.
        hook("exit-on", 0);
        crate::sockopt::set_own_mark(crate::route::WG_FWMARK);
        let mut poll = Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), TOKEN).unwrap());
        let w = Worker::spawn(waker).unwrap();
        let outcome = run(&mut poll, &w, Command::Discover);
        println!("Discover with an exit node's routing: {outcome:?}");
        assert!(
            matches!(outcome, Outcome::Discovered { control: c, .. } if c.ip() == IpAddr::V4(gateway)),
            "{outcome:?}"
        );
        w.finish(&[], DEADLINE);
        hook("exit-off", 0);
    }
}

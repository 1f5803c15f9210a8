//! The agent's local control socket: `warren status` and `warren down` talk
//! to the running agent through it. Root only: the socket is 0600 in a 0700
//! directory, and every client's uid is checked.

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use super::paths::PathKind;
use super::relay_path::RelayStatus;
use crate::keys::Key;

pub const DEFAULT_SOCKET: &str = "/run/warren/warren.sock";
/// `warren down` waits for the interface to be deleted, which can take a few seconds in userspace.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(20);
pub const MAX_REQUEST_LEN: usize = 4096;
/// What a user who is not root is told, whether the socket's mode stopped
/// them (EACCES) or the agent's uid check did.
pub const NOT_ROOT: &str = "permission denied: this needs root (the agent's socket is root-only)";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    Down,
    RotateKey,
    /// A sealed round trip to a peer's agent, over the direct path when there
    /// is one, else through its relay: name, mesh address or key.
    Ping {
        peer: String,
    },
    /// What this node learns about its network: mappings, local addresses, relays.
    Netcheck,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Netcheck {
    /// The public mapping of WireGuard's socket, as WG-STUN saw it through the tunnel.
    pub wg_mapping: Option<SocketAddr>,
    pub wg_mapping_error: Option<String>,
    /// The check socket's mapping, as plain STUN saw it.
    pub check_mapping: Option<SocketAddr>,
    pub check_mapping_error: Option<String>,
    /// Whether the router maps by destination (symmetric NAT), when it could be told.
    pub mapping_varies: Option<bool>,
    pub mapping_varies_detail: String,
    /// The WG-STUN server asked.
    pub wgstun: Option<String>,
    /// The candidates announced to peers (sealed).
    pub candidates: Vec<CandidateStatus>,
    pub relays: Vec<RelayStatus>,
    pub portmap: PortmapStatus,
}

/// Port mapping on the home router, as `warren netcheck` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortmapStatus {
    pub enabled: bool,
    /// The default route's next hop, which is asked.
    pub gateway: Option<Ipv4Addr>,
    /// The protocol in use: "pcp", "natpmp" or "upnp".
    pub protocol: Option<String>,
    /// What each protocol's probe came to.
    pub probes: std::collections::BTreeMap<String, String>,
    pub external_ip: Option<std::net::IpAddr>,
    pub mappings: Vec<PortmapMapping>,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortmapMapping {
    /// "wireguard" or "check".
    pub socket: String,
    pub internal_port: u16,
    pub external_port: u16,
    /// None: the router granted a mapping without expiry.
    pub lease_secs_left: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CandidateStatus {
    pub kind: String,
    pub wg: SocketAddr,
    pub check: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerStatus {
    pub name: String,
    pub mesh_addr: Ipv4Addr,
    pub public_key: Key,
    pub online: bool,
    pub endpoint: Option<SocketAddr>,
    pub path: PathKind,
    /// The relay carrying this peer's traffic, when the path is the relay.
    #[serde(default)]
    pub relay: Option<String>,
    /// Seconds since the last WireGuard handshake.
    pub last_handshake_secs: Option<u64>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    /// The candidate pair of a direct path: ours and the peer's WireGuard endpoints and their kinds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<PairStatus>,
    /// Round-trip time of the last connectivity check on that pair, microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rtt_us: Option<u64>,
    /// Seconds on the current path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_secs: Option<u64>,
    /// Why the peer is not direct: no candidates yet, checks failing, banned until …, peer offline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairStatus {
    /// Our WireGuard endpoint as the peer reaches it.
    pub local: SocketAddr,
    /// local, wgstun, prflx (and upnp, natpmp, pcp with port mapping).
    pub local_kind: String,
    /// The peer's WireGuard endpoint we send to.
    pub remote: SocketAddr,
    pub remote_kind: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub name: Option<String>,
    pub mesh_addr: Option<Ipv4Addr>,
    pub public_key: Key,
    pub interface: String,
    pub backend: String,
    /// connected, connecting, waiting or failed.
    pub coordinator: String,
    /// Why the coordinator connection is not up, when it is not.
    pub coordinator_detail: Option<String>,
    /// Why the last coordinator connection ended or failed, until one succeeds.
    #[serde(default)]
    pub coordinator_error: Option<String>,
    /// Relay connections: the home relay first.
    #[serde(default)]
    pub relays: Vec<RelayStatus>,
    pub peers: Vec<PeerStatus>,
    /// Log lines stderr could not take (its reader went away).
    #[serde(default)]
    pub log_lines_dropped: u64,
    /// Subnet routes and the exit node, when this node offers or uses any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing: Option<crate::route::RouteStatus>,
    /// The access policy this node enforces (README "Permissions").
    #[serde(default)]
    pub policy: crate::firewall::PolicyStatus,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status {
        status: Box<Status>,
    },
    Pong {
        name: String,
        mesh_addr: Ipv4Addr,
        /// The path the ping took: "direct ADDR" or "relay ADDR".
        relay: String,
        rtt_us: u64,
    },
    Netcheck {
        report: Box<Netcheck>,
    },
    Done,
    Error {
        reason: String,
    },
}

pub fn request(socket: &Path, req: &Request) -> Result<Response> {
    let what = || format!("connecting to the agent at {} (is warren up?)", socket.display());
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(NOT_ROOT),
        Err(e) => return Err(e).with_context(what),
    };
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).with_context(what)?;
    let mut line = serde_json::to_vec(req).context("encoding request")?;
    line.push(b'\n');
    // An agent that refuses us answers and closes without reading: the write
    // may then fail, but its answer is still there to read.
    let sent = stream.write_all(&line);
    let mut answer = String::new();
    let read = BufReader::new(stream).read_line(&mut answer);
    if answer.is_empty() {
        sent.context("sending request to the agent")?;
        read.context("reading the agent's answer")?;
        bail!("the agent closed the connection without answering");
    }
    match serde_json::from_str(&answer).context("decoding the agent's answer")? {
        Response::Error { reason } => Err(anyhow!(reason)),
        ok => Ok(ok),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// An agent that refuses a client answers one line and closes without
    /// reading the request: the client says why, whichever of its write or
    /// read notices the close first.
    #[test]
    fn a_refusal_without_reading_the_request_is_reported() {
        let dir = crate::testutil::TempDir::new("api-refusal");
        let path = dir.0.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (mut s, _) = listener.accept().unwrap();
                let mut line = serde_json::to_vec(&Response::Error {
                    reason: NOT_ROOT.into(),
                })
                .unwrap();
                line.push(b'\n');
                s.write_all(&line).unwrap();
            }
        });
        for _ in 0..2 {
            let err = format!("{:#}", request(&path, &Request::Status).unwrap_err());
            assert_eq!(err, NOT_ROOT);
        }
        server.join().unwrap();
    }
}

//! Administration of a running coordinator over a unix socket.
//!
//! Admin commands go through the server rather than straight to the database:
//! the server is the only writer (no lock contention with its own
//! transactions), and a removal or rename reaches the connected nodes at once
//! through the same path as any other change, instead of waiting for the
//! server to notice a foreign write. The socket is created 0600 and every
//! client's credentials are checked, so only root (or the server's own user)
//! can use it.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::keys::Key;
use crate::wg::AllowedIp;

/// Longest admin request line accepted by the server.
pub const MAX_REQUEST_LEN: usize = 64 * 1024;
/// How long the CLI waits for the server to answer.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    Nodes,
    Remove {
        node: String,
    },
    Rename {
        node: String,
        new_name: String,
    },
    Invite {
        reusable: bool,
        expires_in: Option<i64>,
        name: Option<String>,
    },
    /// Subnet routes and exit offers of every node (src/coord/routes.rs).
    Routes,
    /// Approve (`approved`) or revoke a prefix a node advertises.
    Route {
        node: String,
        prefix: String,
        approved: bool,
    },
    /// Validate, store and distribute a policy file (see `coord::policy`).
    PolicySet {
        text: String,
    },
    PolicyShow,
    PolicyClear,
}

/// One node's routes as `warren server routes list` shows them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteView {
    pub id: u64,
    pub name: String,
    /// What the node offers now (0.0.0.0/0: as an exit node).
    pub advertised: Vec<AllowedIp>,
    /// What an administrator approved, offered now or not.
    pub approved: Vec<AllowedIp>,
    /// What the peer map carries: advertised and approved (a prefix
    /// approved for two nodes goes to the lower id only).
    pub published: Vec<AllowedIp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub id: u64,
    pub name: String,
    pub mesh_addr: Ipv4Addr,
    pub public_key: Key,
    pub hostname: String,
    pub online: bool,
    pub created: i64,
    pub last_seen: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminResponse {
    Nodes {
        nodes: Vec<NodeView>,
    },
    Node {
        node: NodeView,
    },
    Invite {
        token: String,
        expires: Option<i64>,
    },
    Routes {
        routes: Vec<RouteView>,
    },
    Route {
        route: RouteView,
    },
    /// The policy in force (`text` is `None` when there is none); after a
    /// `set`, the names it mentions that no node has yet.
    Policy {
        text: Option<String>,
        digest: Option<String>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        unknown_names: Vec<String>,
    },
    Error {
        reason: String,
    },
}

/// Sends one request to the server's admin socket and waits for the answer.
pub fn request(socket: &Path, req: &AdminRequest) -> Result<AdminResponse> {
    let what = || {
        format!(
            "connecting to the coordinator's admin socket {} (is warren server running?)",
            socket.display()
        )
    };
    let mut stream = UnixStream::connect(socket).with_context(what)?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).with_context(what)?;
    stream
        .set_write_timeout(Some(CLIENT_TIMEOUT))
        .with_context(what)?;
    let mut line = serde_json::to_vec(req).context("encoding admin request")?;
    line.push(b'\n');
    stream.write_all(&line).context("sending admin request")?;
    let mut reader = BufReader::new(stream);
    let mut answer = String::new();
    reader
        .read_line(&mut answer)
        .context("reading the coordinator's answer")?;
    if answer.is_empty() {
        bail!("the coordinator closed the admin connection without answering");
    }
    let resp: AdminResponse = serde_json::from_str(&answer).context("decoding the coordinator's answer")?;
    match resp {
        AdminResponse::Error { reason } => Err(anyhow!(reason)),
        ok => Ok(ok),
    }
}

/// The uid of the process at the other end of a unix socket.
pub fn peer_uid(fd: std::os::fd::RawFd) -> Result<u32> {
    let cred = crate::peercred::peer_credentials(fd).context("reading admin client credentials")?;
    Ok(cred.uid)
}

/// Whether a client with this uid may administer the server.
pub fn uid_allowed(uid: u32) -> bool {
    // SAFETY: geteuid has no preconditions.
    uid == 0 || uid == unsafe { libc::geteuid() }
}

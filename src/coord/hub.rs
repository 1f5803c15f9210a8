//! The coordinator's logic: who is connected, what the peer map is, and who
//! must hear about a change. No sockets here; the server's mio loop feeds
//! bytes in and writes [`Hub::outgoing`] out, so tests can drive it directly.

use std::collections::{BTreeSet, HashMap};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;

use super::admin::{AdminRequest, AdminResponse, NodeView};
use super::conn::{Conn, Phase};
use super::invite::{self, JoinToken};
use super::store::{JoinRequest, Node, Store};
use crate::control::messages::{
    self, ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerInfo, RelayInfo, ServerMessage, WgStunInfo,
};
use crate::keys::Key;

pub type ConnId = usize;

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

pub struct Hub {
    store: Store,
    private: Key,
    /// `host:port` strings put into join tokens.
    advertise: Vec<String>,
    conns: HashMap<ConnId, Conn>,
    /// Which connection speaks for each online node.
    online: HashMap<u64, ConnId>,
    map_version: u64,
    /// Changes not yet pushed: nodes to upsert and nodes to drop. Batching them
    /// per loop turn means a burst of joins costs one delta, not one each.
    changed: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    /// Connections with new bytes to write.
    dirty: BTreeSet<ConnId>,
    /// Relays published to nodes; each node's home is picked from these by its id.
    relays: Vec<RelayInfo>,
    /// WG-STUN servers published to nodes in every Welcome.
    wgstun: Vec<WgStunInfo>,
    /// Told the key of every removed node (the embedded relay refuses them).
    on_removed: Option<Box<dyn FnMut(Key) + Send>>,
}

impl Hub {
    pub fn new(store: Store, private: Key, advertise: Vec<String>) -> Hub {
        Hub {
            store,
            private,
            advertise,
            conns: HashMap::new(),
            online: HashMap::new(),
            map_version: 0,
            changed: BTreeSet::new(),
            removed: BTreeSet::new(),
            dirty: BTreeSet::new(),
            relays: Vec::new(),
            wgstun: Vec::new(),
            on_removed: None,
        }
    }

    /// Sets the relays nodes use; call before nodes connect (they learn them on connect).
    pub fn set_relays(&mut self, relays: Vec<RelayInfo>) {
        self.relays = relays;
    }

    /// Calls `f` with the key of every node removed so far, then of each
    /// node removed from now on, at once.
    pub fn set_on_removed(&mut self, mut f: impl FnMut(Key) + Send + 'static) -> Result<()> {
        for key in self.store.removed_keys()? {
            f(key);
        }
        self.on_removed = Some(Box::new(f));
        Ok(())
    }

    /// Sets the WG-STUN servers nodes use; call before nodes connect (they learn them on connect).
    pub fn set_wgstun(&mut self, wgstun: Vec<WgStunInfo>) {
        self.wgstun = wgstun;
    }

    pub fn advertise(&self) -> &[String] {
        &self.advertise
    }

    /// A node's home relay: spread over the relays by node id, so it stays
    /// the same for as long as the set of relays does.
    fn home_relay(&self, node: u64) -> Option<Key> {
        if self.relays.is_empty() {
            return None;
        }
        let i = (node % self.relays.len() as u64) as usize;
        Some(self.relays[i].public_key)
    }

    pub fn public_key(&self) -> Key {
        self.private.public_key()
    }

    pub fn accept(&mut self, id: ConnId, now: Instant) {
        self.conns.insert(id, Conn::new(&self.private, now));
    }

    pub fn receive(&mut self, id: ConnId, now: Instant, bytes: &[u8]) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        self.dirty.insert(id);
        let msgs = match conn.receive(now, bytes) {
            Ok(m) => m,
            Err((code, reason)) => {
                log(conn, &format!("closing: {reason}"));
                conn.fail(now, code, &reason);
                return;
            }
        };
        for msg in msgs {
            if let Err(e) = self.handle(id, now, msg) {
                let reason = format!("{e:#}");
                if let Some(conn) = self.conns.get_mut(&id) {
                    log(conn, &format!("closing: {reason}"));
                    conn.fail(now, ErrorCode::Internal, &reason);
                }
            }
        }
    }

    fn handle(&mut self, id: ConnId, now: Instant, msg: ClientMessage) -> Result<()> {
        let Some(conn) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        let Some(key) = conn.peer() else { return Ok(()) };
        match (conn.phase, msg) {
            (Phase::Closing, _) => {}
            (
                Phase::Opening,
                ClientMessage::Hello {
                    version,
                    hostname: _,
                    candidates: _,
                },
            ) => {
                if !self.version_ok(id, now, version) {
                    return Ok(());
                }
                match self.store.node_by_key(&key)? {
                    Some(node) if node.removed.is_none() => self.admit(id, now, node)?,
                    Some(node) => self.refuse(
                        id,
                        now,
                        ErrorCode::Removed,
                        &format!("node {} was removed from the mesh", node.name),
                    ),
                    None => self.refuse(
                        id,
                        now,
                        ErrorCode::UnknownNode,
                        &format!("node key {} is not enrolled; join with a token", key.short()),
                    ),
                }
            }
            (
                Phase::Opening,
                ClientMessage::Join {
                    version,
                    secret,
                    name,
                    hostname,
                    candidates: _,
                },
            ) => {
                if !self.version_ok(id, now, version) {
                    return Ok(());
                }
                let hash = invite::secret_hash(&secret);
                let req = JoinRequest {
                    secret_hash: &hash,
                    public_key: key,
                    requested_name: name.as_deref(),
                    hostname: &hostname,
                };
                match self.store.join(&req, unix_now())? {
                    Ok(node) => {
                        eprintln!(
                            "coordinator: node {} ({}) joined as {}",
                            node.name,
                            key.short(),
                            node.mesh_addr
                        );
                        self.admit(id, now, node)?;
                    }
                    Err(refusal) => self.refuse(id, now, refusal.code, &refusal.reason),
                }
            }
            (Phase::Opening, other) => self.refuse(
                id,
                now,
                ErrorCode::Protocol,
                &format!("expected hello or join, got {}", kind(&other)),
            ),
            // Candidates travel sealed between agents; the coordinator neither
            // keeps nor publishes what older agents still send it.
            (Phase::Node(_), ClientMessage::Candidates { .. }) => {}
            (Phase::Node(node), ClientMessage::RotateKey { new_public_key }) => {
                let n = self.store.rotate_key(node, &new_public_key)?;
                eprintln!(
                    "coordinator: node {} rotated its key {} -> {}",
                    n.name,
                    key.short(),
                    new_public_key.short()
                );
                self.changed.insert(node);
            }
            (Phase::Node(node), ClientMessage::Goodbye) => {
                self.went_offline(id, node);
                conn_fail(&mut self.conns, id, now, ErrorCode::Protocol, "goodbye");
            }
            (Phase::Node(_), ClientMessage::Ping { nonce }) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.send(&ServerMessage::Pong { nonce });
                }
            }
            (Phase::Node(_), other) => self.refuse(
                id,
                now,
                ErrorCode::Protocol,
                &format!("unexpected {} after hello", kind(&other)),
            ),
        }
        Ok(())
    }

    fn version_ok(&mut self, id: ConnId, now: Instant, version: u32) -> bool {
        if version == PROTOCOL_VERSION {
            return true;
        }
        let reason =
            format!("protocol version {version} is not supported (coordinator speaks {PROTOCOL_VERSION})");
        self.refuse(id, now, ErrorCode::Version, &reason);
        false
    }

    fn refuse(&mut self, id: ConnId, now: Instant, code: ErrorCode, reason: &str) {
        if let Some(c) = self.conns.get(&id) {
            log(c, &format!("refused: {reason}"));
        }
        conn_fail(&mut self.conns, id, now, code, reason);
    }

    fn admit(&mut self, id: ConnId, now: Instant, node: Node) -> Result<()> {
        // A node reconnecting before its old connection timed out replaces it.
        if let Some(old) = self.online.insert(node.id, id).filter(|&old| old != id) {
            conn_fail(
                &mut self.conns,
                old,
                now,
                ErrorCode::Protocol,
                "replaced by a newer connection",
            );
            self.dirty.insert(old);
        }
        self.store.touch(node.id, unix_now())?;
        let Some(conn) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        conn.authenticated(node.id, now);
        let me = self.peer_info(&node);
        let nodes = self.store.nodes()?.iter().map(|n| self.peer_info(n)).collect();
        let conn = self.conns.get_mut(&id).expect("checked above");
        conn.send(&ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            node: me,
            relays: self.relays.clone(),
            wgstun: self.wgstun.clone(),
        });
        conn.send(&ServerMessage::PeerMap {
            version: self.map_version,
            nodes,
        });
        self.changed.insert(node.id);
        Ok(())
    }

    fn peer_info(&self, n: &Node) -> PeerInfo {
        PeerInfo {
            id: n.id,
            name: n.name.clone(),
            mesh_addr: n.mesh_addr,
            public_key: n.public_key,
            // Never the node's candidates: they do not pass through the coordinator.
            candidates: Vec::new(),
            online: self.online.contains_key(&n.id),
            home_relay: self.home_relay(n.id),
        }
    }

    fn went_offline(&mut self, id: ConnId, node: u64) {
        if self.online.get(&node) == Some(&id) {
            self.online.remove(&node);
            self.changed.insert(node);
            let _ = self.store.touch(node, unix_now());
        }
    }

    /// The shell saw the connection end (EOF, error, or after [`Hub::finished`]).
    pub fn closed(&mut self, id: ConnId) {
        if let Some(conn) = self.conns.remove(&id)
            && let Some(node) = conn.node()
        {
            self.went_offline(id, node);
        }
        self.dirty.remove(&id);
    }

    /// Pushes batched changes to every connected node as one delta.
    pub fn flush(&mut self) {
        if self.changed.is_empty() && self.removed.is_empty() {
            return;
        }
        self.map_version += 1;
        let mut upsert = Vec::new();
        for id in std::mem::take(&mut self.changed) {
            match self.store.node(id) {
                Ok(Some(n)) if n.removed.is_none() => upsert.push(self.peer_info(&n)),
                Ok(_) => {
                    self.removed.insert(id);
                }
                Err(e) => eprintln!("coordinator: reading node {id} for the peer map: {e:#}"),
            }
        }
        let remove: Vec<u64> = std::mem::take(&mut self.removed).into_iter().collect();
        let delta = messages::encode(&ServerMessage::PeerMapDelta {
            version: self.map_version,
            upsert,
            remove,
        });
        for (&cid, conn) in self.conns.iter_mut() {
            if matches!(conn.phase, Phase::Node(_)) {
                conn.send_encoded(&delta);
                self.dirty.insert(cid);
            }
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let expired: Vec<(ConnId, &'static str)> = self
            .conns
            .iter()
            .filter_map(|(&id, c)| c.expired(now).map(|why| (id, why)))
            .collect();
        for (id, why) in expired {
            self.dirty.insert(id);
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if c.phase == Phase::Closing {
                // The shell hangs up: see `finished`.
                continue;
            }
            log(c, why);
            let node = c.node();
            c.fail(now, ErrorCode::Protocol, why);
            if let Some(node) = node {
                self.went_offline(id, node);
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.conns.values().map(Conn::deadline).min()
    }

    /// Connections that have bytes to write or should be closed; drained.
    pub fn take_dirty(&mut self) -> Vec<ConnId> {
        std::mem::take(&mut self.dirty).into_iter().collect()
    }

    pub fn outgoing(&self, id: ConnId) -> &[u8] {
        self.conns.get(&id).map(|c| c.outgoing()).unwrap_or(&[])
    }

    pub fn consume_outgoing(&mut self, id: ConnId, n: usize) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.consume_outgoing(n);
        }
    }

    /// Whether the shell should hang up on this connection now.
    pub fn finished(&self, id: ConnId, now: Instant) -> bool {
        self.conns.get(&id).is_none_or(|c| c.is_finished(now))
    }

    pub fn admin(&mut self, req: AdminRequest, now: Instant) -> AdminResponse {
        match self.admin_inner(req, now) {
            Ok(r) => r,
            Err(e) => AdminResponse::Error {
                reason: format!("{e:#}"),
            },
        }
    }

    fn admin_inner(&mut self, req: AdminRequest, now: Instant) -> Result<AdminResponse> {
        Ok(match req {
            AdminRequest::Nodes => AdminResponse::Nodes {
                nodes: self.store.nodes()?.iter().map(|n| self.view(n)).collect(),
            },
            AdminRequest::Remove { node } => {
                let n = self.store.find_node(&node)?;
                let n = self.store.remove(n.id, unix_now())?;
                eprintln!("coordinator: node {} ({}) removed", n.name, n.public_key.short());
                if let Some(f) = &mut self.on_removed {
                    f(n.public_key);
                }
                if let Some(cid) = self.online.remove(&n.id) {
                    conn_fail(
                        &mut self.conns,
                        cid,
                        now,
                        ErrorCode::Removed,
                        "this node was removed from the mesh",
                    );
                    self.dirty.insert(cid);
                }
                self.removed.insert(n.id);
                AdminResponse::Node { node: self.view(&n) }
            }
            AdminRequest::Rename { node, new_name } => {
                let n = self.store.find_node(&node)?;
                let renamed = self.store.rename(n.id, &new_name)?;
                eprintln!("coordinator: node {} renamed to {}", n.name, renamed.name);
                self.changed.insert(n.id);
                AdminResponse::Node {
                    node: self.view(&renamed),
                }
            }
            AdminRequest::Invite {
                reusable,
                expires_in,
                name,
            } => {
                if self.advertise.is_empty() {
                    anyhow::bail!(
                        "creating invite: no coordinator address to put in it; start the server with --advertise HOST:PORT"
                    );
                }
                let token = JoinToken::new(self.advertise.clone(), self.public_key());
                let created = unix_now();
                let expires = expires_in.map(|s| created + s);
                self.store.create_invite(
                    &invite::secret_hash(&token.secret),
                    reusable,
                    expires,
                    name.as_deref(),
                    created,
                )?;
                AdminResponse::Invite {
                    token: token.encode(),
                    expires,
                }
            }
        })
    }

    fn view(&self, n: &Node) -> NodeView {
        NodeView {
            id: n.id,
            name: n.name.clone(),
            mesh_addr: n.mesh_addr,
            public_key: n.public_key,
            hostname: n.hostname.clone(),
            online: self.online.contains_key(&n.id),
            created: n.created,
            last_seen: n.last_seen,
        }
    }
}

fn conn_fail(conns: &mut HashMap<ConnId, Conn>, id: ConnId, now: Instant, code: ErrorCode, reason: &str) {
    if let Some(c) = conns.get_mut(&id) {
        c.fail(now, code, reason);
    }
}

fn kind(m: &ClientMessage) -> &'static str {
    match m {
        ClientMessage::Hello { .. } => "hello",
        ClientMessage::Join { .. } => "join",
        ClientMessage::Candidates { .. } => "candidates",
        ClientMessage::RotateKey { .. } => "rotate_key",
        ClientMessage::Goodbye => "goodbye",
        ClientMessage::Ping { .. } => "ping",
    }
}

fn log(conn: &Conn, what: &str) {
    match conn.peer() {
        Some(k) => eprintln!("coordinator: connection from {}: {what}", k.short()),
        None => eprintln!("coordinator: connection (no handshake yet): {what}"),
    }
}

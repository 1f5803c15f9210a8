//! The coordinator's logic: who is connected, what the peer map is, and who
//! must hear about a change. No sockets here; the server's mio loop feeds
//! bytes in and writes [`Hub::outgoing`] out, so tests can drive it directly.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use super::admin::{AdminRequest, AdminResponse, NodeView};
use super::conn::{Conn, Phase};
use super::invite::{self, JoinToken};
use super::pacer::Pacer;
use super::peermap::PeerMap;
use super::relayfeed::RelayFeed;
use super::routes::Routes;
use super::store::{JoinRequest, Node, Store};
use crate::control::messages::{
    self, Advertised, ClientMessage, ErrorCode, PROTOCOL_VERSION, PeerInfo, RelayInfo, ServerMessage,
    WgStunInfo,
};
use crate::keys::Key;

mod policy;

pub type ConnId = usize;

/// Connections whose full map is sealed but not yet taken by their socket:
/// bounds the memory a herd of reconnecting nodes costs (each map is as big
/// as the mesh) while the others wait their turn.
pub const MAPS_IN_FLIGHT: usize = 64;
/// Full maps sealed per loop turn, so one turn's work stays short and the
/// handshakes of nodes still arriving keep being answered within their deadline.
pub const MAPS_PER_TURN: usize = 16;

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
    /// The peer map served to connecting nodes, from memory: read from the
    /// store once (on first use, when relays are known), then kept current by
    /// [`Hub::flush`]. `None` until then.
    map: Option<PeerMap>,
    /// Changes not yet pushed: nodes to upsert and nodes to drop. Batching them
    /// per loop turn means a burst of joins costs one delta, not one each.
    changed: BTreeSet<u64>,
    removed: BTreeSet<u64>,
    /// When those changes may go out: a herd of changes is coalesced.
    pacer: Pacer,
    /// Connections whose node reads online changes as ids (see
    /// `ClientMessage::Join::online_by_id`); the others get whole entries.
    online_by_id: HashSet<ConnId>,
    /// Connections with new bytes to write.
    dirty: BTreeSet<ConnId>,
    /// Welcomed connections waiting for their full map, first come first
    /// served; they get no deltas until then (the map they get is current).
    map_queue: VecDeque<ConnId>,
    /// Connections whose full map is not yet all written: outgoing bytes
    /// left until its end.
    map_in_flight: HashMap<ConnId, usize>,
    /// Full maps sealed in this loop turn (see [`MAPS_PER_TURN`]).
    maps_this_turn: usize,
    /// The clock as of the last [`Hub::handle_timeout`], the start of a loop turn.
    turn: Option<Instant>,
    /// Relays published to nodes; each node's home is picked from these by its id.
    relays: Vec<RelayInfo>,
    /// WG-STUN servers published to nodes in every Welcome.
    wgstun: Vec<WgStunInfo>,
    /// Told the key of every removed node (the embedded relay refuses them).
    on_removed: Option<Box<dyn FnMut(Key) + Send>>,
    /// Separate relays subscribed to the member keys.
    feed: RelayFeed,
    /// Hello or Join refused since the server last took them: a stranger's
    /// input, so the server counts them in its summary instead of a log line each.
    refused_openings: Vec<ErrorCode>,
    /// Published subnet routes and exit nodes (src/coord/routes.rs).
    routes: Routes,
    /// The access policy in force (inner `None`: none); outer `None` until read from the store.
    policy: Option<Option<crate::control::policy::Policy>>,
    /// Connections whose node reads [`ServerMessage::Policy`] (see `hub/policy.rs`).
    policy_aware: HashSet<ConnId>,
}

impl Hub {
    pub fn new(store: Store, private: Key, advertise: Vec<String>) -> Hub {
        let routes = Routes::load(&store).unwrap_or_else(|e| {
            log_error!("coordinator: {e:#}");
            Routes::default()
        });
        Hub {
            routes,
            store,
            private,
            advertise,
            conns: HashMap::new(),
            online: HashMap::new(),
            map: None,
            changed: BTreeSet::new(),
            removed: BTreeSet::new(),
            pacer: Pacer::default(),
            online_by_id: HashSet::new(),
            dirty: BTreeSet::new(),
            map_queue: VecDeque::new(),
            map_in_flight: HashMap::new(),
            maps_this_turn: 0,
            turn: None,
            relays: Vec::new(),
            wgstun: Vec::new(),
            on_removed: None,
            feed: RelayFeed::default(),
            refused_openings: Vec::new(),
            policy: None,
            policy_aware: HashSet::new(),
        }
    }

    /// Sets the relays nodes use; call before nodes connect (they learn them on connect).
    pub fn set_relays(&mut self, relays: Vec<RelayInfo>) {
        // The relays nodes are sent to are the ones that may learn who is a member.
        self.feed.set_authorised(relays.iter().map(|r| r.public_key));
        self.relays = relays;
        // Entries name each node's home relay: build them again with these.
        self.map = None;
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

    /// Nodes connected now (the metrics' connected nodes).
    pub fn online_count(&self) -> usize {
        self.online.len()
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
                    online_by_id,
                    advertise,
                    policy,
                },
            ) => {
                if !self.version_ok(id, now, version) {
                    return Ok(());
                }
                if online_by_id {
                    self.online_by_id.insert(id);
                }
                if policy {
                    self.policy_aware.insert(id);
                }
                match self.store.node_by_key(&key)? {
                    Some(node) if node.removed.is_none() => {
                        self.routes_advertised(&node, &advertise)?;
                        self.admit(id, now, node)?
                    }
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
                    online_by_id,
                    advertise,
                    policy,
                },
            ) => {
                if !self.version_ok(id, now, version) {
                    return Ok(());
                }
                if online_by_id {
                    self.online_by_id.insert(id);
                }
                if policy {
                    self.policy_aware.insert(id);
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
                        log!(
                            "coordinator: node {} ({}) joined as {}",
                            node.name,
                            key.short(),
                            node.mesh_addr
                        );
                        self.feed.added(key);
                        self.routes_advertised(&node, &advertise)?;
                        self.admit(id, now, node)?;
                    }
                    Err(refusal) => self.refuse(id, now, refusal.code, &refusal.reason),
                }
            }
            (Phase::Opening, ClientMessage::SubscribeMembers { version }) => {
                if !self.version_ok(id, now, version) {
                    return Ok(());
                }
                if !self.feed.is_authorised(&key) {
                    let reason = format!("key {} is not a relay of this coordinator (--relay)", key.short());
                    self.refuse(id, now, ErrorCode::UnknownNode, &reason);
                    return Ok(());
                }
                let (feed, store) = (&mut self.feed, &self.store);
                if let Some(conn) = self.conns.get_mut(&id) {
                    feed.subscribe(id, now, conn, || {
                        Ok(store.nodes()?.into_iter().map(|n| n.public_key).collect())
                    })?;
                    log(conn, "relay subscribed to the member keys");
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
                log!(
                    "coordinator: node {} rotated its key {} -> {}",
                    n.name,
                    key.short(),
                    new_public_key.short()
                );
                self.feed.removed(key);
                self.feed.added(new_public_key);
                self.changed.insert(node);
            }
            (Phase::Node(node), ClientMessage::Goodbye) => {
                self.went_offline(id, node);
                conn_fail(&mut self.conns, id, now, ErrorCode::Protocol, "goodbye");
            }
            (Phase::Node(_) | Phase::Relay, ClientMessage::Ping { nonce }) => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.send(&ServerMessage::Pong { nonce });
                }
            }
            (Phase::Node(_) | Phase::Relay, other) => self.refuse(
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

    /// Refuses a connection with `code`: a member's refusal is logged, a
    /// refused Hello or Join (not a member, whatever its handshake proved) is
    /// only counted (see [`Hub::take_refused_openings`]).
    fn refuse(&mut self, id: ConnId, now: Instant, code: ErrorCode, reason: &str) {
        if let Some(c) = self.conns.get(&id) {
            if c.phase == Phase::Opening {
                self.refused_openings.push(code);
            } else {
                log(c, &format!("refused: {reason}"));
            }
        }
        conn_fail(&mut self.conns, id, now, code, reason);
    }

    /// The Hello or Join refusals since the last call, for the server's summary line.
    pub fn take_refused_openings(&mut self) -> Vec<ErrorCode> {
        std::mem::take(&mut self.refused_openings)
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
        let map = self.map()?;
        // A node new to the mesh finds itself in its first map, as the
        // protocol promises; a reconnecting node is there already.
        if !map.contains(node.id) {
            map.upsert(&me);
        }
        let conn = self.conns.get_mut(&id).expect("checked above");
        conn.send(&ServerMessage::Welcome {
            version: PROTOCOL_VERSION,
            node: me,
            relays: self.relays.clone(),
            wgstun: self.wgstun.clone(),
        });
        self.send_policy(id)?;
        // The map follows as soon as it is this connection's turn.
        self.map_queue.push_back(id);
        self.send_maps();
        self.changed.insert(node.id);
        Ok(())
    }

    /// Hands the full map, as of its current version and shared by all, to
    /// waiting connections while the in-flight and per-turn bounds allow.
    /// Each then gets the deltas after that version, like everyone else.
    fn send_maps(&mut self) {
        while self.map_in_flight.len() < MAPS_IN_FLIGHT
            && self.maps_this_turn < MAPS_PER_TURN
            && let Some(id) = self.map_queue.pop_front()
        {
            let Some(conn) = self.conns.get(&id) else {
                continue;
            };
            if !matches!(conn.phase, Phase::Node(_)) {
                continue;
            }
            self.dirty.insert(id);
            let full = match self.map() {
                Ok(m) => m.full(),
                Err(e) => {
                    let reason = format!("{e:#}");
                    if let Some(conn) = self.conns.get_mut(&id) {
                        log(conn, &format!("closing: {reason}"));
                        conn.fail(
                            self.turn.unwrap_or_else(Instant::now),
                            ErrorCode::Internal,
                            &reason,
                        );
                    }
                    continue;
                }
            };
            let conn = self.conns.get_mut(&id).expect("checked above");
            conn.send_encoded(&full);
            self.maps_this_turn += 1;
            self.map_in_flight.insert(id, conn.outgoing().len());
        }
    }

    /// The in-memory peer map, read from the store the first time.
    fn map(&mut self) -> Result<&mut PeerMap> {
        if self.map.is_none() {
            let nodes: Vec<PeerInfo> = self
                .store
                .nodes()
                .context("loading the peer map")?
                .iter()
                .map(|n| self.peer_info(n))
                .collect();
            self.map = Some(PeerMap::new(0, nodes));
        }
        Ok(self.map.as_mut().expect("loaded above"))
    }

    fn peer_info(&self, n: &Node) -> PeerInfo {
        let published = self.routes.of(n.id);
        PeerInfo {
            id: n.id,
            name: n.name.clone(),
            mesh_addr: n.mesh_addr,
            public_key: n.public_key,
            // Never the node's candidates: they do not pass through the coordinator.
            candidates: Vec::new(),
            online: self.online.contains_key(&n.id),
            home_relay: self.home_relay(n.id),
            routes: published.routes,
            exit: published.exit,
        }
    }

    /// A node said what it advertises: store it; whoever's published routes changed is upserted.
    fn routes_advertised(&mut self, node: &Node, offer: &Advertised) -> Result<()> {
        let changed = self.routes.advertised(&mut self.store, node, offer)?;
        self.changed.extend(changed);
        Ok(())
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
        self.feed.closed(id);
        self.online_by_id.remove(&id);
        self.policy_aware.remove(&id);
        self.map_queue.retain(|&q| q != id);
        if self.map_in_flight.remove(&id).is_some() {
            self.send_maps();
        }
    }

    fn changes_waiting(&self) -> bool {
        !self.changed.is_empty() || !self.removed.is_empty()
    }

    /// Pushes batched changes to every connected node as one delta, and
    /// applies them to the in-memory map that connecting nodes get; at once
    /// after a quiet while, else when the pacer allows (see `pacer.rs`).
    /// Subscribed relays get their member delta every turn.
    pub fn flush(&mut self, now: Instant) {
        self.feed.flush(&mut self.conns, &mut self.dirty);
        if !self.changes_waiting() || !self.pacer.due(now) {
            return;
        }
        if let Err(e) = self.map() {
            // Retried on the next flush; the changes stay queued.
            log!("coordinator: {e:#}");
            return;
        }
        let mut upsert = Vec::new();
        for id in std::mem::take(&mut self.changed) {
            // Read once per change (the node's row holds what a rename or key
            // rotation changed), never once per connection.
            match self.store.node(id) {
                Ok(Some(n)) if n.removed.is_none() => upsert.push(self.peer_info(&n)),
                Ok(_) => {
                    self.removed.insert(id);
                }
                Err(e) => log!("coordinator: reading node {id} for the peer map: {e:#}"),
            }
        }
        let remove: Vec<u64> = std::mem::take(&mut self.removed).into_iter().collect();
        let map = self.map.as_mut().expect("loaded above");
        // The same changes twice: whole entries for every node, and returns
        // and departures by id for nodes that read them so.
        let (mut changed, mut online, mut offline) = (Vec::new(), Vec::new(), Vec::new());
        for n in &upsert {
            if map.only_online_differs(n) {
                if n.online { &mut online } else { &mut offline }.push(n.id);
            } else {
                changed.push(n.clone());
            }
            map.upsert(n);
        }
        for &id in &remove {
            map.remove(id);
        }
        let version = map.bump();
        let only_flags = !online.is_empty() || !offline.is_empty();
        let by_id = (only_flags && !self.online_by_id.is_empty()).then(|| {
            messages::encode(&ServerMessage::PeerMapDelta {
                version,
                upsert: changed,
                remove: remove.clone(),
                online,
                offline,
            })
        });
        let whole = messages::encode(&ServerMessage::PeerMapDelta {
            version,
            upsert,
            remove,
            online: Vec::new(),
            offline: Vec::new(),
        });
        self.pacer.sent(now);
        let waiting: BTreeSet<ConnId> = self.map_queue.iter().copied().collect();
        for (&cid, conn) in self.conns.iter_mut() {
            if matches!(conn.phase, Phase::Node(_)) && !waiting.contains(&cid) {
                match &by_id {
                    Some(d) if self.online_by_id.contains(&cid) => conn.send_encoded(d),
                    _ => conn.send_encoded(&whole),
                }
                self.dirty.insert(cid);
            }
        }
    }

    /// Called once per loop turn (the server's loop does): expires deadlines
    /// and starts the turn's allowance of full maps.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.turn = Some(now);
        self.maps_this_turn = 0;
        self.send_maps();
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
        let deadlines = self.conns.values().map(Conn::deadline).min();
        // Maps held back only by this turn's allowance go out next turn, at once.
        let maps_due = (self.map_in_flight.len() < MAPS_IN_FLIGHT && !self.map_queue.is_empty())
            .then_some(self.turn)
            .flatten();
        let delta_due = self.pacer.next(self.changes_waiting());
        deadlines.into_iter().chain(maps_due).chain(delta_due).min()
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
            if let Some(left) = self.map_in_flight.get_mut(&id) {
                *left = left.saturating_sub(n);
                if *left == 0 {
                    self.map_in_flight.remove(&id);
                    self.send_maps();
                }
            }
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
            req @ (AdminRequest::PolicySet { .. } | AdminRequest::PolicyShow | AdminRequest::PolicyClear) => {
                self.policy_admin(req)?
            }
            AdminRequest::Nodes => AdminResponse::Nodes {
                nodes: self.store.nodes()?.iter().map(|n| self.view(n)).collect(),
            },
            AdminRequest::Remove { node } => {
                let n = self.store.find_node(&node)?;
                let n = self.store.remove(n.id, unix_now())?;
                log!("coordinator: node {} ({}) removed", n.name, n.public_key.short());
                if let Some(f) = &mut self.on_removed {
                    f(n.public_key);
                }
                self.feed.removed(n.public_key);
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
                // A prefix it shadowed goes to the next node that has it.
                let changed = self.routes.refresh(&self.store)?;
                self.changed.extend(changed);
                AdminResponse::Node { node: self.view(&n) }
            }
            AdminRequest::Rename { node, new_name } => {
                let n = self.store.find_node(&node)?;
                let renamed = self.store.rename(n.id, &new_name)?;
                log!("coordinator: node {} renamed to {}", n.name, renamed.name);
                self.changed.insert(n.id);
                AdminResponse::Node {
                    node: self.view(&renamed),
                }
            }
            AdminRequest::Routes => AdminResponse::Routes {
                routes: self.routes.views(&self.store)?,
            },
            AdminRequest::Route {
                node,
                prefix,
                approved,
            } => {
                let (route, changed) = self.routes.approve(&mut self.store, &node, &prefix, approved)?;
                self.changed.extend(changed);
                AdminResponse::Route { route }
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
        ClientMessage::SubscribeMembers { .. } => "subscribe_members",
    }
}

fn log(conn: &Conn, what: &str) {
    match conn.peer() {
        Some(k) => log!("coordinator: connection from {}: {what}", k.short()),
        None => log!("coordinator: connection (no handshake yet): {what}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::channel::Channel;
    use crate::coord::pacer::MAX_INTERVAL;
    use crate::coord::store::tests::TempDir;
    use std::sync::Arc;

    struct Node {
        id: ConnId,
        key: Key,
        ch: Channel,
        /// Every message received so far, as the bytes the coordinator sent.
        got: Vec<Vec<u8>>,
    }

    struct Mesh {
        _dir: TempDir,
        hub: Hub,
        token: JoinToken,
        now: Instant,
        next: ConnId,
    }

    impl Mesh {
        fn new() -> Mesh {
            let dir = TempDir::new("hub");
            let store = Store::open(&dir.0.join("server.db")).unwrap();
            let mut hub = Hub::new(store, Key::generate_private(), vec!["coord:7777".into()]);
            let now = Instant::now();
            let req = AdminRequest::Invite {
                reusable: true,
                expires_in: None,
                name: None,
            };
            let AdminResponse::Invite { token, .. } = hub.admin(req, now) else {
                panic!("no invite");
            };
            Mesh {
                _dir: dir,
                hub,
                token: JoinToken::parse(&token).unwrap(),
                now,
                next: 1,
            }
        }

        /// A new node joins (no flush: the test decides when a loop turn ends).
        fn join(&mut self, name: &str) -> Node {
            let join = ClientMessage::Join {
                version: PROTOCOL_VERSION,
                secret: self.token.secret.clone(),
                name: Some(name.into()),
                hostname: name.into(),
                candidates: vec![],
                online_by_id: false,
                advertise: Default::default(),
                policy: false,
            };
            self.connect(Key::generate_private(), &join)
        }

        /// An enrolled node connects again, as after a coordinator restart.
        fn hello(&mut self, key: Key) -> Node {
            let hello = ClientMessage::Hello {
                version: PROTOCOL_VERSION,
                hostname: "h".into(),
                candidates: vec![],
                online_by_id: false,
                advertise: Default::default(),
                policy: false,
            };
            self.connect(key, &hello)
        }

        fn connect(&mut self, key: Key, first: &ClientMessage) -> Node {
            let id = self.next;
            self.next += 1;
            self.hub.accept(id, self.now);
            let mut ch = Channel::client(&key, &self.token.server_key).unwrap();
            ch.send(&messages::encode(first)).unwrap();
            let mut node = Node {
                id,
                key,
                ch,
                got: vec![],
            };
            self.pump(&mut node);
            self.pump(&mut node);
            assert!(
                node.got.iter().any(|m| m.starts_with(br#"{"type":"welcome""#)),
                "node {id} was not welcomed: {:?}",
                node.got
                    .iter()
                    .map(|m| String::from_utf8_lossy(m))
                    .collect::<Vec<_>>()
            );
            node
        }

        /// Carries bytes both ways once, in one loop turn.
        fn pump(&mut self, node: &mut Node) {
            self.hub.handle_timeout(self.now);
            let up = node.ch.outgoing().to_vec();
            node.ch.consume_outgoing(up.len());
            if !up.is_empty() {
                self.hub.receive(node.id, self.now, &up);
            }
            let down = self.hub.outgoing(node.id).to_vec();
            self.hub.consume_outgoing(node.id, down.len());
            node.ch.receive(&down).unwrap();
            while let Some(m) = node.ch.next_message() {
                node.got.push(m);
            }
        }

        /// Ends a loop turn a pacer interval after the last: waiting changes go out.
        fn flush(&mut self) {
            self.now += MAX_INTERVAL;
            self.hub.flush(self.now);
        }

        fn full_map(&mut self) -> Arc<[u8]> {
            self.hub.map().unwrap().full()
        }
    }

    fn maps(node: &Node) -> Vec<&Vec<u8>> {
        node.got
            .iter()
            .filter(|m| m.starts_with(br#"{"type":"peer_map""#))
            .collect()
    }

    fn decode(bytes: &[u8]) -> ServerMessage {
        messages::decode_server(bytes).unwrap()
    }

    fn kinds(node: &Node) -> Vec<String> {
        node.got
            .iter()
            .map(|m| {
                let v: serde_json::Value = serde_json::from_slice(m).unwrap();
                v["type"].as_str().unwrap_or("").to_string()
            })
            .collect()
    }

    #[test]
    fn the_policy_reaches_nodes_that_read_it_before_their_map_and_on_each_change() {
        let mut mesh = Mesh::new();
        let set = mesh.hub.admin(
            AdminRequest::PolicySet {
                text: "[[accept]]\nfrom = [\"*\"]\nto = [\"nas\"]\nports = [\"tcp/22\"]\n".into(),
            },
            mesh.now,
        );
        let AdminResponse::Policy {
            digest,
            unknown_names,
            ..
        } = set
        else {
            panic!("{set:?}");
        };
        assert_eq!(unknown_names, ["nas"], "no node is named nas yet");
        let join = ClientMessage::Join {
            version: PROTOCOL_VERSION,
            secret: mesh.token.secret.clone(),
            name: Some("nas".into()),
            hostname: "nas".into(),
            candidates: vec![],
            online_by_id: true,
            advertise: Default::default(),
            policy: true,
        };
        let mut aware = mesh.connect(Key::generate_private(), &join);
        let mut old = mesh.join("old");
        mesh.flush();
        mesh.pump(&mut aware);
        let k = kinds(&aware);
        assert_eq!(&k[..3], ["welcome", "policy", "peer_map"], "{k:?}");
        let ServerMessage::Policy { policy: Some(p) } = decode(&aware.got[1]) else {
            panic!("{k:?}");
        };
        assert_eq!(Some(p.digest), digest);
        // A bad file is refused with its line and the policy in force stays.
        let bad = mesh.hub.admin(
            AdminRequest::PolicySet {
                text: "[[accept]]\nfrom = [\"tag:x\"]\nto = [\"*\"]\nports = [\"*\"]\n".into(),
            },
            mesh.now,
        );
        assert_eq!(
            bad,
            AdminResponse::Error {
                reason: "policy refused, the one in force stays: line 2: from: tag \"x\" is used but not defined in [tags]".into()
            }
        );
        let AdminResponse::Policy { digest: shown, .. } = mesh.hub.admin(AdminRequest::PolicyShow, mesh.now)
        else {
            panic!()
        };
        assert_eq!(shown, digest);
        // Cleared: the aware node hears at once, the old one never hears of policies.
        let cleared = mesh.hub.admin(AdminRequest::PolicyClear, mesh.now);
        assert!(
            matches!(cleared, AdminResponse::Policy { text: None, .. }),
            "{cleared:?}"
        );
        mesh.pump(&mut aware);
        mesh.pump(&mut old);
        assert_eq!(
            decode(aware.got.last().unwrap()),
            ServerMessage::Policy { policy: None }
        );
        assert!(!kinds(&old).iter().any(|k| k == "policy"), "{:?}", kinds(&old));
    }

    #[test]
    fn reconnecting_nodes_share_one_encoding_of_the_map() {
        let mut mesh = Mesh::new();
        let joined: Vec<Node> = ["a", "b", "c"].iter().map(|n| mesh.join(n)).collect();
        mesh.flush();
        // A newcomer finds itself in its first map.
        let ServerMessage::PeerMap { nodes, .. } = decode(maps(&joined[2])[0]) else {
            panic!("not a peer map");
        };
        assert_eq!(
            nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["a", "b", "c"]
        );
        // Everyone drops off (a restart, from the nodes' side), then returns.
        for n in &joined {
            mesh.hub.closed(n.id);
        }
        mesh.flush();
        let shared = mesh.full_map();
        let b = mesh.hello(joined[1].key);
        let c = mesh.hello(joined[2].key);
        assert!(
            Arc::ptr_eq(&shared, &mesh.full_map()),
            "a connect encoded the map again"
        );
        let (mb, mc) = (maps(&b), maps(&c));
        assert_eq!((mb.len(), mc.len()), (1, 1));
        assert_eq!(mb[0], mc[0], "two connections got different bytes");
        assert_eq!(mb[0].as_slice(), &*shared);
        let ServerMessage::PeerMap { nodes, .. } = decode(mb[0]) else {
            panic!("not a peer map");
        };
        assert_eq!(nodes.len(), 3);
        assert!(nodes.iter().all(|n| !n.online), "{nodes:?}");
        // Their return reaches the others as one delta in the next turn.
        mesh.flush();
        let mut c = c;
        mesh.pump(&mut c);
        let last = decode(c.got.last().unwrap());
        let ServerMessage::PeerMapDelta { upsert, .. } = last else {
            panic!("{last:?}");
        };
        assert_eq!(upsert.iter().filter(|n| n.online).count(), 2);
    }

    /// A node's advertisement reaches the others only once approved, as an
    /// upsert of that node; revoked or no longer advertised, it is gone, and
    /// the approval survives re-advertising.
    #[test]
    fn approved_routes_reach_the_other_nodes_through_the_map() {
        let mut mesh = Mesh::new();
        let mut watcher = mesh.join("watcher");
        let offer = Advertised {
            routes: vec!["192.168.1.0/24".parse().unwrap()],
            exit: true,
        };
        let join = ClientMessage::Join {
            version: PROTOCOL_VERSION,
            secret: mesh.token.secret.clone(),
            name: Some("gw".into()),
            hostname: "gw".into(),
            candidates: vec![],
            online_by_id: false,
            advertise: offer.clone(),
            policy: false,
        };
        let gw = mesh.connect(Key::generate_private(), &join);
        mesh.flush();
        let gw_entry = |mesh: &mut Mesh, n: &mut Node| {
            let (_, upsert, ..) = last_delta(mesh, n);
            upsert.into_iter().find(|p| p.name == "gw").expect("gw upserted")
        };
        let e = gw_entry(&mut mesh, &mut watcher);
        assert!(e.routes.is_empty() && !e.exit, "published before approval: {e:?}");
        for prefix in ["192.168.1.0/24", "0.0.0.0/0"] {
            let r = mesh.hub.admin(
                AdminRequest::Route {
                    node: "gw".into(),
                    prefix: prefix.into(),
                    approved: true,
                },
                mesh.now,
            );
            assert!(matches!(r, AdminResponse::Route { .. }), "{r:?}");
        }
        mesh.flush();
        let e = gw_entry(&mut mesh, &mut watcher);
        assert_eq!(e.routes, offer.routes);
        assert!(e.exit);
        // gw reconnects advertising nothing: unpublished, still approved.
        mesh.hub.closed(gw.id);
        let hello = ClientMessage::Hello {
            version: PROTOCOL_VERSION,
            hostname: "gw".into(),
            candidates: vec![],
            online_by_id: false,
            advertise: Advertised::default(),
            policy: false,
        };
        let gw = mesh.connect(gw.key, &hello);
        mesh.flush();
        let e = gw_entry(&mut mesh, &mut watcher);
        assert!(e.routes.is_empty() && !e.exit, "{e:?}");
        mesh.hub.closed(gw.id);
        let mut hello = hello;
        if let ClientMessage::Hello { advertise, .. } = &mut hello {
            *advertise = offer.clone();
        }
        mesh.connect(gw.key, &hello);
        mesh.flush();
        assert_eq!(gw_entry(&mut mesh, &mut watcher).routes, offer.routes);
        let r = mesh.hub.admin(
            AdminRequest::Route {
                node: "gw".into(),
                prefix: "192.168.1.0/24".into(),
                approved: false,
            },
            mesh.now,
        );
        assert!(matches!(r, AdminResponse::Route { .. }), "{r:?}");
        mesh.flush();
        let e = gw_entry(&mut mesh, &mut watcher);
        assert!(e.routes.is_empty() && e.exit, "{e:?}");
        let AdminResponse::Routes { routes } = mesh.hub.admin(AdminRequest::Routes, mesh.now) else {
            panic!("no routes list");
        };
        assert_eq!(routes.len(), 1);
        assert_eq!(routes[0].approved, vec!["0.0.0.0/0".parse().unwrap()]);
    }

    /// The last delta a node got, after one more loop turn.
    fn last_delta(mesh: &mut Mesh, n: &mut Node) -> (u64, Vec<PeerInfo>, Vec<u64>, Vec<u64>) {
        mesh.pump(n);
        match decode(n.got.last().unwrap()) {
            ServerMessage::PeerMapDelta {
                version,
                upsert,
                online,
                offline,
                ..
            } => (version, upsert, online, offline),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn returns_reach_nodes_that_read_ids_as_ids_and_the_others_as_whole_entries() {
        let mut mesh = Mesh::new();
        let mut old = mesh.join("old");
        let join = ClientMessage::Join {
            version: PROTOCOL_VERSION,
            secret: mesh.token.secret.clone(),
            name: Some("new".into()),
            hostname: "new".into(),
            candidates: vec![],
            online_by_id: true,
            advertise: Default::default(),
            policy: false,
        };
        let mut new = mesh.connect(Key::generate_private(), &join);
        let c = mesh.join("c");
        let c_node = mesh.hub.conns[&c.id].node().unwrap();
        mesh.flush();
        mesh.pump(&mut old);
        mesh.pump(&mut new);
        mesh.hub.closed(c.id);
        mesh.flush();
        let (v_old, up_old, on_old, off_old) = last_delta(&mut mesh, &mut old);
        let (v_new, up_new, on_new, off_new) = last_delta(&mut mesh, &mut new);
        assert_eq!(v_old, v_new, "one version, two encodings");
        assert!(on_old.is_empty() && off_old.is_empty());
        assert!(
            up_old.len() == 1 && up_old[0].id == c_node && !up_old[0].online,
            "{up_old:?}"
        );
        assert_eq!((up_new.len(), on_new.len(), off_new), (0, 0, vec![c_node]));
        // Back, and renamed in the same interval: the rename is a whole entry for both.
        let c = mesh.hello(c.key);
        let r = mesh.hub.admin(
            AdminRequest::Rename {
                node: "old".into(),
                new_name: "older".into(),
            },
            mesh.now,
        );
        assert!(matches!(r, AdminResponse::Node { .. }), "{r:?}");
        mesh.flush();
        let (_, up_old, ..) = last_delta(&mut mesh, &mut old);
        let (_, up_new, on_new, _) = last_delta(&mut mesh, &mut new);
        let names = |u: &[PeerInfo]| u.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&up_old), ["older", "c"]);
        assert_eq!(names(&up_new), ["older"]);
        assert_eq!(on_new, [c_node]);
        drop(c);
    }

    #[test]
    fn a_change_makes_a_new_encoding_that_later_connections_get() {
        let mut mesh = Mesh::new();
        let mut a = mesh.join("a");
        mesh.flush();
        let before = mesh.full_map();
        let renamed = mesh.hub.admin(
            AdminRequest::Rename {
                node: "a".into(),
                new_name: "alpha".into(),
            },
            mesh.now,
        );
        assert!(matches!(renamed, AdminResponse::Node { .. }), "{renamed:?}");
        mesh.flush();
        mesh.pump(&mut a);
        let after = mesh.full_map();
        assert!(!Arc::ptr_eq(&before, &after));
        let b = mesh.join("b");
        let ServerMessage::PeerMap { version, nodes } = decode(maps(&b)[0]) else {
            panic!("not a peer map");
        };
        assert_eq!(version, mesh.hub.map.as_ref().unwrap().version());
        assert_eq!(
            nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
            ["alpha", "b"]
        );
        assert!(nodes[0].online);
        // The connected node heard of the rename as a delta.
        let last = decode(a.got.last().unwrap());
        assert!(
            matches!(&last, ServerMessage::PeerMapDelta { upsert, .. } if upsert[0].name == "alpha"),
            "{last:?}"
        );
    }

    #[test]
    fn a_removal_reaches_every_connection_and_leaves_the_map() {
        let mut mesh = Mesh::new();
        let mut nodes: Vec<Node> = ["a", "b", "c", "d"].iter().map(|n| mesh.join(n)).collect();
        mesh.flush();
        let gone = nodes.pop().unwrap();
        let gone_id = mesh.hub.conns[&gone.id].node().unwrap();
        let r = mesh
            .hub
            .admin(AdminRequest::Remove { node: "d".into() }, mesh.now);
        assert!(matches!(r, AdminResponse::Node { .. }), "{r:?}");
        mesh.flush();
        for n in nodes.iter_mut() {
            let seen = n.got.len();
            mesh.pump(n);
            let removed = n.got[seen..].iter().any(
                |m| matches!(decode(m), ServerMessage::PeerMapDelta { remove, .. } if remove == [gone_id]),
            );
            assert!(removed, "node {} did not hear of the removal", n.id);
        }
        let late = mesh.join("e");
        let ServerMessage::PeerMap { nodes: map, .. } = decode(maps(&late)[0]) else {
            panic!("not a peer map");
        };
        let names: Vec<&str> = map.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c", "e"]);
    }

    #[test]
    fn a_herd_gets_its_maps_a_bounded_number_at_a_time_and_no_delta_before() {
        let mut mesh = Mesh::new();
        let herd = MAPS_IN_FLIGHT + MAPS_PER_TURN;
        let keys: Vec<Key> = (0..herd).map(|i| mesh.join(&format!("n{i}")).key).collect();
        mesh.flush();
        for id in 1..mesh.next {
            mesh.hub.closed(id);
        }
        mesh.flush();
        // The restart: everyone's Hello arrives in one turn, and nobody reads yet.
        mesh.hub.handle_timeout(mesh.now);
        let mut nodes = Vec::new();
        for key in keys {
            let id = mesh.next;
            mesh.next += 1;
            mesh.hub.accept(id, mesh.now);
            let mut ch = Channel::client(&key, &mesh.token.server_key).unwrap();
            let hello = ClientMessage::Hello {
                version: PROTOCOL_VERSION,
                hostname: "h".into(),
                candidates: vec![],
                online_by_id: false,
                advertise: Default::default(),
                policy: false,
            };
            ch.send(&messages::encode(&hello)).unwrap();
            let init = ch.outgoing().to_vec();
            ch.consume_outgoing(init.len());
            mesh.hub.receive(id, mesh.now, &init);
            ch.receive(mesh.hub.outgoing(id)).unwrap();
            let n = mesh.hub.outgoing(id).len();
            mesh.hub.consume_outgoing(id, n);
            let hello = ch.outgoing().to_vec();
            ch.consume_outgoing(hello.len());
            mesh.hub.receive(id, mesh.now, &hello);
            nodes.push(Node {
                id,
                key,
                ch,
                got: vec![],
            });
        }
        assert_eq!(
            mesh.hub.map_in_flight.len(),
            MAPS_PER_TURN,
            "one turn seals a bounded number of maps"
        );
        // The others' returns are flushed while most still wait for their map.
        mesh.flush();
        for _ in 0..herd {
            mesh.hub.handle_timeout(mesh.now);
        }
        assert_eq!(
            mesh.hub.map_in_flight.len(),
            MAPS_IN_FLIGHT,
            "maps nobody reads are bounded in number"
        );
        assert!(mesh.hub.poll_timeout().is_some());
        // Now everyone reads, turn after turn, until all have their map.
        for _ in 0..herd {
            for n in nodes.iter_mut() {
                mesh.pump(n);
            }
        }
        for n in &nodes {
            let kinds: Vec<String> = n
                .got
                .iter()
                .map(|m| String::from_utf8_lossy(&m[..20.min(m.len())]).into_owned())
                .collect();
            let first_map = kinds.iter().position(|k| k.starts_with(r#"{"type":"peer_map""#));
            let first_delta = kinds.iter().position(|k| k.starts_with(r#"{"type":"peer_map_"#));
            assert_eq!(maps(n).len(), 1, "node {}: {kinds:?}", n.id);
            assert!(
                first_delta.is_none_or(|d| Some(d) > first_map),
                "node {} got a delta before its map: {kinds:?}",
                n.id
            );
        }
        assert!(mesh.hub.map_queue.is_empty() && mesh.hub.map_in_flight.is_empty());
    }
}

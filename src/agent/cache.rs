//! What the agent keeps on disk: its key, its coordinator, and the last peer
//! map, so a restart with the coordinator unreachable still brings the mesh back.
//!
//! Two files, both mode 0600 and replaced atomically. `agent.json` in the
//! state directory is the node's identity (the private key, the coordinator,
//! whether it has joined): it must survive a reboot, so on a router it lives
//! on flash, and it is written only when the identity changes (joining, a key
//! rotation, a rename of this node). `peers.json` in the cache directory is the
//! last peer map: it changes whenever any node in the mesh does, so its writes
//! are coalesced ([`Coalescer`]: at most one per [`MAP_WRITE_INTERVAL`], the
//! latest at a clean stop) and skipped when nothing in it changed. The cache
//! directory defaults to the state directory; OpenWrt points it at /tmp, where
//! losing it costs only a restart that waits for the coordinator's map.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::control::messages::{PeerInfo, RelayInfo, WgStunInfo};
use crate::coord::invite::{JoinToken, secret_hash};
use crate::keys::Key;

pub const STATE_FILE: &str = "agent.json";
pub const MAP_FILE: &str = "peers.json";
/// A busy mesh changes its map many times a minute; flash wears per write.
/// A crash loses at most this much of the map, which the coordinator resends.
pub const MAP_WRITE_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    pub private_key: Key,
    pub server_key: Key,
    pub servers: Vec<String>,
    /// The invite secret, kept only until the coordinator has enrolled us.
    pub join_secret: Option<String>,
    pub requested_name: Option<String>,
    pub me: Option<PeerInfo>,
    pub peers: Vec<PeerInfo>,
    /// A new key sent to the coordinator but not yet confirmed; kept so a
    /// restart in between can still adopt it (the old key may be gone).
    #[serde(default)]
    pub pending_private_key: Option<Key>,
    /// The mesh's relays as last published, so a restart without the
    /// coordinator still reaches peers that are only reachable through one.
    #[serde(default)]
    pub relays: Vec<RelayInfo>,
    /// The mesh's WG-STUN servers as last published (see `WgStunInfo`).
    #[serde(default)]
    pub wgstun: Vec<WgStunInfo>,
    /// Join tokens whose coordinator address this node has followed, oldest
    /// first (see [`AgentState::follow_token_address`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub address_tokens: Vec<String>,
}

/// Enough tokens to outlast any sequence of moves an operator makes; the
/// oldest is forgotten first.
const MAX_ADDRESS_TOKENS: usize = 16;

impl AgentState {
    /// Takes the coordinator address from a join token for this node's mesh,
    /// unless the node has followed this token before. Returns the addresses
    /// it replaced. A token seen before changes nothing: after `warren up
    /// --join NEW` moved the node, the token file may still hold the old
    /// token, and the next start must not move the node back.
    pub fn follow_token_address(&mut self, token: &JoinToken) -> Option<Vec<String>> {
        let digest = token_digest(token);
        if self.address_tokens.contains(&digest) {
            return None;
        }
        self.address_tokens.push(digest);
        let excess = self.address_tokens.len().saturating_sub(MAX_ADDRESS_TOKENS);
        self.address_tokens.drain(..excess);
        (self.servers != token.servers).then(|| std::mem::replace(&mut self.servers, token.servers.clone()))
    }
}

/// A token's identity without its secret: the first half of the invite
/// secret's hash (what the coordinator looks invites up by).
fn token_digest(token: &JoinToken) -> String {
    secret_hash(&token.secret)[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `peers.json`: the part of [`AgentState`] that follows the mesh.
#[derive(Debug, Serialize, Deserialize)]
struct MapFile {
    /// Whose map it is: a map left by another membership is not restored.
    server_key: Key,
    me: Option<PeerInfo>,
    peers: Vec<PeerInfo>,
    relays: Vec<RelayInfo>,
    wgstun: Vec<WgStunInfo>,
}

/// The identity file's content: the state without the map, and this node's
/// entry without what changes with the network (candidates, presence, relay).
/// Written in the old single-file layout, so an older agent still reads it.
fn identity_bytes(st: &AgentState) -> Result<Vec<u8>> {
    let me = st.me.as_ref().map(|m| PeerInfo {
        candidates: Vec::new(),
        online: false,
        home_relay: None,
        routes: Vec::new(),
        exit: false,
        ..m.clone()
    });
    let id = AgentState {
        me,
        peers: Vec::new(),
        relays: Vec::new(),
        wgstun: Vec::new(),
        ..st.clone()
    };
    Ok(serde_json::to_vec_pretty(&id)?)
}

fn map_bytes(st: &AgentState) -> Result<Vec<u8>> {
    let map = MapFile {
        server_key: st.server_key,
        me: st.me.clone(),
        peers: st.peers.clone(),
        relays: st.relays.clone(),
        wgstun: st.wgstun.clone(),
    };
    Ok(serde_json::to_vec_pretty(&map)?)
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

pub fn map_path(cache_dir: &Path) -> PathBuf {
    cache_dir.join(MAP_FILE)
}

fn read(p: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(p) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading agent state {}", p.display())),
    }
}

/// Replaces `dir/name` with `bytes` (a new inode: a reader sees the old file
/// or the new one, never half of one). Creates `dir` (0700) if missing: the
/// cache directory may be on a tmpfs that a reboot emptied.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let p = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let what = || format!("writing agent state {}", p.display());
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(what)?;
    }
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(what)?;
    f.write_all(bytes).with_context(what)?;
    f.sync_all().with_context(what)?;
    std::fs::rename(&tmp, &p).with_context(what)?;
    Ok(())
}

/// When the peer map is written: the first change after a quiet interval at
/// once, later ones together at most once per interval. Sans-IO: the caller
/// brings the clock, so the timing is tested without waiting.
#[derive(Debug)]
pub struct Coalescer {
    interval: Duration,
    last_write: Option<Instant>,
    due: Option<Instant>,
}

impl Coalescer {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_write: None,
            due: None,
        }
    }

    /// Something to write came up at `now`.
    pub fn changed(&mut self, now: Instant) {
        if self.due.is_none() {
            let earliest = self.last_write.map_or(now, |t| t + self.interval);
            self.due = Some(earliest.max(now));
        }
    }

    /// When the pending write is due (`None`: nothing pending).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.due
    }

    /// Whether a pending write is due at `now`; it is no longer pending after.
    pub fn take_due(&mut self, now: Instant) -> bool {
        match self.due {
            Some(t) if t <= now => {
                self.due = None;
                true
            }
            _ => false,
        }
    }

    /// Whether a write is pending, due or not (a clean stop writes it now).
    pub fn take_pending(&mut self) -> bool {
        self.due.take().is_some()
    }

    /// A write happened at `now`: the next one waits an interval.
    pub fn wrote(&mut self, now: Instant) {
        self.last_write = Some(now);
    }
}

/// The two files and what is on disk in them, so an unchanged state is not
/// written again (a restart, a reconnect, a map event that changed nothing).
pub struct Store {
    state_dir: PathBuf,
    cache_dir: PathBuf,
    identity_on_disk: Option<Vec<u8>>,
    map_on_disk: Option<Vec<u8>>,
    map_writes: Coalescer,
    /// Forgotten (out of the mesh): nothing is written until `save_all`.
    forgotten: bool,
}

impl Store {
    /// Opens the files and reads the state they hold (`None`: never joined).
    pub fn open(state_dir: &Path, cache_dir: &Path) -> Result<(Self, Option<AgentState>)> {
        let mut store = Self {
            state_dir: state_dir.to_path_buf(),
            cache_dir: cache_dir.to_path_buf(),
            identity_on_disk: None,
            map_on_disk: None,
            map_writes: Coalescer::new(MAP_WRITE_INTERVAL),
            forgotten: false,
        };
        let p = path(state_dir);
        let Some(bytes) = read(&p)? else {
            return Ok((store, None));
        };
        let mut st: AgentState =
            serde_json::from_slice(&bytes).with_context(|| format!("reading agent state {}", p.display()))?;
        store.identity_on_disk = Some(bytes);
        let mp = map_path(cache_dir);
        if let Some(bytes) = read(&mp)? {
            match serde_json::from_slice::<MapFile>(&bytes) {
                Ok(m)
                    if m.server_key == st.server_key
                        && m.me.as_ref().map(|n| n.id) == st.me.as_ref().map(|n| n.id) =>
                {
                    (st.me, st.peers, st.relays, st.wgstun) = (m.me, m.peers, m.relays, m.wgstun);
                    store.map_on_disk = Some(bytes);
                }
                // A cache only: the coordinator sends the map again.
                Ok(_) => log_warn!("agent: ignoring {}: it is another membership's map", mp.display()),
                Err(e) => log_warn!("agent: ignoring {}: {e}", mp.display()),
            }
        }
        Ok((store, Some(st)))
    }

    /// Writes the identity now if it changed: a key or a membership must be on
    /// disk before it is used.
    pub fn save_identity(&mut self, st: &AgentState) -> Result<bool> {
        let bytes = identity_bytes(st).context("encoding agent state")?;
        if self.forgotten || self.identity_on_disk.as_ref() == Some(&bytes) {
            return Ok(false);
        }
        write_atomic(&self.state_dir, STATE_FILE, &bytes)?;
        self.identity_on_disk = Some(bytes);
        Ok(true)
    }

    /// Both files now (a fresh identity starts with an empty map).
    pub fn save_all(&mut self, now: Instant, st: &AgentState) -> Result<()> {
        self.forgotten = false;
        self.save_identity(st)?;
        self.map_writes.take_pending();
        self.write_map(now, st)?;
        Ok(())
    }

    /// The map in `st` changed at `now`; [`Store::write_due`] writes it.
    pub fn map_changed(&mut self, now: Instant) {
        self.map_writes.changed(now);
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.map_writes.poll_timeout()
    }

    /// Writes the map if its write is due and it differs from the file.
    pub fn write_due(&mut self, now: Instant, st: &AgentState) -> Result<bool> {
        if !self.map_writes.take_due(now) {
            return Ok(false);
        }
        self.write_map(now, st).inspect_err(|_| {
            // Tried again an interval later, not on every turn of the loop.
            self.map_writes.wrote(now);
            self.map_writes.changed(now);
        })
    }

    /// At a clean stop: the latest map, if a write is pending.
    pub fn flush(&mut self, now: Instant, st: &AgentState) -> Result<bool> {
        if !self.map_writes.take_pending() {
            return Ok(false);
        }
        self.write_map(now, st)
    }

    fn write_map(&mut self, now: Instant, st: &AgentState) -> Result<bool> {
        let bytes = map_bytes(st).context("encoding the peer map")?;
        if self.forgotten || self.map_on_disk.as_ref() == Some(&bytes) {
            return Ok(false);
        }
        write_atomic(&self.cache_dir, MAP_FILE, &bytes)?;
        self.map_on_disk = Some(bytes);
        self.map_writes.wrote(now);
        Ok(true)
    }

    /// Out of the mesh: both files go, and nothing pending brings them back.
    pub fn forget(&mut self) {
        let _ = std::fs::remove_file(path(&self.state_dir));
        let _ = std::fs::remove_file(map_path(&self.cache_dir));
        self.identity_on_disk = None;
        self.map_on_disk = None;
        self.map_writes.take_pending();
        self.forgotten = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn peer(id: u64, name: &str) -> PeerInfo {
        PeerInfo {
            id,
            name: name.into(),
            mesh_addr: "100.64.0.8".parse().unwrap(),
            public_key: Key::generate_private().public_key(),
            candidates: vec![],
            online: true,
            home_relay: Some(Key([9; 32])),
            routes: Vec::new(),
            exit: false,
        }
    }

    fn state() -> AgentState {
        AgentState {
            private_key: Key::generate_private(),
            server_key: Key::generate_private().public_key(),
            servers: vec!["203.0.113.1:7777".into()],
            join_secret: None,
            requested_name: None,
            me: Some(peer(1, "a")),
            peers: vec![peer(2, "b")],
            pending_private_key: Some(Key::generate_private()),
            relays: vec![RelayInfo {
                public_key: Key([9; 32]),
                addrs: vec!["203.0.113.1:7778".into()],
            }],
            wgstun: vec![WgStunInfo {
                public_key: Key([8; 32]),
                endpoint: "203.0.113.1:3479".into(),
                stun: Some("203.0.113.1:3478".into()),
            }],
            address_tokens: Vec::new(),
        }
    }

    fn token(addr: &str, key: Key) -> JoinToken {
        JoinToken::new(vec![addr.into()], key)
    }

    #[test]
    fn a_new_token_moves_the_coordinator_address_and_an_old_one_does_not() {
        let mut st = state();
        let old = token("203.0.113.1:7777", st.server_key);
        let new = token("198.51.100.2:7777", st.server_key);
        // The token the node joined with: same address, nothing to change.
        assert_eq!(st.follow_token_address(&old), None);
        // `warren up --join NEW`: the coordinator moved.
        assert_eq!(
            st.follow_token_address(&new),
            Some(vec!["203.0.113.1:7777".to_string()])
        );
        assert_eq!(st.servers, ["198.51.100.2:7777"]);
        // The next start still reads the old token from the token file.
        assert_eq!(st.follow_token_address(&old), None);
        assert_eq!(st.servers, ["198.51.100.2:7777"]);
        // The followed tokens survive a restart (they are in the identity file).
        let back: AgentState = serde_json::from_slice(&identity_bytes(&st).unwrap()).unwrap();
        assert_eq!(back.address_tokens, st.address_tokens);
        // A third move works, and the list stays bounded.
        for i in 0..3 * MAX_ADDRESS_TOKENS {
            st.follow_token_address(&token(&format!("192.0.2.{}:7777", i % 250), st.server_key));
        }
        assert_eq!(st.address_tokens.len(), MAX_ADDRESS_TOKENS);
        assert!(!st.address_tokens.contains(&token_digest(&old)));
    }

    /// The file's inode: every write replaces the file, so it counts writes.
    fn inode(p: &Path) -> Option<u64> {
        std::fs::metadata(p).ok().map(|m| m.ino())
    }

    #[test]
    fn coalescer_writes_at_most_once_per_interval() {
        let t0 = Instant::now();
        let s = |n: u64| t0 + Duration::from_secs(n);
        let mut c = Coalescer::new(Duration::from_secs(30));
        assert_eq!(c.poll_timeout(), None);
        assert!(!c.take_due(t0) && !c.take_pending());
        // The first change after a quiet time is written at once.
        c.changed(t0);
        assert_eq!(c.poll_timeout(), Some(t0));
        assert!(c.take_due(t0));
        c.wrote(t0);
        // 50 changes in the next 25 s: one write, an interval after the last.
        let mut writes = 0;
        for i in 0..50 {
            let now = t0 + Duration::from_millis(500 * (i + 1));
            c.changed(now);
            assert_eq!(c.poll_timeout(), Some(s(30)), "change {i}");
            if c.take_due(now) {
                writes += 1;
            }
        }
        assert_eq!(writes, 0);
        assert!(!c.take_due(s(29)));
        assert!(c.take_due(s(30)));
        c.wrote(s(30));
        assert!(!c.take_due(s(31)) && c.poll_timeout().is_none());
        // A change long after the last write is due at once again.
        c.changed(s(100));
        assert_eq!(c.poll_timeout(), Some(s(100)));
        // A clean stop takes a pending write whether due or not, once.
        c.wrote(s(100));
        assert!(c.take_due(s(100)));
        c.changed(s(101));
        assert!(!c.take_due(s(101)));
        assert!(c.take_pending());
        assert!(!c.take_pending() && c.poll_timeout().is_none());
    }

    #[test]
    fn round_trip_private_and_atomic() {
        let dir = TempDir::new("cache");
        let (mut store, none) = Store::open(&dir.0, &dir.0).unwrap();
        assert!(none.is_none());
        let st = state();
        let now = Instant::now();
        store.save_all(now, &st).unwrap();
        let (_, loaded) = Store::open(&dir.0, &dir.0).unwrap();
        assert_eq!(loaded.unwrap(), st);
        for p in [path(&dir.0), map_path(&dir.0)] {
            let mode = std::fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", p.display());
        }
        // The private key is only in the identity file.
        let map = std::fs::read_to_string(map_path(&dir.0)).unwrap();
        assert!(!map.contains(&st.private_key.to_base64()), "{map}");
        std::fs::write(path(&dir.0), b"{broken").unwrap();
        let err = format!("{:#}", Store::open(&dir.0, &dir.0).err().unwrap());
        assert!(
            err.starts_with("reading agent state ") && err.contains("agent.json"),
            "{err}"
        );
    }

    #[test]
    fn map_changes_leave_the_identity_alone_and_are_coalesced() {
        let state_dir = TempDir::new("cache-state");
        let cache = TempDir::new("cache-tmp");
        let cache_dir = cache.0.join("warren");
        let (mut store, _) = Store::open(&state_dir.0, &cache_dir).unwrap();
        let mut st = state();
        let t0 = Instant::now();
        store.save_all(t0, &st).unwrap();
        let (id0, map0) = (inode(&path(&state_dir.0)), inode(&map_path(&cache_dir)));
        assert!(id0.is_some() && map0.is_some());
        assert!(!map_path(&state_dir.0).exists(), "the map went to the state dir");

        // 50 renames of a peer within 25 s, each reported by the caller.
        for i in 0..50u64 {
            let now = t0 + Duration::from_millis(500 * (i + 1));
            st.peers[0].name = format!("b{i}");
            st.me.as_mut().unwrap().candidates = vec![format!("10.0.0.1:{}", 1000 + i).parse().unwrap()];
            store.map_changed(now);
            assert!(!store.write_due(now, &st).unwrap());
            assert!(
                !store.save_identity(&st).unwrap(),
                "identity rewritten at change {i}"
            );
        }
        assert_eq!(inode(&map_path(&cache_dir)), map0);
        let due = store.poll_timeout().unwrap();
        assert_eq!(due, t0 + MAP_WRITE_INTERVAL);
        assert!(store.write_due(due, &st).unwrap());
        assert_ne!(inode(&map_path(&cache_dir)), map0);
        assert_eq!(inode(&path(&state_dir.0)), id0);

        // A change that changes nothing writes nothing, even when due.
        let map1 = inode(&map_path(&cache_dir));
        store.map_changed(due + MAP_WRITE_INTERVAL);
        assert!(!store.write_due(due + MAP_WRITE_INTERVAL, &st).unwrap());
        assert_eq!(inode(&map_path(&cache_dir)), map1);

        // A clean stop writes the latest map before its interval is up.
        let later = due + MAP_WRITE_INTERVAL + Duration::from_secs(1);
        st.peers[0].name = "last".into();
        store.map_changed(later);
        store.map_changed(later);
        assert!(store.write_due(later, &st).unwrap());
        st.peers[0].name = "final".into();
        store.map_changed(later);
        assert!(!store.write_due(later, &st).unwrap());
        assert!(store.flush(later, &st).unwrap());
        assert!(!store.flush(later, &st).unwrap());
        let (_, loaded) = Store::open(&state_dir.0, &cache_dir).unwrap();
        assert_eq!(loaded.unwrap(), st);

        // Renaming this node is an identity change: written at once.
        st.me.as_mut().unwrap().name = "a2".into();
        assert!(store.save_identity(&st).unwrap());

        // Out of the mesh: both files go and a pending write does not bring them back.
        store.map_changed(later);
        store.forget();
        assert!(!store.flush(later, &st).unwrap());
        assert!(!store.save_identity(&st).unwrap());
        assert!(!path(&state_dir.0).exists() && !map_path(&cache_dir).exists());
    }

    #[test]
    fn restores_without_a_map_from_the_identity_and_from_the_old_layout() {
        let state_dir = TempDir::new("cache-old");
        let cache = TempDir::new("cache-gone");
        let st = state();
        // One file with everything in it: what agents before the split wrote.
        write_atomic(&state_dir.0, STATE_FILE, &serde_json::to_vec(&st).unwrap()).unwrap();
        let (mut store, loaded) = Store::open(&state_dir.0, &cache.0).unwrap();
        assert_eq!(loaded.as_ref(), Some(&st));
        store.save_all(Instant::now(), &st).unwrap();
        // The cache on a tmpfs is gone after a reboot: still a member, same
        // key and address, the map waits for the coordinator.
        std::fs::remove_file(map_path(&cache.0)).unwrap();
        let (_, loaded) = Store::open(&state_dir.0, &cache.0).unwrap();
        let loaded = loaded.unwrap();
        assert_eq!(loaded.private_key, st.private_key);
        assert_eq!(
            loaded.me.as_ref().map(|m| (m.id, m.mesh_addr)),
            Some((1, st.me.as_ref().unwrap().mesh_addr))
        );
        assert!(loaded.peers.is_empty());
        // A map another membership left there is not taken for ours.
        let mut other = state();
        other.peers = vec![peer(7, "stranger")];
        write_atomic(&cache.0, MAP_FILE, &map_bytes(&other).unwrap()).unwrap();
        let (_, loaded) = Store::open(&state_dir.0, &cache.0).unwrap();
        assert!(loaded.unwrap().peers.is_empty());
    }
}

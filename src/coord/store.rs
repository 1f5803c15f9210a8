//! The coordinator's state in SQLite: nodes and invites.
//!
//! One file in WAL mode; the schema is migrated from `PRAGMA user_version` by
//! the SQL embedded below, so an upgraded binary upgrades its database.
//! Times are Unix seconds passed in by the caller, which keeps tests exact.

use std::io::ErrorKind;
use std::net::Ipv4Addr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};
use serde::Serialize;

use super::names;
use crate::control::messages::ErrorCode;
use crate::keys::Key;

/// Schema steps; step `i` moves `user_version` from `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE nodes (
    id         INTEGER PRIMARY KEY,
    public_key TEXT    NOT NULL UNIQUE,
    name       TEXT    NOT NULL,
    mesh_addr  INTEGER NOT NULL UNIQUE,
    hostname   TEXT    NOT NULL,
    created    INTEGER NOT NULL,
    last_seen  INTEGER,
    removed    INTEGER
);
-- A removed node keeps its row (its key stays refused, its address is never reused)
-- but gives its name back.
CREATE UNIQUE INDEX nodes_active_name ON nodes(name) WHERE removed IS NULL;
CREATE TABLE invites (
    id          INTEGER PRIMARY KEY,
    secret_hash BLOB    NOT NULL UNIQUE,
    reusable    INTEGER NOT NULL,
    expires     INTEGER,
    uses        INTEGER NOT NULL DEFAULT 0,
    name        TEXT,
    created     INTEGER NOT NULL
);
"#,
    super::routes::SCHEMA,
    r#"
-- The access policy in force (coord/policy.rs): at most one row, the file as set.
CREATE TABLE policy (
    id      INTEGER PRIMARY KEY CHECK (id = 1),
    text    TEXT    NOT NULL,
    set_at  INTEGER NOT NULL
);
"#,
];

/// First address handed to nodes: 100.64.0.0/29 is reserved for services (WG-STUN is 100.64.0.4).
pub const FIRST_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 8);
/// Last address of 100.64.0.0/10.
pub const LAST_NODE_ADDR: Ipv4Addr = Ipv4Addr::new(100, 127, 255, 254);
/// How long a writer waits for another connection's lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The database holds every node's key and the invites' secret hashes: owner only.
const DB_MODE: u32 = 0o600;
/// Files SQLite keeps beside the database in WAL mode.
const DB_SIDE_FILES: &[&str] = &["-wal", "-shm"];

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: u64,
    pub public_key: Key,
    pub name: String,
    pub mesh_addr: Ipv4Addr,
    pub hostname: String,
    pub created: i64,
    pub last_seen: Option<i64>,
    pub removed: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Invite {
    pub id: u64,
    pub reusable: bool,
    pub expires: Option<i64>,
    pub uses: u64,
    pub name: Option<String>,
    pub created: i64,
}

/// What a node asks for when it redeems an invite.
pub struct JoinRequest<'a> {
    pub secret_hash: &'a [u8],
    pub public_key: Key,
    pub requested_name: Option<&'a str>,
    pub hostname: &'a str,
}

/// A refusal the node is told about, as opposed to a failure of the coordinator.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub reason: String,
}

impl Refusal {
    fn new(code: ErrorCode, reason: impl Into<String>) -> Refusal {
        Refusal {
            code,
            reason: reason.into(),
        }
    }
}

/// id, reusable, expires, uses, name.
type InviteRow = (i64, bool, Option<i64>, i64, Option<String>);

pub struct Store {
    /// Shared with the modules that keep their own tables (`routes`).
    pub(super) conn: Connection,
    path: PathBuf,
}

const NODE_COLUMNS: &str = "id, public_key, name, mesh_addr, hostname, created, last_seen, removed";

/// rusqlite errors repeat their message in their source; keep one copy so
/// the error stays one readable line.
trait Flat<T> {
    fn flat(self) -> Result<T>;
}

impl<T> Flat<T> for rusqlite::Result<T> {
    fn flat(self) -> Result<T> {
        self.map_err(|e| anyhow!("{e}"))
    }
}

fn node_from_row(row: &Row) -> rusqlite::Result<Node> {
    let key: String = row.get(1)?;
    let public_key = key
        .parse::<Key>()
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, e.into()))?;
    Ok(Node {
        id: row.get::<_, i64>(0)? as u64,
        public_key,
        name: row.get(2)?,
        mesh_addr: Ipv4Addr::from(row.get::<_, u32>(3)?),
        hostname: row.get(4)?,
        created: row.get(5)?,
        last_seen: row.get(6)?,
        removed: row.get(7)?,
    })
}

impl Store {
    pub fn open(path: &Path) -> Result<Store> {
        restrict(path)?;
        let conn = Connection::open(path)
            .flat()
            .with_context(|| format!("opening database {}", path.display()))?;
        let mut store = Store {
            conn,
            path: path.to_path_buf(),
        };
        store
            .setup()
            .with_context(|| format!("preparing database {}", path.display()))?;
        Ok(store)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn setup(&mut self) -> Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT).flat()?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .flat()?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("could not switch to WAL journal (got {mode})");
        }
        self.conn
            .execute_batch("PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;")
            .flat()?;
        let version = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
            .flat()? as usize;
        if version > MIGRATIONS.len() {
            bail!(
                "schema version {version} is newer than this warren understands ({}); upgrade warren",
                MIGRATIONS.len()
            );
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = self.conn.transaction().flat()?;
            tx.execute_batch(sql)
                .flat()
                .with_context(|| format!("migrating schema to version {}", i + 1))?;
            tx.pragma_update(None, "user_version", (i + 1) as i64).flat()?;
            tx.commit()
                .flat()
                .with_context(|| format!("migrating schema to version {}", i + 1))?;
        }
        Ok(())
    }

    /// Active nodes, by id.
    pub fn nodes(&self) -> Result<Vec<Node>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE removed IS NULL ORDER BY id");
        let mut stmt = self.conn.prepare(&sql).flat().context("listing nodes")?;
        let rows = stmt
            .query_map([], node_from_row)
            .flat()
            .context("listing nodes")?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .flat()
            .context("listing nodes")
    }

    /// Keys of removed nodes (relays refuse them).
    pub fn removed_keys(&self) -> Result<Vec<Key>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE removed IS NOT NULL ORDER BY id");
        let mut stmt = self.conn.prepare(&sql).flat().context("listing removed nodes")?;
        let rows = stmt
            .query_map([], |row| node_from_row(row).map(|n| n.public_key))
            .flat()
            .context("listing removed nodes")?;
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .flat()
            .context("listing removed nodes")
    }

    /// The node with this key, removed ones included.
    pub fn node_by_key(&self, key: &Key) -> Result<Option<Node>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE public_key = ?1");
        self.conn
            .query_row(&sql, [key.to_base64()], node_from_row)
            .optional()
            .flat()
            .with_context(|| format!("looking up node {}", key.short()))
    }

    pub fn node(&self, id: u64) -> Result<Option<Node>> {
        let sql = format!("SELECT {NODE_COLUMNS} FROM nodes WHERE id = ?1");
        self.conn
            .query_row(&sql, [id as i64], node_from_row)
            .optional()
            .flat()
            .with_context(|| format!("looking up node {id}"))
    }

    /// Finds an active node the way an administrator names it: name, mesh
    /// address, public key, or numeric id.
    pub fn find_node(&self, reference: &str) -> Result<Node> {
        let nodes = self.nodes()?;
        let found = nodes.into_iter().find(|n| {
            n.name == reference
                || n.mesh_addr.to_string() == reference
                || n.public_key.to_base64() == reference
                || n.id.to_string() == reference
        });
        found.ok_or_else(|| anyhow!("no node named {reference:?} (by name, mesh address, key or id)"))
    }

    /// Redeems an invite and enrolls the node in one transaction, so a
    /// single-use invite can never enroll two nodes.
    pub fn join(&mut self, req: &JoinRequest, now: i64) -> Result<std::result::Result<Node, Refusal>> {
        let what = || format!("enrolling node {}", req.public_key.short());
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .flat()
            .with_context(what)?;
        let invite: Option<InviteRow> = tx
            .query_row(
                "SELECT id, reusable, expires, uses, name FROM invites WHERE secret_hash = ?1",
                [req.secret_hash],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .optional()
            .flat()
            .with_context(what)?;
        let Some((invite_id, reusable, expires, uses, invite_name)) = invite else {
            return Ok(Err(Refusal::new(
                ErrorCode::InviteUnknown,
                "invite not recognised by this coordinator (forged, revoked, or for another server)",
            )));
        };
        let existing: Option<Node> = tx
            .query_row(
                &format!("SELECT {NODE_COLUMNS} FROM nodes WHERE public_key = ?1"),
                [req.public_key.to_base64()],
                node_from_row,
            )
            .optional()
            .flat()
            .with_context(what)?;
        match existing {
            Some(n) if n.removed.is_some() => {
                return Ok(Err(Refusal::new(
                    ErrorCode::Removed,
                    format!(
                        "node key {} was removed from the mesh; join with a new key",
                        n.public_key.short()
                    ),
                )));
            }
            // Joining again with the same key is a reconnect; it does not spend the invite.
            Some(n) => return Ok(Ok(n)),
            None => {}
        }
        if let Some(exp) = expires.filter(|&e| e <= now) {
            return Ok(Err(Refusal::new(
                ErrorCode::InviteExpired,
                format!("invite expired {} ago", human_duration(now - exp)),
            )));
        }
        if !reusable && uses > 0 {
            return Ok(Err(Refusal::new(
                ErrorCode::InviteUsed,
                "invite was already used (it is single-use)",
            )));
        }
        let wanted = invite_name
            .as_deref()
            .or(req.requested_name)
            .map(names::sanitize)
            .unwrap_or_else(|| names::sanitize(req.hostname));
        let name = unique_name(&tx, &wanted).with_context(what)?;
        let addr = next_addr(&tx).with_context(|| format!("enrolling node {name}"))?;
        tx.execute(
            "INSERT INTO nodes (public_key, name, mesh_addr, hostname, created, last_seen)
             VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
            params![
                req.public_key.to_base64(),
                name,
                u32::from(addr),
                req.hostname,
                now
            ],
        )
        .flat()
        .with_context(|| format!("storing node {name}"))?;
        let id = tx.last_insert_rowid() as u64;
        tx.execute("UPDATE invites SET uses = uses + 1 WHERE id = ?1", [invite_id])
            .flat()
            .with_context(|| format!("storing node {name}: counting the invite's use"))?;
        tx.commit()
            .flat()
            .with_context(|| format!("storing node {name}"))?;
        self.node(id)?
            .ok_or_else(|| anyhow!("node {name} vanished after being stored"))
            .map(Ok)
    }

    pub fn touch(&mut self, id: u64, now: i64) -> Result<()> {
        self.conn
            .execute(
                "UPDATE nodes SET last_seen = ?2 WHERE id = ?1",
                params![id as i64, now],
            )
            .flat()
            .with_context(|| format!("recording last-seen time of node {id}"))?;
        Ok(())
    }

    pub fn rename(&mut self, id: u64, new_name: &str) -> Result<Node> {
        names::validate(new_name)?;
        let node = self.active(id)?;
        if let Some(other) = self
            .nodes()?
            .into_iter()
            .find(|n| n.name == new_name && n.id != id)
        {
            bail!(
                "name {new_name:?} is already taken by the node at {}",
                other.mesh_addr
            );
        }
        self.conn
            .execute(
                "UPDATE nodes SET name = ?2 WHERE id = ?1",
                params![id as i64, new_name],
            )
            .flat()
            .with_context(|| format!("renaming node {} to {new_name}", node.name))?;
        self.active(id)
    }

    pub fn remove(&mut self, id: u64, now: i64) -> Result<Node> {
        let node = self.active(id)?;
        self.conn
            .execute(
                "UPDATE nodes SET removed = ?2 WHERE id = ?1",
                params![id as i64, now],
            )
            .flat()
            .with_context(|| format!("removing node {}", node.name))?;
        Ok(node)
    }

    /// Gives a node a new key; its id, name and address stay.
    pub fn rotate_key(&mut self, id: u64, new_key: &Key) -> Result<Node> {
        let node = self.active(id)?;
        if self.node_by_key(new_key)?.is_some() {
            bail!(
                "rotating key of node {}: key {} is already in use",
                node.name,
                new_key.short()
            );
        }
        self.conn
            .execute(
                "UPDATE nodes SET public_key = ?2 WHERE id = ?1",
                params![id as i64, new_key.to_base64()],
            )
            .flat()
            .with_context(|| format!("rotating key of node {}", node.name))?;
        self.active(id)
    }

    fn active(&self, id: u64) -> Result<Node> {
        match self.node(id)? {
            Some(n) if n.removed.is_none() => Ok(n),
            Some(n) => bail!("node {} was removed", n.name),
            None => bail!("no node with id {id}"),
        }
    }

    pub fn create_invite(
        &mut self,
        secret_hash: &[u8],
        reusable: bool,
        expires: Option<i64>,
        name: Option<&str>,
        now: i64,
    ) -> Result<Invite> {
        if let Some(n) = name {
            names::validate(n)?;
        }
        self.conn
            .execute(
                "INSERT INTO invites (secret_hash, reusable, expires, name, created) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![secret_hash, reusable, expires, name, now],
            )
            .flat().context("storing invite")?;
        let id = self.conn.last_insert_rowid() as u64;
        Ok(Invite {
            id,
            reusable,
            expires,
            uses: 0,
            name: name.map(str::to_string),
            created: now,
        })
    }
}

/// The access policy (see `coord::policy`): the text as the administrator set it.
impl Store {
    pub fn policy_text(&self) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT text FROM policy WHERE id = 1", [], |r| r.get(0))
            .optional()
            .flat()
            .context("reading the policy")
    }

    /// Replaces the policy; `None` clears it.
    pub fn set_policy_text(&mut self, text: Option<&str>, now: i64) -> Result<()> {
        match text {
            Some(t) => self.conn.execute(
                "INSERT INTO policy (id, text, set_at) VALUES (1, ?1, ?2)
                 ON CONFLICT (id) DO UPDATE SET text = ?1, set_at = ?2",
                params![t, now],
            ),
            None => self.conn.execute("DELETE FROM policy", []),
        }
        .flat()
        .context("storing the policy")?;
        Ok(())
    }
}

/// Makes the database owner-only before SQLite opens it. SQLite creates its
/// `-wal` and `-shm` files with the database file's mode, so creating that
/// file 0600 covers them; files left by an older warren are tightened too.
fn restrict(path: &Path) -> Result<()> {
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(DB_MODE)
        .open(path)
    {
        Ok(_) => return Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("creating database {}", path.display())),
    }
    let mut files = vec![path.to_path_buf()];
    for side in DB_SIDE_FILES {
        let mut p = path.as_os_str().to_owned();
        p.push(side);
        files.push(PathBuf::from(p));
    }
    for f in files {
        match std::fs::set_permissions(&f, std::fs::Permissions::from_mode(DB_MODE)) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("restricting database file {}", f.display())),
        }
    }
    Ok(())
}

fn unique_name(tx: &Connection, wanted: &str) -> Result<String> {
    // Bounded: there cannot be more clashing names than nodes, and the address pool caps nodes.
    for n in 1..=u32::MAX {
        let candidate = names::with_suffix(wanted, n);
        let taken: bool = tx
            .query_row(
                "SELECT EXISTS(SELECT 1 FROM nodes WHERE name = ?1 AND removed IS NULL)",
                [&candidate],
                |r| r.get(0),
            )
            .flat()
            .with_context(|| format!("checking whether name {candidate} is free"))?;
        if !taken {
            return Ok(candidate);
        }
    }
    bail!("no free variant of name {wanted}")
}

/// Addresses are never reused, not even a removed node's: a stale peer
/// config somewhere must not reach a different machine.
fn next_addr(tx: &Connection) -> Result<Ipv4Addr> {
    let max: Option<u32> = tx
        .query_row("SELECT MAX(mesh_addr) FROM nodes", [], |r| r.get(0))
        .flat()
        .context("allocating mesh address")?;
    let next = match max {
        None => u32::from(FIRST_NODE_ADDR),
        Some(m) => m.max(u32::from(FIRST_NODE_ADDR) - 1) + 1,
    };
    if next > u32::from(LAST_NODE_ADDR) {
        bail!("allocating mesh address: 100.64.0.0/10 is exhausted");
    }
    Ok(Ipv4Addr::from(next))
}

pub fn human_duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub use crate::testutil::TempDir;

    fn key() -> Key {
        Key::generate_private().public_key()
    }

    fn join(
        store: &mut Store,
        hash: &[u8],
        k: Key,
        name: Option<&str>,
        host: &str,
        now: i64,
    ) -> Result<Node, Refusal> {
        let req = JoinRequest {
            secret_hash: hash,
            public_key: k,
            requested_name: name,
            hostname: host,
        };
        store.join(&req, now).unwrap()
    }

    #[test]
    fn enrolls_nodes_with_stable_addresses_and_unique_names() {
        let dir = TempDir::new("store");
        let db = dir.0.join("server.db");
        let mut s = Store::open(&db).unwrap();
        s.create_invite(b"multi", true, None, None, 100).unwrap();
        let a = join(&mut s, b"multi", key(), None, "NAS.local", 100).unwrap();
        let b = join(&mut s, b"multi", key(), None, "nas", 101).unwrap();
        let c = join(&mut s, b"multi", key(), Some("nas"), "x", 102).unwrap();
        assert_eq!(
            (a.name.as_str(), b.name.as_str(), c.name.as_str()),
            ("nas", "nas-2", "nas-3")
        );
        assert_eq!(a.mesh_addr, FIRST_NODE_ADDR);
        assert_eq!(b.mesh_addr, Ipv4Addr::new(100, 64, 0, 9));
        // Re-joining with an enrolled key returns the same node.
        assert_eq!(
            join(&mut s, b"multi", a.public_key, None, "other", 103).unwrap(),
            a
        );

        let rotated = s.rotate_key(b.id, &key()).unwrap();
        assert_eq!(
            (rotated.id, &rotated.name, rotated.mesh_addr),
            (b.id, &b.name, b.mesh_addr)
        );
        assert!(s.node_by_key(&b.public_key).unwrap().is_none());

        let renamed = s.rename(c.id, "backup").unwrap();
        assert_eq!(renamed.mesh_addr, c.mesh_addr);
        assert!(
            s.rename(a.id, "backup")
                .unwrap_err()
                .to_string()
                .contains("already taken")
        );
        assert!(s.rename(a.id, "Bad Name").is_err());

        s.remove(a.id, 200).unwrap();
        let refused = join(&mut s, b"multi", a.public_key, None, "nas", 201).unwrap_err();
        assert_eq!(refused.code, ErrorCode::Removed);
        // The name comes back, the address does not.
        let d = join(&mut s, b"multi", key(), None, "nas", 202).unwrap();
        assert_eq!(d.name, "nas");
        assert_eq!(d.mesh_addr, Ipv4Addr::new(100, 64, 0, 11));
        drop(s);

        // Everything survives a restart.
        let s = Store::open(&db).unwrap();
        let names: Vec<_> = s
            .nodes()
            .unwrap()
            .into_iter()
            .map(|n| (n.name, n.mesh_addr))
            .collect();
        assert_eq!(
            names,
            vec![
                ("nas-2".to_string(), Ipv4Addr::new(100, 64, 0, 9)),
                ("backup".to_string(), Ipv4Addr::new(100, 64, 0, 10)),
                ("nas".to_string(), Ipv4Addr::new(100, 64, 0, 11)),
            ]
        );
        assert_eq!(s.find_node("100.64.0.10").unwrap().name, "backup");
        assert_eq!(s.find_node(&rotated.public_key.to_base64()).unwrap().id, b.id);
        assert!(s.find_node("ghost").unwrap_err().to_string().contains("ghost"));
    }

    #[test]
    fn invites_are_single_use_expire_and_unknown_ones_are_refused() {
        let dir = TempDir::new("store");
        let mut s = Store::open(&dir.0.join("db")).unwrap();
        s.create_invite(b"once", false, Some(1000), Some("printer"), 0)
            .unwrap();
        s.create_invite(b"old", true, Some(50), None, 0).unwrap();
        let n = join(&mut s, b"once", key(), Some("ignored"), "h", 10).unwrap();
        assert_eq!(n.name, "printer");
        assert_eq!(
            join(&mut s, b"once", key(), None, "h", 11).unwrap_err().code,
            ErrorCode::InviteUsed
        );
        let expired = join(&mut s, b"old", key(), None, "h", 3650).unwrap_err();
        assert_eq!(expired.code, ErrorCode::InviteExpired);
        assert_eq!(expired.reason, "invite expired 60m ago");
        assert_eq!(
            join(&mut s, b"forged", key(), None, "h", 11).unwrap_err().code,
            ErrorCode::InviteUnknown
        );
    }

    #[test]
    fn address_allocation_skips_the_service_range_and_stops_at_the_end() {
        let dir = TempDir::new("store");
        let mut s = Store::open(&dir.0.join("db")).unwrap();
        s.create_invite(b"i", true, None, None, 0).unwrap();
        s.conn
            .execute(
                "INSERT INTO nodes (public_key, name, mesh_addr, hostname, created) VALUES (?1, 'last', ?2, 'h', 0)",
                params![key().to_base64(), u32::from(LAST_NODE_ADDR)],
            )
            .unwrap();
        let err = s.join(
            &JoinRequest {
                secret_hash: b"i",
                public_key: key(),
                requested_name: None,
                hostname: "h",
            },
            1,
        );
        assert!(format!("{:#}", err.unwrap_err()).contains("exhausted"));
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .permissions()
            .mode()
            & 0o777
    }

    fn db_files(db: &Path) -> Vec<PathBuf> {
        ["", "-wal", "-shm"]
            .iter()
            .map(|s| PathBuf::from(format!("{}{s}", db.display())))
            .collect()
    }

    #[test]
    fn database_files_are_owner_only() {
        // A fresh state directory, as `warren server` makes on first start.
        let dir = TempDir::new("store-mode");
        let db = dir.0.join("state").join("server.db");
        std::fs::create_dir(db.parent().unwrap()).unwrap();
        let mut s = Store::open(&db).unwrap();
        // A write, so the WAL and its index exist while the store is open.
        s.create_invite(b"i", true, None, None, 0).unwrap();
        for f in db_files(&db) {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        drop(s);

        // Files an older warren left readable by everyone are tightened on open.
        for f in db_files(&db) {
            if f.exists() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        let mut s = Store::open(&db).unwrap();
        s.create_invite(b"j", true, None, None, 0).unwrap();
        for f in db_files(&db) {
            assert_eq!(mode(&f), 0o600, "{} after reopening", f.display());
        }
        assert_eq!(
            s.nodes().unwrap(),
            vec![],
            "the pre-created file is a valid empty database"
        );
    }

    #[test]
    fn newer_schema_is_refused_with_a_reason() {
        let dir = TempDir::new("store");
        let db = dir.0.join("db");
        Store::open(&db)
            .unwrap()
            .conn
            .pragma_update(None, "user_version", 99)
            .unwrap();
        let err = format!("{:#}", Store::open(&db).err().unwrap());
        assert!(err.contains("schema version 99 is newer"), "{err}");
    }

    #[test]
    fn write_failures_name_the_node() {
        let dir = TempDir::new("store");
        let mut s = Store::open(&dir.0.join("db")).unwrap();
        s.create_invite(b"i", true, None, None, 0).unwrap();
        // Capping the file at its current size makes SQLite report exactly what a full disk does.
        let pages: i64 = s.conn.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
        s.conn.pragma_update(None, "max_page_count", pages).unwrap();
        let host = "h".repeat(20_000);
        let req = JoinRequest {
            secret_hash: b"i",
            public_key: key(),
            requested_name: Some("cam"),
            hostname: &host,
        };
        let err = format!("{:#}", s.join(&req, 1).unwrap_err());
        assert_eq!(err, "storing node cam: database or disk is full");
        assert!(err.starts_with("storing node cam: "), "{err}");
    }
}

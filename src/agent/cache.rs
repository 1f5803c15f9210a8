//! What the agent keeps on disk: its key, its coordinator, and the last peer
//! map, so a restart with the coordinator unreachable still brings the mesh back.
//! One JSON file, mode 0600 (it holds the private key), replaced atomically.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::control::messages::{PeerInfo, RelayInfo, WgStunInfo};
use crate::keys::Key;

pub const STATE_FILE: &str = "agent.json";

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
}

pub fn path(state_dir: &Path) -> PathBuf {
    state_dir.join(STATE_FILE)
}

pub fn load(state_dir: &Path) -> Result<Option<AgentState>> {
    let p = path(state_dir);
    match std::fs::read(&p) {
        Ok(bytes) => {
            let s = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading agent state {}", p.display()))?;
            Ok(Some(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading agent state {}", p.display())),
    }
}

pub fn save(state_dir: &Path, state: &AgentState) -> Result<()> {
    let p = path(state_dir);
    let tmp = state_dir.join(format!("{STATE_FILE}.tmp"));
    let what = || format!("writing agent state {}", p.display());
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(what)?;
    f.write_all(&serde_json::to_vec_pretty(state).with_context(what)?)
        .with_context(what)?;
    f.sync_all().with_context(what)?;
    std::fs::rename(&tmp, &p).with_context(what)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn round_trip_private_and_atomic() {
        let dir = TempDir::new("cache");
        assert!(load(&dir.0).unwrap().is_none());
        let me = PeerInfo {
            id: 1,
            name: "a".into(),
            mesh_addr: "100.64.0.8".parse().unwrap(),
            public_key: Key::generate_private().public_key(),
            candidates: vec![],
            online: true,
            home_relay: Some(Key([9; 32])),
        };
        let st = AgentState {
            private_key: Key::generate_private(),
            server_key: Key::generate_private().public_key(),
            servers: vec!["203.0.113.1:7777".into()],
            join_secret: None,
            requested_name: None,
            me: Some(me.clone()),
            peers: vec![PeerInfo {
                id: 2,
                name: "b".into(),
                ..me
            }],
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
        };
        save(&dir.0, &st).unwrap();
        save(&dir.0, &st).unwrap();
        assert_eq!(load(&dir.0).unwrap().unwrap(), st);
        let mode = std::fs::metadata(path(&dir.0)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(path(&dir.0), b"{broken").unwrap();
        let err = format!("{:#}", load(&dir.0).unwrap_err());
        assert!(
            err.starts_with("reading agent state ") && err.contains("agent.json"),
            "{err}"
        );
    }
}

//! Enforcing the mesh's access policy on this node's mesh interface with
//! nftables: [`policy`] compiles (sans IO), [`nft`] renders and applies,
//! [`Firewall`] keeps what is in force and when to apply it again.
//!
//! No policy: no table (every node may reach every other). A policy: the
//! table is replaced whenever the compiled ruleset changes, before the
//! WireGuard reconcile that adds a peer (so a new peer never meets a
//! ruleset that does not cover it). A failed apply keeps the previous table
//! and is retried on the next change or full check.

pub mod nft;
pub mod policy;

use std::path::PathBuf;

use anyhow::{Context, Result};

use self::policy::{Member, Ruleset};
use crate::control::messages::PeerInfo;
use crate::control::policy::Policy;

/// The last policy heard, in the cache directory: a restart with the
/// coordinator down enforces it before the cached map reaches WireGuard.
pub const POLICY_FILE: &str = "policy.json";

/// What `warren status` shows of the policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PolicyStatus {
    /// The policy's digest, `None` when no policy is in force.
    pub digest: Option<String>,
    /// Its rules are in the kernel now.
    pub applied: bool,
    /// Why the last apply failed, until one succeeds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What was last put in the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Applied {
    /// Not known yet (start): a stale table may exist.
    Unknown,
    NoTable,
    Table(Ruleset),
}

pub struct Firewall {
    ifname: String,
    cache_dir: PathBuf,
    policy: Option<Policy>,
    applied: Applied,
    error: Option<String>,
}

impl Firewall {
    /// Starts with the cached policy, if any.
    pub fn new(ifname: &str, cache_dir: PathBuf) -> Firewall {
        let policy = std::fs::read(cache_dir.join(POLICY_FILE)).ok().and_then(|b| {
            // Read back through the control message decoder: one deserializer
            // of policies in the binary (the router build counts bytes).
            let mut msg = br#"{"type":"policy","policy":"#.to_vec();
            msg.extend_from_slice(&b);
            msg.push(b'}');
            match crate::control::messages::decode_server(&msg) {
                Ok(crate::control::messages::ServerMessage::Policy { policy }) => policy,
                _ => None,
            }
        });
        Firewall {
            ifname: ifname.to_string(),
            cache_dir,
            policy,
            applied: Applied::Unknown,
            error: None,
        }
    }

    /// The coordinator's policy (`None`: none). Returns whether it changed.
    pub fn set_policy(&mut self, policy: Option<Policy>) -> bool {
        if self.policy == policy {
            return false;
        }
        match &policy {
            Some(p) => log!("agent: policy {} in force ({} rules)", p.digest, p.accept.len()),
            None => log!("agent: no policy: every node may reach this one"),
        }
        self.policy = policy;
        let path = self.cache_dir.join(POLICY_FILE);
        let saved = match &self.policy {
            Some(p) => crate::agent::cache::write_atomic(
                &self.cache_dir,
                POLICY_FILE,
                &crate::control::messages::encode(p),
            ),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
                _ => Ok(()),
            },
        };
        if let Err(e) = saved {
            log_warn!("agent: keeping the policy in {}: {e:#}", path.display());
        }
        true
    }

    /// Puts the ruleset for `me` among `peers` in the kernel if it is not there yet.
    pub fn sync(&mut self, me: &PeerInfo, peers: &[PeerInfo]) -> Result<()> {
        let want = match &self.policy {
            None => Applied::NoTable,
            Some(p) => {
                let members: Vec<Member> = peers
                    .iter()
                    .filter(|p| p.id != me.id)
                    .map(|p| Member {
                        name: &p.name,
                        addr: p.mesh_addr,
                    })
                    .collect();
                Applied::Table(policy::compile(p, &me.name, &members))
            }
        };
        if want == self.applied {
            return Ok(());
        }
        if want == Applied::NoTable && self.applied == Applied::Unknown && nft::binary().is_none() {
            // No policy and no nftables: there is no stale table to remove.
            self.applied = Applied::NoTable;
            return Ok(());
        }
        let (script, what) = match &want {
            Applied::Table(r) => (
                nft::render(&self.ifname, r),
                format!(
                    "applying policy {} to {} ({} input, {} forward rules)",
                    self.policy.as_ref().map_or("", |p| p.digest.as_str()),
                    nft::table_name(&self.ifname),
                    r.input.len(),
                    r.forward.len()
                ),
            ),
            _ => (
                nft::render_remove(&self.ifname),
                format!("removing {}", nft::table_name(&self.ifname)),
            ),
        };
        let started = std::time::Instant::now();
        match nft::run(&script).with_context(|| what.clone()) {
            Ok(()) => {
                if self.error.take().is_some() || !matches!(self.applied, Applied::Unknown) {
                    log!("agent: {what}: done in {} ms", started.elapsed().as_millis());
                }
                self.applied = want;
                Ok(())
            }
            Err(e) => {
                self.error = Some(format!("{e:#}"));
                Err(e)
            }
        }
    }

    /// On a clean stop: no table stays behind.
    pub fn stop(&mut self) {
        if self.policy.is_none() && self.applied == Applied::NoTable {
            return;
        }
        match nft::run(&nft::render_remove(&self.ifname)) {
            Ok(()) => self.applied = Applied::NoTable,
            Err(e) => log_warn!("agent: removing {}: {e:#}", nft::table_name(&self.ifname)),
        }
    }

    pub fn status(&self) -> PolicyStatus {
        PolicyStatus {
            digest: self.policy.as_ref().map(|p| p.digest.clone()),
            applied: self.policy.is_some() && matches!(self.applied, Applied::Table(_)),
            error: self.error.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::policy::Rule;
    use crate::testutil::TempDir;

    #[test]
    fn the_last_policy_is_kept_for_a_restart_and_goes_when_cleared() {
        let dir = TempDir::new("firewall");
        let policy = Policy {
            digest: "0123456789abcdef".into(),
            tags: [("nas".to_string(), vec!["nas".to_string()])].into(),
            accept: vec![Rule {
                from: vec!["*".into()],
                to: vec!["tag:nas".into()],
                ports: vec!["tcp/22".into()],
            }],
        };
        let mut fw = Firewall::new("wg0", dir.0.clone());
        assert_eq!(fw.status(), PolicyStatus::default());
        assert!(fw.set_policy(Some(policy.clone())));
        assert!(
            !fw.set_policy(Some(policy.clone())),
            "the same policy again is no change"
        );
        let restarted = Firewall::new("wg0", dir.0.clone());
        assert_eq!(restarted.policy.as_ref(), Some(&policy));
        assert_eq!(restarted.status().digest.as_deref(), Some("0123456789abcdef"));
        assert!(
            !restarted.status().applied,
            "nothing is applied before the first sync"
        );
        assert!(fw.set_policy(None));
        assert!(!dir.0.join(POLICY_FILE).exists());
        assert_eq!(Firewall::new("wg0", dir.0.clone()).policy, None);
    }
}

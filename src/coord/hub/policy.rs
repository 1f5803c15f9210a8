//! The hub's side of the access policy: the administrator's set/show/clear,
//! and its distribution to every connected node that said it reads policies
//! (right after Welcome, and to all at once on a change).

use anyhow::{Result, bail};

use super::{ConnId, Hub, unix_now};
use crate::control::messages::{self, ServerMessage};
use crate::control::policy::Policy;
use crate::coord::admin::{AdminRequest, AdminResponse};
use crate::coord::conn::Phase;
use crate::coord::policy;

impl Hub {
    /// The policy in force, read from the store on first use.
    pub(super) fn policy(&mut self) -> Result<Option<&Policy>> {
        if self.policy.is_none() {
            let loaded = match self.store.policy_text()? {
                None => None,
                // Stored only after it parsed: a failure here is a newer
                // binary's file read by an older one.
                Some(text) => match policy::parse(&text) {
                    Ok(p) => Some(p),
                    Err(e) => bail!("the stored policy no longer parses ({e}); set it again"),
                },
            };
            self.policy = Some(loaded);
        }
        Ok(self.policy.as_ref().and_then(Option::as_ref))
    }

    fn policy_message(&mut self) -> Result<Vec<u8>> {
        let policy = self.policy()?.cloned();
        Ok(messages::encode(&ServerMessage::Policy { policy }))
    }

    /// After its Welcome: a node that reads policies gets the one in force
    /// (or that there is none) before its first map.
    pub(super) fn send_policy(&mut self, id: ConnId) -> Result<()> {
        if !self.policy_aware.contains(&id) {
            return Ok(());
        }
        let msg = self.policy_message()?;
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.send_encoded(&msg);
        }
        Ok(())
    }

    fn broadcast_policy(&mut self) -> Result<()> {
        let msg = self.policy_message()?;
        for (&cid, conn) in self.conns.iter_mut() {
            if matches!(conn.phase, Phase::Node(_)) && self.policy_aware.contains(&cid) {
                conn.send_encoded(&msg);
                self.dirty.insert(cid);
            }
        }
        Ok(())
    }

    pub(super) fn policy_admin(&mut self, req: AdminRequest) -> Result<AdminResponse> {
        match req {
            AdminRequest::PolicySet { text } => {
                let parsed = match policy::parse(&text) {
                    Ok(p) => p,
                    Err(e) => bail!("policy refused, the one in force stays: {e}"),
                };
                self.store.set_policy_text(Some(&text), unix_now())?;
                let nodes = self.store.nodes()?;
                let unknown_names = policy::unknown_names(&parsed, nodes.iter().map(|n| n.name.as_str()));
                log!(
                    "coordinator: policy {} set ({} rules, {} tags)",
                    parsed.digest,
                    parsed.accept.len(),
                    parsed.tags.len()
                );
                let digest = Some(parsed.digest.clone());
                self.policy = Some(Some(parsed));
                self.broadcast_policy()?;
                Ok(AdminResponse::Policy {
                    text: Some(text),
                    digest,
                    unknown_names,
                })
            }
            AdminRequest::PolicyShow => {
                let text = self.store.policy_text()?;
                let digest = text.as_deref().map(policy::digest);
                Ok(AdminResponse::Policy {
                    text,
                    digest,
                    unknown_names: Vec::new(),
                })
            }
            AdminRequest::PolicyClear => {
                self.store.set_policy_text(None, unix_now())?;
                log!("coordinator: policy cleared: every node may reach every other");
                self.policy = Some(None);
                self.broadcast_policy()?;
                Ok(AdminResponse::Policy {
                    text: None,
                    digest: None,
                    unknown_names: Vec::new(),
                })
            }
            other => bail!("not a policy request: {other:?}"),
        }
    }
}

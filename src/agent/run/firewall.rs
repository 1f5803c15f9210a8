//! The access policy's hook in the agent: the ruleset goes into nftables
//! before each full WireGuard reconcile, so a peer the map brings is covered
//! by the ruleset before WireGuard accepts its packets.

use super::*;

impl Agent {
    /// A failure is logged once per distinct reason; the previous table
    /// stays and the next full reconcile tries again.
    pub(super) fn enforce_policy(&mut self, me: &PeerInfo, peers: &[PeerInfo]) {
        let before = self.firewall.status().error;
        if let Err(e) = self.firewall.sync(me, peers) {
            let msg = format!("{e:#}");
            if before.as_deref() != Some(msg.as_str()) {
                log_warn!("agent: {msg}; the previous rules stay until it works");
            }
        }
    }
}

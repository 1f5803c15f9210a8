//! Policy routing for an exit node, the wg-quick pattern: the default route
//! through the mesh lives in its own table, which only packets WITHOUT the
//! agent's mark use; a rule before it sends everything the main table knows
//! more specifically than its default route (LANs, the mesh, subnet routes)
//! to the main table. WireGuard's own packets and the agent's connections
//! (coordinator, relays, the check socket) carry the mark, so they keep the
//! normal default route and never loop into the tunnel.
//!
//!   5270: from all lookup main suppress_prefixlength 0
//!   5271: not from all fwmark 0x5761 lookup 22369
//!   table 22369: default dev MESH
//!
//! Declarative: every sync makes the rules and the table exactly what is
//! wanted, so an agent that crashed leaves nothing behind once the next
//! one has run, and turning the exit off removes exactly what it added.

use anyhow::{Context, Result};

use super::WG_FWMARK;
use super::advert::DEFAULT_ROUTE;
use crate::netlink::{Rtnl, RuleSpec};

/// The table with the default route through the mesh (as wg-quick does,
/// numbered like the mark).
pub const EXIT_TABLE: u32 = WG_FWMARK;
/// The kernel's main table.
const MAIN_TABLE: u32 = 254;
/// Before the main table's rule (32766), after the local table's (0); two
/// priorities of our own, next to each other.
const SUPPRESS_PRIORITY: u32 = 5270;
const EXIT_PRIORITY: u32 = 5271;

/// The two rules, in the order they are added (removed in reverse).
pub fn rules() -> [RuleSpec; 2] {
    [
        RuleSpec {
            priority: SUPPRESS_PRIORITY,
            fwmark: None,
            invert: false,
            table: MAIN_TABLE,
            suppress_prefixlen: Some(0),
        },
        RuleSpec {
            priority: EXIT_PRIORITY,
            fwmark: Some(WG_FWMARK),
            invert: true,
            table: EXIT_TABLE,
            suppress_prefixlen: None,
        },
    ]
}

/// Whether a listed rule is one of ours (by priority and table, whatever
/// else the kernel reports of it).
fn is_ours(r: &RuleSpec) -> bool {
    rules()
        .iter()
        .any(|o| o.priority == r.priority && o.table == r.table)
}

/// `mesh`: the mesh interface's index when the exit is in use, `None` to
/// have no exit routing at all. Returns whether anything changed.
pub fn sync(rtnl: &mut Rtnl, mesh: Option<u32>) -> Result<bool> {
    let have_rules: Vec<RuleSpec> = rtnl.rules_v4()?.into_iter().filter(is_ours).collect();
    let have_routes = rtnl.routes_in(EXIT_TABLE)?;
    let mut changed = false;
    match mesh {
        Some(index) => {
            // The table first, then the rules: no moment where the rule points at an empty table.
            let present = have_routes
                .iter()
                .any(|r| r.dst == DEFAULT_ROUTE && r.oif == Some(index));
            if !present {
                rtnl.replace_route_in(EXIT_TABLE, DEFAULT_ROUTE, index)
                    .context("routing through the exit node")?;
                changed = true;
            }
            for want in rules() {
                if !have_rules
                    .iter()
                    .any(|h| h.priority == want.priority && h.table == want.table)
                {
                    rtnl.add_rule(&want).context("routing through the exit node")?;
                    changed = true;
                }
            }
        }
        None => {
            // The rules first: traffic is back on the normal default route before the table goes.
            for r in have_rules.iter().rev() {
                rtnl.del_rule(r)?;
                changed = true;
            }
            for r in &have_routes {
                if let Some(oif) = r.oif {
                    rtnl.del_route_in(EXIT_TABLE, r.dst, oif)?;
                    changed = true;
                }
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_suppress_rule_comes_before_the_unmarked_rule() {
        let [suppress, exit] = rules();
        assert!(suppress.priority < exit.priority);
        assert_eq!(
            (suppress.table, suppress.suppress_prefixlen),
            (MAIN_TABLE, Some(0))
        );
        assert_eq!(
            (exit.fwmark, exit.invert, exit.table),
            (Some(WG_FWMARK), true, EXIT_TABLE)
        );
        assert!(
            is_ours(&exit)
                && !is_ours(&RuleSpec {
                    table: MAIN_TABLE,
                    ..exit
                })
        );
    }
}

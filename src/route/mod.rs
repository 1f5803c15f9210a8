//! Subnet routes and exit nodes on the agent, one concern per file:
//! `advert` (what a node may offer, checked on both ends), `peers` (which
//! prefixes go to which peer's allowed IPs), `kernel` (the routes for them on
//! the mesh interface), `forward` (IPv4 forwarding and masquerade on the
//! node that carries traffic for the others) and `exit` (policy routing that
//! sends the default route through an exit node without looping).

pub mod advert;
pub mod exit;
pub mod forward;
pub mod kernel;
pub mod peers;

/// The mark that keeps the agent's own traffic out of the exit node's
/// routing table: WireGuard's socket (WGDEVICE_A_FWMARK / UAPI `fwmark=`)
/// and the agent's sockets (SO_MARK) carry it, and the policy rule sends
/// only unmarked packets to the table with the default route through the
/// mesh (the wg-quick pattern). 0x5761 is "Wa".
pub const WG_FWMARK: u32 = 0x5761;

use std::collections::BTreeSet;

use anyhow::{Context, Result};

use crate::control::messages::{Advertised, PeerInfo};
use crate::netlink::Rtnl;
use crate::wg::{AllowedIp, DeviceConfig};
use forward::Forwarding;
use peers::{Exit, Plan};

/// `--advertise-routes`, `--advertise-exit`, `--no-snat-routes`, `--exit-node`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteConfig {
    pub advertise: Advertised,
    /// Masquerade forwarded mesh traffic (`--no-snat-routes` turns it off).
    pub snat: bool,
    /// The peer whose default route this node uses, by name.
    pub exit_node: Option<String>,
}

/// What `warren status` shows of routing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteStatus {
    /// What this node offers (an administrator approves it on the coordinator).
    pub advertised: Vec<AllowedIp>,
    pub advertise_exit: bool,
    /// Peers' subnet prefixes this node routes through the mesh.
    pub via: Vec<RouteVia>,
    /// The exit node chosen, if any.
    pub exit_node: Option<String>,
    /// "in use", or why not (fail open: the normal default route).
    pub exit_state: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteVia {
    pub prefix: AllowedIp,
    pub peer: String,
}

/// The agent's routing beyond the mesh: what it carries for others and
/// what it sends through them.
pub struct Routing {
    cfg: RouteConfig,
    plan: Option<Plan>,
    forwarding: Option<Forwarding>,
    /// Skip lines already logged, so a map change logs only what is new.
    logged: BTreeSet<String>,
    last_exit: Exit,
    /// Exit routing was checked once (a crashed agent's rules go).
    exit_checked: bool,
    /// The same for subnet routes, and whether the last sync installed any.
    routes_checked: bool,
    routed_any: bool,
}

impl Routing {
    pub fn new(cfg: RouteConfig) -> Routing {
        Routing {
            cfg,
            plan: None,
            forwarding: None,
            logged: BTreeSet::new(),
            last_exit: Exit::Off,
            exit_checked: false,
            routes_checked: false,
            routed_any: false,
        }
    }

    pub fn config(&self) -> &RouteConfig {
        &self.cfg
    }

    /// For `warren status`; `None` when this node neither offers nor uses routes.
    pub fn status(&self, peers: &[PeerInfo]) -> Option<RouteStatus> {
        let name_of = |k: &crate::keys::Key| {
            peers
                .iter()
                .find(|p| &p.public_key == k)
                .map(|p| p.name.clone())
                .unwrap_or_else(|| k.short())
        };
        let via: Vec<RouteVia> = self
            .plan
            .iter()
            .flat_map(|p| p.routes.iter())
            .flat_map(|(k, v)| v.iter().map(move |prefix| (*prefix, k)))
            .map(|(prefix, k)| RouteVia {
                prefix,
                peer: name_of(k),
            })
            .collect();
        let exit_state = self.plan.as_ref().and_then(|p| match &p.exit {
            Exit::Off => None,
            Exit::Via { .. } => Some("in use".to_string()),
            Exit::Unusable { why, .. } => Some(format!("{why}: normal default route")),
        });
        if self.cfg.advertise.is_empty() && via.is_empty() && self.cfg.exit_node.is_none() {
            return None;
        }
        Some(RouteStatus {
            advertised: self.cfg.advertise.routes.clone(),
            advertise_exit: self.cfg.advertise.exit,
            via,
            exit_node: self.cfg.exit_node.clone(),
            exit_state,
        })
    }

    /// Forwarding and masquerade when this node carries traffic for others;
    /// else a stale nat table of an earlier agent goes.
    pub fn start(&mut self, ifname: &str) -> Result<()> {
        if self.cfg.advertise.is_empty() {
            forward::remove_stale(ifname);
            return Ok(());
        }
        self.forwarding = Some(Forwarding::start(ifname, self.cfg.snat)?);
        Ok(())
    }

    /// Decides the routes for this map; `rtnl` tells this node's own networks.
    pub fn plan(&mut self, rtnl: &mut Rtnl, ifname: &str, peers: &[PeerInfo]) -> Result<()> {
        // Without a subnet route in the map, this node's own networks do not matter.
        let own = if peers.iter().any(|p| !p.routes.is_empty()) {
            let index = rtnl.link_index(ifname)?;
            let table = rtnl
                .routes()
                .context("reading routes to plan the mesh's subnet routes")?;
            kernel::own_networks(&table, index)
        } else {
            Vec::new()
        };
        let plan = peers::plan(peers, &own, self.cfg.exit_node.as_deref());
        for line in &plan.skipped {
            if self.logged.insert(line.clone()) {
                log!("agent: {line}");
            }
        }
        self.logged.retain(|l| plan.skipped.contains(l));
        if plan.exit != self.last_exit {
            match &plan.exit {
                Exit::Off => {}
                Exit::Via { name, .. } => log!("agent: default route through exit node {name}"),
                Exit::Unusable { name, why } => log_warn!(
                    "agent: exit node {name} is {why}: traffic takes the normal default route (fail open)"
                ),
            }
            self.last_exit = plan.exit.clone();
        }
        self.plan = Some(plan);
        Ok(())
    }

    /// Adds the planned prefixes to the peers' allowed IPs, and the mark
    /// that keeps WireGuard's own packets out of the exit node's table.
    pub fn shape_device(&self, desired: &mut DeviceConfig) {
        if self.cfg.exit_node.is_some() {
            desired.fwmark = Some(WG_FWMARK);
        }
        let Some(plan) = &self.plan else { return };
        for p in &mut desired.peers {
            p.allowed_ips.extend(plan.allowed_ips(&p.public_key));
        }
    }

    /// The kernel's routes for the plan, once the interface is configured.
    pub fn apply(&mut self, rtnl: &mut Rtnl, ifname: &str) -> Result<()> {
        let Some(plan) = &self.plan else { return Ok(()) };
        let index = rtnl
            .link_index(ifname)?
            .with_context(|| format!("interface {ifname} vanished before its routes were set"))?;
        let prefixes = plan.prefixes();
        // A map without subnet routes costs no route dump, after the first
        // (which removes what an agent that crashed left).
        if !prefixes.is_empty() || self.routed_any || !self.routes_checked {
            let table = rtnl.routes().context("reading routes")?;
            kernel::sync(rtnl, ifname, index, &table, &prefixes)?;
            self.routes_checked = true;
            self.routed_any = !prefixes.is_empty();
        }
        if self.cfg.exit_node.is_some() || !self.exit_checked {
            let via = matches!(plan.exit, Exit::Via { .. }).then_some(index);
            if exit::sync(rtnl, via)? {
                match via {
                    Some(_) => log!("agent: default route via {ifname} (table {})", exit::EXIT_TABLE),
                    None => log!("agent: exit routing removed: the normal default route is back"),
                }
            }
            self.exit_checked = true;
        }
        Ok(())
    }

    /// A clean stop: routes, nat table and ip_forward as they were.
    pub fn stop(&mut self, rtnl: &mut Rtnl, ifname: &str) {
        if let Ok(Some(index)) = rtnl.link_index(ifname)
            && let Ok(table) = rtnl.routes()
            && let Err(e) = kernel::sync(rtnl, ifname, index, &table, &[])
        {
            log_warn!("agent: removing subnet routes: {e:#}");
        }
        if self.cfg.exit_node.is_some() {
            match exit::sync(rtnl, None) {
                Ok(true) => log!("agent: exit routing removed: the normal default route is back"),
                Ok(false) => {}
                Err(e) => log_warn!("agent: removing exit routing: {e:#}"),
            }
        }
        if let Some(f) = &mut self.forwarding {
            f.stop();
        }
    }
}

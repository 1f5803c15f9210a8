//! The agent's routing flags (`warren agent` and `warren up`); src/route decides.

use std::process::Command;

use clap::Args;

use crate::control::messages::Advertised;
use crate::route::RouteConfig;
use crate::wg::AllowedIp;

/// A checked `--advertise-routes` list.
#[derive(Clone, Debug, Default)]
pub struct RouteList(pub Vec<AllowedIp>);

fn parse_route_list(s: &str) -> Result<RouteList, String> {
    crate::route::advert::parse_routes(s)
        .map(RouteList)
        .map_err(|e| format!("{e:#}"))
}

#[derive(Args, Debug, Clone, Default)]
pub struct RouteArgs {
    /// Offer the IPv4 prefixes behind this node (its LANs) to the mesh, e.g.
    /// 192.168.1.0/24; an administrator approves them (`warren server routes
    /// approve`). Turns on IPv4 forwarding, for the whole system.
    #[arg(long, value_name = "PREFIX[,PREFIX…]", value_parser = parse_route_list)]
    pub advertise_routes: Option<RouteList>,
    /// Offer this node as an exit node (approved as `routes approve NODE 0.0.0.0/0`).
    #[arg(long)]
    pub advertise_exit: bool,
    /// Do not masquerade forwarded mesh traffic (for LANs whose router routes
    /// 100.64.0.0/10 back to this node).
    #[arg(long)]
    pub no_snat_routes: bool,
    /// Send this node's default route through the exit node NAME ("" = off).
    #[arg(long, value_name = "NAME")]
    pub exit_node: Option<String>,
}

impl RouteArgs {
    pub fn config(&self) -> RouteConfig {
        RouteConfig {
            advertise: Advertised {
                routes: self.advertise_routes.clone().unwrap_or_default().0,
                exit: self.advertise_exit,
            },
            snat: !self.no_snat_routes,
            exit_node: self.exit_node.clone().filter(|n| !n.is_empty()),
        }
    }

    /// The same flags for the agent `warren up` starts.
    pub fn forward(&self, cmd: &mut Command) {
        if let Some(r) = self.advertise_routes.as_ref().filter(|r| !r.0.is_empty()) {
            let list: Vec<String> = r.0.iter().map(|p| p.to_string()).collect();
            cmd.arg("--advertise-routes").arg(list.join(","));
        }
        if self.advertise_exit {
            cmd.arg("--advertise-exit");
        }
        if self.no_snat_routes {
            cmd.arg("--no-snat-routes");
        }
        if let Some(n) = &self.exit_node {
            cmd.arg("--exit-node").arg(n);
        }
    }
}

/// `warren status` lines for routing.
pub fn format_status(out: &mut String, r: &crate::route::RouteStatus) {
    use std::fmt::Write as _;
    let list = |v: &[AllowedIp]| v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(", ");
    if !r.advertised.is_empty() {
        let _ = writeln!(
            out,
            "advertising: {} (published once approved)",
            list(&r.advertised)
        );
    }
    if r.advertise_exit {
        let _ = writeln!(out, "advertising: exit node (published once approved)");
    }
    for v in &r.via {
        let _ = writeln!(out, "route {} via {}", v.prefix, v.peer);
    }
    if let Some(n) = &r.exit_node {
        let state = r.exit_state.as_deref().unwrap_or("waiting for the peer map");
        let _ = writeln!(out, "exit node {n}: {state}");
    }
}

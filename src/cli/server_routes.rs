//! `warren server routes list|approve|revoke`: subnet routes and exit nodes
//! (src/coord/routes.rs decides; this prints).

use std::path::Path;

use anyhow::{Result, bail};
use clap::Subcommand;

use super::out::outln;
use crate::coord::admin::{self, AdminRequest, AdminResponse, RouteView};
use crate::wg::AllowedIp;

#[derive(Subcommand, Debug)]
pub enum RoutesAction {
    /// Every node that advertises or has approved routes: advertised, approved, published.
    List {
        /// A JSON array of `{id, name, advertised, approved, published}`.
        #[arg(long)]
        json: bool,
    },
    /// Approve a prefix the node advertises (0.0.0.0/0: its exit offer).
    Approve {
        node: String,
        prefix: String,
        #[arg(long)]
        json: bool,
    },
    /// Revoke an approved prefix; the node's peers drop the route at once.
    Revoke {
        node: String,
        prefix: String,
        #[arg(long)]
        json: bool,
    },
}

impl RoutesAction {
    pub fn json(&self) -> bool {
        match self {
            RoutesAction::List { json }
            | RoutesAction::Approve { json, .. }
            | RoutesAction::Revoke { json, .. } => *json,
        }
    }
}

pub fn run(socket: &Path, action: RoutesAction) -> Result<()> {
    let (node, prefix, approved, json) = match action {
        RoutesAction::List { json } => {
            let AdminResponse::Routes { routes } = admin::request(socket, &AdminRequest::Routes)? else {
                bail!("unexpected answer from the coordinator");
            };
            if json {
                return super::out::json(&routes);
            }
            return print(&routes);
        }
        RoutesAction::Approve { node, prefix, json } => (node, prefix, true, json),
        RoutesAction::Revoke { node, prefix, json } => (node, prefix, false, json),
    };
    let req = AdminRequest::Route {
        node,
        prefix: prefix.clone(),
        approved,
    };
    let AdminResponse::Route { route } = admin::request(socket, &req)? else {
        bail!("unexpected answer from the coordinator");
    };
    if json {
        return super::out::json(&route);
    }
    let verb = if approved { "approved" } else { "revoked" };
    outln!("{verb} {prefix} for {}", route.name)?;
    Ok(())
}

fn print(routes: &[RouteView]) -> Result<()> {
    let list = |v: &[AllowedIp]| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(",")
        }
    };
    outln!("{:<20} {:<32} {:<32} PUBLISHED", "NODE", "ADVERTISED", "APPROVED")?;
    for r in routes {
        outln!(
            "{:<20} {:<32} {:<32} {}",
            r.name,
            list(&r.advertised),
            list(&r.approved),
            list(&r.published)
        )?;
    }
    Ok(())
}

//! Subnet routes and exit nodes on the coordinator: what each node
//! advertises (replaced by every Hello or Join), what an administrator
//! approved (kept across the node's restarts and re-advertisements), and
//! what is published in the peer map: advertised ∩ approved.
//!
//! A node's exit offer is the prefix 0.0.0.0/0 in the same table, so
//! `warren server routes approve NODE 0.0.0.0/0` approves an exit node.
//! A prefix approved for two nodes is published for the one with the lowest
//! id only (stable across restarts: ids are never reused).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, bail};
use rusqlite::params;

use super::admin::RouteView;
use super::store::{Node, Store};
use crate::control::messages::Advertised;
use crate::route::advert::{self, DEFAULT_ROUTE};
use crate::wg::AllowedIp;

/// The store's migration that adds the routes table.
pub const SCHEMA: &str = r#"
CREATE TABLE routes (
    node       INTEGER NOT NULL REFERENCES nodes(id),
    prefix     TEXT    NOT NULL,
    advertised INTEGER NOT NULL,
    approved   INTEGER NOT NULL,
    PRIMARY KEY (node, prefix)
);
"#;

/// One row: a prefix a node advertises, or an administrator approved, or both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteRow {
    pub node: u64,
    pub prefix: AllowedIp,
    pub advertised: bool,
    pub approved: bool,
}

/// What the peer map says of one node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Published {
    pub routes: Vec<AllowedIp>,
    pub exit: bool,
}

/// Published routes from the rows of active nodes: advertised and
/// approved, each subnet prefix for the lowest node id that has it. Also the
/// (prefix, node) pairs left out because a lower id has the same prefix.
pub fn publish(rows: &[RouteRow]) -> (BTreeMap<u64, Published>, BTreeSet<(AllowedIp, u64)>) {
    let mut owner: BTreeMap<AllowedIp, u64> = BTreeMap::new();
    let mut shadowed = BTreeSet::new();
    let mut out: BTreeMap<u64, Published> = BTreeMap::new();
    let mut live: Vec<&RouteRow> = rows.iter().filter(|r| r.advertised && r.approved).collect();
    live.sort_by_key(|r| (r.node, r.prefix));
    for r in live {
        if r.prefix == DEFAULT_ROUTE {
            // Several exit nodes are fine: each node chooses one by name.
            out.entry(r.node).or_default().exit = true;
            continue;
        }
        match owner.get(&r.prefix) {
            Some(&first) if first != r.node => {
                shadowed.insert((r.prefix, r.node));
            }
            _ => {
                owner.insert(r.prefix, r.node);
                out.entry(r.node).or_default().routes.push(r.prefix);
            }
        }
    }
    (out, shadowed)
}

impl Store {
    /// Every route row of an active node, by node and prefix.
    pub fn route_rows(&self) -> Result<Vec<RouteRow>> {
        let what = "listing routes";
        let mut stmt = self
            .conn
            .prepare(
                "SELECT r.node, r.prefix, r.advertised, r.approved FROM routes r
                 JOIN nodes n ON n.id = r.node WHERE n.removed IS NULL ORDER BY r.node, r.prefix",
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context(what)?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, bool>(2)?,
                    r.get::<_, bool>(3)?,
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context(what)?;
        rows.into_iter()
            .map(|(node, prefix, advertised, approved)| {
                Ok(RouteRow {
                    node,
                    prefix: prefix.parse().with_context(|| format!("{what}: node {node}"))?,
                    advertised,
                    approved,
                })
            })
            .collect()
    }

    /// Replaces what `node` advertises; approvals stay.
    pub fn set_advertised(&mut self, node: u64, offer: &Advertised) -> Result<()> {
        let what = || format!("storing the routes node {node} advertises");
        let flat = |e: rusqlite::Error| anyhow::anyhow!("{e}");
        let tx = self.conn.transaction().map_err(flat).with_context(what)?;
        tx.execute("UPDATE routes SET advertised = 0 WHERE node = ?1", [node as i64])
            .map_err(flat)
            .with_context(what)?;
        let prefixes = offer
            .routes
            .iter()
            .copied()
            .chain(offer.exit.then_some(DEFAULT_ROUTE));
        for p in prefixes {
            tx.execute(
                "INSERT INTO routes (node, prefix, advertised, approved) VALUES (?1, ?2, 1, 0)
                 ON CONFLICT (node, prefix) DO UPDATE SET advertised = 1",
                params![node as i64, p.to_string()],
            )
            .map_err(flat)
            .with_context(what)?;
        }
        tx.execute(
            "DELETE FROM routes WHERE node = ?1 AND advertised = 0 AND approved = 0",
            [node as i64],
        )
        .map_err(flat)
        .with_context(what)?;
        tx.commit().map_err(flat).with_context(what)
    }

    /// Approves (or revokes) `prefix` for `node`. Approving needs the node to
    /// advertise it; revoking needs it approved.
    pub fn set_approved(&mut self, node: &Node, prefix: AllowedIp, approved: bool) -> Result<()> {
        let rows = self.route_rows()?;
        let row = rows.iter().find(|r| r.node == node.id && r.prefix == prefix);
        match (approved, row) {
            (true, Some(r)) if r.advertised => {}
            (true, _) if prefix == DEFAULT_ROUTE => {
                bail!(
                    "node {} does not offer itself as an exit node (--advertise-exit)",
                    node.name
                )
            }
            (true, _) => bail!("node {} does not advertise {prefix}", node.name),
            (false, Some(r)) if r.approved => {}
            (false, _) => bail!("{prefix} is not approved for node {}", node.name),
        }
        self.conn
            .execute(
                "UPDATE routes SET approved = ?3 WHERE node = ?1 AND prefix = ?2",
                params![node.id as i64, prefix.to_string(), approved],
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("storing route {prefix} of node {}", node.name))?;
        self.conn
            .execute(
                "DELETE FROM routes WHERE node = ?1 AND advertised = 0 AND approved = 0",
                [node.id as i64],
            )
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("storing route {prefix} of node {}", node.name))?;
        Ok(())
    }
}

fn empty_view(n: &Node) -> RouteView {
    RouteView {
        id: n.id,
        name: n.name.clone(),
        advertised: Vec::new(),
        approved: Vec::new(),
        published: Vec::new(),
    }
}

/// The coordinator's view of published routes, kept in memory so that
/// building a peer-map entry costs no query.
#[derive(Default)]
pub struct Routes {
    published: BTreeMap<u64, Published>,
    shadowed: BTreeSet<(AllowedIp, u64)>,
}

impl Routes {
    pub fn load(store: &Store) -> Result<Routes> {
        let mut r = Routes::default();
        r.refresh(store)?;
        Ok(r)
    }

    pub fn of(&self, node: u64) -> Published {
        self.published.get(&node).cloned().unwrap_or_default()
    }

    /// Reads the rows again; returns the nodes whose published routes changed.
    pub fn refresh(&mut self, store: &Store) -> Result<Vec<u64>> {
        let (published, shadowed) = publish(&store.route_rows()?);
        for (prefix, node) in shadowed.difference(&self.shadowed) {
            let first = published
                .iter()
                .find(|(_, p)| p.routes.contains(prefix))
                .map(|(id, _)| *id);
            let name = |id: u64| match store.node(id) {
                Ok(Some(n)) => n.name,
                _ => format!("#{id}"),
            };
            let first = first.map_or_else(|| "?".to_string(), name);
            log!(
                "coordinator: route {prefix} is approved for nodes {first} and {}: published for {first} only (the lowest id)",
                name(*node)
            );
        }
        let ids: BTreeSet<u64> = published.keys().chain(self.published.keys()).copied().collect();
        let changed = ids
            .into_iter()
            .filter(|id| published.get(id) != self.published.get(id))
            .collect();
        self.published = published;
        self.shadowed = shadowed;
        Ok(changed)
    }

    /// A node's Hello or Join said what it advertises.
    pub fn advertised(&mut self, store: &mut Store, node: &Node, offer: &Advertised) -> Result<Vec<u64>> {
        let (offer, dropped) = advert::sanitize(offer);
        for why in dropped {
            log_warn!("coordinator: node {}: ignoring advertised {why}", node.name);
        }
        store.set_advertised(node.id, &offer)?;
        self.refresh(store)
    }

    /// `warren server routes approve|revoke NODE PREFIX`.
    pub fn approve(
        &mut self,
        store: &mut Store,
        node: &str,
        prefix: &str,
        approved: bool,
    ) -> Result<(RouteView, Vec<u64>)> {
        let n = store.find_node(node)?;
        let p: AllowedIp = prefix.parse()?;
        store.set_approved(&n, p, approved)?;
        log!(
            "coordinator: route {p} of node {} {}",
            n.name,
            if approved { "approved" } else { "revoked" }
        );
        let changed = self.refresh(store)?;
        let view = self
            .views(store)?
            .into_iter()
            .find(|v| v.id == n.id)
            .unwrap_or_else(|| empty_view(&n));
        Ok((view, changed))
    }

    /// `warren server routes list`: every node that advertises or has approved something.
    pub fn views(&self, store: &Store) -> Result<Vec<RouteView>> {
        let rows = store.route_rows()?;
        let mut out: Vec<RouteView> = Vec::new();
        for n in store.nodes()? {
            let mine: Vec<&RouteRow> = rows.iter().filter(|r| r.node == n.id).collect();
            if mine.is_empty() {
                continue;
            }
            let list = |f: fn(&RouteRow) -> bool| mine.iter().filter(|r| f(r)).map(|r| r.prefix).collect();
            let p = self.of(n.id);
            let mut published = p.routes;
            if p.exit {
                published.push(DEFAULT_ROUTE);
            }
            out.push(RouteView {
                advertised: list(|r| r.advertised),
                approved: list(|r| r.approved),
                published,
                ..empty_view(&n)
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::store::JoinRequest;
    use crate::coord::store::tests::TempDir;
    use crate::keys::Key;

    fn ip(s: &str) -> AllowedIp {
        s.parse().unwrap()
    }

    fn row(node: u64, prefix: &str, advertised: bool, approved: bool) -> RouteRow {
        RouteRow {
            node,
            prefix: ip(prefix),
            advertised,
            approved,
        }
    }

    #[test]
    fn published_is_advertised_and_approved_and_a_shared_prefix_goes_to_the_lowest_id() {
        let rows = vec![
            row(5, "10.0.0.0/8", true, true),
            row(3, "10.1.0.0/16", true, true),
            row(3, "192.168.1.0/24", true, false),
            row(3, "192.168.2.0/24", false, true),
            row(7, "10.1.0.0/16", true, true),
            row(7, "0.0.0.0/0", true, true),
            row(5, "0.0.0.0/0", true, false),
        ];
        let (p, shadowed) = publish(&rows);
        assert_eq!(p[&3].routes, vec![ip("10.1.0.0/16")]);
        assert!(!p[&3].exit);
        // Nested prefixes on two nodes are meaningful (longest prefix wins): both kept.
        assert_eq!(p[&5].routes, vec![ip("10.0.0.0/8")]);
        assert!(!p[&5].exit, "an exit offer not approved is not published");
        assert_eq!(
            p[&7],
            Published {
                routes: vec![],
                exit: true
            }
        );
        assert_eq!(shadowed, BTreeSet::from([(ip("10.1.0.0/16"), 7)]));
    }

    fn node(store: &mut Store, name: &str) -> Node {
        let req = JoinRequest {
            secret_hash: b"i",
            public_key: Key::generate_private().public_key(),
            requested_name: Some(name),
            hostname: name,
        };
        store.join(&req, 1).unwrap().unwrap()
    }

    #[test]
    fn approval_needs_an_advertisement_and_survives_readvertising_and_restarts() {
        let dir = TempDir::new("routes");
        let db = dir.0.join("db");
        let mut store = Store::open(&db).unwrap();
        store.create_invite(b"i", true, None, None, 0).unwrap();
        let a = node(&mut store, "router");
        let mut routes = Routes::load(&store).unwrap();
        let err = routes
            .approve(&mut store, "router", "192.168.1.0/24", true)
            .unwrap_err();
        assert_eq!(err.to_string(), "node router does not advertise 192.168.1.0/24");
        let offer = Advertised {
            routes: vec![ip("192.168.1.0/24"), ip("100.64.1.0/24")],
            exit: true,
        };
        assert_eq!(
            routes.advertised(&mut store, &a, &offer).unwrap(),
            Vec::<u64>::new()
        );
        let (view, changed) = routes
            .approve(&mut store, "router", "192.168.1.0/24", true)
            .unwrap();
        assert_eq!(changed, vec![a.id]);
        assert_eq!(view.advertised, vec![ip("0.0.0.0/0"), ip("192.168.1.0/24")]);
        assert_eq!(view.published, vec![ip("192.168.1.0/24")]);
        routes.approve(&mut store, "router", "0.0.0.0/0", true).unwrap();
        assert!(routes.of(a.id).exit);

        // The node stops advertising: nothing published, the approval stays.
        let changed = routes.advertised(&mut store, &a, &Advertised::default()).unwrap();
        assert_eq!(changed, vec![a.id]);
        assert_eq!(routes.of(a.id), Published::default());
        drop(store);
        let mut store = Store::open(&db).unwrap();
        let mut routes = Routes::load(&store).unwrap();
        routes.advertised(&mut store, &a, &offer).unwrap();
        assert_eq!(
            routes.of(a.id),
            Published {
                routes: vec![ip("192.168.1.0/24")],
                exit: true
            }
        );

        routes
            .approve(&mut store, "router", "192.168.1.0/24", false)
            .unwrap();
        assert_eq!(routes.of(a.id).routes, vec![]);
        let err = routes
            .approve(&mut store, "router", "192.168.1.0/24", false)
            .unwrap_err();
        assert_eq!(err.to_string(), "192.168.1.0/24 is not approved for node router");
    }
}

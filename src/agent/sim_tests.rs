//! The agent's control connection against the real coordinator logic, both
//! sans-IO, over a simulated network with a simulated clock.

use std::time::{Duration, Instant};

use super::control::{
    BACKOFF_MAX, ControlConfig, ControlConn, Event, JOIN_HANDSHAKE_HANGUPS, PING_INTERVAL, PONG_TIMEOUT,
    Phase,
};
use crate::control::messages::{ErrorCode, RelayInfo, WgStunInfo};
use crate::coord::admin::{AdminRequest, AdminResponse};
use crate::coord::hub::{ConnId, Hub};
use crate::coord::invite::JoinToken;
use crate::coord::store::Store;
use crate::coord::store::tests::TempDir;
use crate::keys::Key;

const TICK: Duration = Duration::from_millis(100);

struct Agent {
    ctrl: ControlConn,
    conn: Option<ConnId>,
    dials: Vec<Instant>,
    refused: Vec<(ErrorCode, String, bool)>,
    /// Relays and WG-STUN servers of each Welcome received.
    welcomes: Vec<(Vec<RelayInfo>, Vec<WgStunInfo>)>,
    /// When false the network drops what the coordinator sends this agent.
    deliver: bool,
}

struct Sim {
    _dir: TempDir,
    db: std::path::PathBuf,
    server_key: Key,
    hub: Option<Hub>,
    agents: Vec<Agent>,
    now: Instant,
    next_conn: ConnId,
}

impl Sim {
    fn new() -> Sim {
        let dir = TempDir::new("sim");
        let db = dir.0.join("server.db");
        let server_key = Key::generate_private();
        let hub = Hub::new(Store::open(&db).unwrap(), server_key, vec!["coord:7777".into()]);
        Sim {
            _dir: dir,
            db,
            server_key,
            hub: Some(hub),
            agents: vec![],
            now: Instant::now(),
            next_conn: 1,
        }
    }

    fn token(&mut self) -> JoinToken {
        let req = AdminRequest::Invite {
            reusable: true,
            expires_in: None,
            name: None,
        };
        match self.hub.as_mut().unwrap().admin(req, self.now) {
            AdminResponse::Invite { token, .. } => JoinToken::parse(&token).unwrap(),
            other => panic!("{other:?}"),
        }
    }

    fn add_agent(&mut self, token: &JoinToken, host: &str, seed: u64) -> usize {
        let cfg = ControlConfig {
            private_key: Key::generate_private(),
            server_key: token.server_key,
            servers: token.servers.clone(),
            join_secret: Some(token.secret.clone()),
            requested_name: None,
            hostname: host.into(),
            advertise: Default::default(),
        };
        let ctrl = ControlConn::new(cfg, self.now, seed);
        self.agents.push(Agent {
            ctrl,
            conn: None,
            dials: vec![],
            refused: vec![],
            welcomes: vec![],
            deliver: true,
        });
        self.agents.len() - 1
    }

    fn step(&mut self) {
        let now = self.now;
        for _ in 0..20 {
            let mut busy = false;
            if let Some(hub) = self.hub.as_mut() {
                hub.handle_timeout(now);
            }
            for a in self.agents.iter_mut() {
                a.ctrl.handle_timeout(now);
                while let Some(ev) = a.ctrl.poll_event() {
                    busy = true;
                    match ev {
                        Event::Dial(_) => {
                            a.dials.push(now);
                            match self.hub.as_mut() {
                                Some(hub) => {
                                    hub.accept(self.next_conn, now);
                                    a.conn = Some(self.next_conn);
                                    self.next_conn += 1;
                                    a.ctrl.handle_connected(now);
                                }
                                None => a.ctrl.handle_disconnected(now, "connection refused"),
                            }
                        }
                        Event::HangUp => {
                            if let (Some(id), Some(hub)) = (a.conn.take(), self.hub.as_mut()) {
                                hub.closed(id);
                            }
                        }
                        Event::Refused {
                            code,
                            reason,
                            permanent,
                        } => a.refused.push((code, reason, permanent)),
                        Event::Welcome { relays, wgstun, .. } => a.welcomes.push((relays, wgstun)),
                        Event::MapChanged | Event::KeyRotated | Event::Policy(_) => {}
                    }
                }
                let (Some(id), Some(hub)) = (a.conn, self.hub.as_mut()) else {
                    continue;
                };
                let out = a.ctrl.outgoing().to_vec();
                if !out.is_empty() {
                    busy = true;
                    a.ctrl.consume_outgoing(out.len());
                    hub.receive(id, now, &out);
                }
            }
            if let Some(hub) = self.hub.as_mut() {
                hub.flush(now);
                for id in hub.take_dirty() {
                    let out = hub.outgoing(id).to_vec();
                    hub.consume_outgoing(id, out.len());
                    let Some(a) = self.agents.iter_mut().find(|a| a.conn == Some(id)) else {
                        continue;
                    };
                    if !out.is_empty() && a.deliver {
                        busy = true;
                        a.ctrl.handle_input(now, &out);
                    }
                    if hub.finished(id, now) {
                        hub.closed(id);
                        a.conn = None;
                        a.ctrl.handle_closed(now);
                        busy = true;
                    }
                }
            }
            if !busy {
                return;
            }
        }
    }

    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += TICK;
            self.step();
        }
    }

    fn server_down(&mut self) {
        self.hub = None;
        let now = self.now;
        for a in self.agents.iter_mut() {
            if a.conn.take().is_some() {
                a.ctrl.handle_disconnected(now, "connection reset");
            }
        }
        self.step();
    }

    fn server_up(&mut self) {
        let store = Store::open(&self.db).unwrap();
        self.hub = Some(Hub::new(store, self.server_key, vec!["coord:7777".into()]));
        self.step();
    }

    fn peer_names(&self, i: usize) -> Vec<(String, bool)> {
        self.agents[i]
            .ctrl
            .peers()
            .map(|p| (p.name.clone(), p.online))
            .collect()
    }
}

#[test]
fn join_then_hello_and_everyone_sees_everyone() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 1);
    let b = sim.add_agent(&t, "beta", 2);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    assert_eq!(sim.peer_names(a), vec![("beta".to_string(), true)]);
    assert_eq!(sim.peer_names(b), vec![("alpha".to_string(), true)]);
    assert_eq!(sim.agents[a].ctrl.me().unwrap().name, "alpha");
}

#[test]
fn candidates_a_node_sends_are_published_to_nobody() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 1);
    let b = sim.add_agent(&t, "beta", 2);
    // Before connecting: they go out in the Join, and after a reconnect in the Hello.
    sim.agents[a]
        .ctrl
        .set_candidates(vec!["192.0.2.1:51820".parse().unwrap()]);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.peer_names(b), vec![("alpha".to_string(), true)]);
    // While connected: a Candidates message; then a change that republishes b.
    sim.agents[b]
        .ctrl
        .set_candidates(vec!["192.0.2.2:51820".parse().unwrap()]);
    sim.advance(TICK);
    sim.hub.as_mut().unwrap().admin(
        AdminRequest::Rename {
            node: "beta".into(),
            new_name: "bravo".into(),
        },
        sim.now,
    );
    sim.advance(TICK);
    assert_eq!(sim.peer_names(a), vec![("bravo".to_string(), true)]);
    sim.server_down();
    sim.server_up();
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    assert_eq!(sim.agents[b].ctrl.phase(), &Phase::Connected);
    for agent in &sim.agents {
        assert!(agent.ctrl.me().unwrap().candidates.is_empty());
        for p in agent.ctrl.peers() {
            assert!(
                p.candidates.is_empty(),
                "{} published with {:?}",
                p.name,
                p.candidates
            );
        }
    }
}

#[test]
fn every_welcome_carries_the_published_wgstun_servers() {
    let mut sim = Sim::new();
    let wgstun = vec![
        WgStunInfo {
            public_key: Key::generate_private().public_key(),
            endpoint: "coord:3479".into(),
            stun: Some("coord:3478".into()),
        },
        WgStunInfo {
            public_key: Key::generate_private().public_key(),
            endpoint: "stun2.example.org:3479".into(),
            stun: None,
        },
    ];
    sim.hub.as_mut().unwrap().set_wgstun(wgstun.clone());
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 1);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.agents[a].welcomes, vec![(vec![], wgstun.clone())]);

    // A reconnect (the Hello after the Join) is welcomed with them too.
    sim.server_down();
    let store = Store::open(&sim.db).unwrap();
    let mut hub = Hub::new(store, sim.server_key, vec!["coord:7777".into()]);
    hub.set_wgstun(wgstun.clone());
    sim.hub = Some(hub);
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    assert_eq!(sim.agents[a].welcomes.len(), 2);
    assert_eq!(sim.agents[a].welcomes[1].1, wgstun);

    // A coordinator publishing none sends none.
    let mut sim = Sim::new();
    let t = sim.token();
    let b = sim.add_agent(&t, "beta", 2);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.agents[b].welcomes, vec![(vec![], vec![])]);
}

#[test]
fn coordinator_down_keeps_the_map_and_reconnects_with_growing_jittered_backoff() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 7);
    sim.add_agent(&t, "beta", 8);
    sim.advance(Duration::from_secs(1));
    sim.server_down();
    // The cached map survives: WireGuard keeps its peers while the coordinator is away.
    assert_eq!(sim.peer_names(a), vec![("beta".to_string(), true)]);

    sim.agents[a].dials.clear();
    sim.advance(Duration::from_secs(400));
    let dials = &sim.agents[a].dials;
    let gaps: Vec<Duration> = dials.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.len() >= 6, "{gaps:?}");
    for (i, g) in gaps.iter().enumerate() {
        // Attempt i+2 waits base/2..=base with base = 1 s * 2^(i+1), capped at 60 s.
        let base = Duration::from_secs(1u64 << (i + 1).min(16)).min(BACKOFF_MAX);
        assert!(
            *g >= base / 2 && *g <= base + TICK,
            "gap {i}: {g:?} for base {base:?}"
        );
    }
    assert!(gaps.iter().all(|g| *g <= BACKOFF_MAX + TICK));

    sim.server_up();
    sim.advance(BACKOFF_MAX + Duration::from_secs(1));
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    assert_eq!(
        sim.agents[a].ctrl.me().unwrap().name,
        "alpha",
        "same node after the coordinator restart"
    );
    assert_eq!(sim.peer_names(a), vec![("beta".to_string(), true)]);
}

#[test]
fn jitter_differs_between_nodes() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 11);
    let b = sim.add_agent(&t, "beta", 12);
    sim.advance(Duration::from_secs(1));
    sim.server_down();
    sim.advance(Duration::from_secs(120));
    assert_ne!(sim.agents[a].dials, sim.agents[b].dials);
}

#[test]
fn silent_coordinator_is_detected_by_ping_timeout() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 3);
    sim.advance(Duration::from_secs(1));
    sim.agents[a].dials.clear();
    sim.agents[a].deliver = false;
    let silent_since = sim.now;
    sim.advance(PING_INTERVAL + PONG_TIMEOUT + Duration::from_secs(2));
    assert_ne!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    // It gave up on the silent connection only after the ping went unanswered, and dialled again.
    let first = sim.agents[a].dials[0];
    // (The last message arrived during the first second, before the silence began.)
    let waited = first - silent_since;
    assert!(
        waited + Duration::from_secs(1) >= PING_INTERVAL + PONG_TIMEOUT,
        "{waited:?}"
    );
    assert!(
        waited <= PING_INTERVAL + PONG_TIMEOUT + Duration::from_secs(1),
        "{waited:?}"
    );
    sim.agents[a].deliver = true;
    sim.advance(Duration::from_secs(15));
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
}

#[test]
fn removal_is_permanent_and_stops_retrying() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 5);
    let b = sim.add_agent(&t, "beta", 6);
    sim.advance(Duration::from_secs(1));
    let now = sim.now;
    sim.hub
        .as_mut()
        .unwrap()
        .admin(AdminRequest::Remove { node: "beta".into() }, now);
    sim.advance(Duration::from_secs(1));
    assert!(sim.peer_names(a).is_empty());
    let refused = &sim.agents[b].refused;
    assert_eq!(refused.len(), 1);
    assert_eq!((refused[0].0, refused[0].2), (ErrorCode::Removed, true));
    assert!(matches!(
        sim.agents[b].ctrl.phase(),
        Phase::Failed {
            code: ErrorCode::Removed,
            ..
        }
    ));
    let dials = sim.agents[b].dials.len();
    sim.advance(Duration::from_secs(120));
    assert_eq!(sim.agents[b].dials.len(), dials);
}

#[test]
fn spent_invite_is_a_permanent_refusal() {
    let mut sim = Sim::new();
    let now = sim.now;
    let req = AdminRequest::Invite {
        reusable: false,
        expires_in: None,
        name: None,
    };
    let AdminResponse::Invite { token, .. } = sim.hub.as_mut().unwrap().admin(req, now) else {
        panic!()
    };
    let t = JoinToken::parse(&token).unwrap();
    sim.add_agent(&t, "alpha", 1);
    let b = sim.add_agent(&t, "beta", 2);
    sim.advance(Duration::from_secs(1));
    let r = &sim.agents[b].refused;
    assert_eq!(
        r[0],
        (
            ErrorCode::InviteUsed,
            "invite was already used (it is single-use)".into(),
            true
        )
    );
}

#[test]
fn key_rotation_keeps_identity_and_reconnects_with_the_new_key() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 1);
    let b = sim.add_agent(&t, "beta", 2);
    sim.advance(Duration::from_secs(1));
    let before = sim.agents[a].ctrl.me().unwrap().clone();
    let new = Key::generate_private();
    assert!(sim.agents[b].ctrl.rotate_key(Key::generate_private()).is_ok());
    sim.agents[a].ctrl.rotate_key(new).unwrap();
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.agents[a].ctrl.private_key(), &new);
    let me = sim.agents[a].ctrl.me().unwrap().clone();
    assert_eq!(
        (me.id, &me.name, me.mesh_addr, me.public_key),
        (before.id, &before.name, before.mesh_addr, new.public_key())
    );
    let seen_by_b = sim.agents[b].ctrl.peers().next().unwrap().public_key;
    assert_eq!(seen_by_b, new.public_key());
    // After a coordinator restart the node comes back with the new key, same identity.
    sim.server_down();
    sim.server_up();
    sim.advance(BACKOFF_MAX);
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    assert_eq!(sim.agents[a].ctrl.me().unwrap().id, before.id);
}

#[test]
fn lost_rotation_confirmation_adopts_the_new_key_instead_of_giving_up() {
    let mut sim = Sim::new();
    let t = sim.token();
    let a = sim.add_agent(&t, "alpha", 1);
    sim.advance(Duration::from_secs(1));
    let id = sim.agents[a].ctrl.me().unwrap().id;
    let new = Key::generate_private();
    // The coordinator records the rotation, but its answer never arrives.
    sim.agents[a].deliver = false;
    sim.agents[a].ctrl.rotate_key(new).unwrap();
    sim.advance(PING_INTERVAL + PONG_TIMEOUT + Duration::from_secs(1));
    sim.agents[a].deliver = true;
    // Reconnecting with the old key is refused as unknown; the pending key is adopted, not a removal.
    sim.advance(Duration::from_secs(20));
    assert_eq!(sim.agents[a].ctrl.phase(), &Phase::Connected);
    assert_eq!(sim.agents[a].ctrl.private_key(), &new);
    assert_eq!(sim.agents[a].ctrl.me().unwrap().id, id);
    assert!(
        sim.agents[a].refused.iter().all(|r| !r.2),
        "{:?}",
        sim.agents[a].refused
    );
}

#[test]
fn wrong_server_key_is_final_for_a_join_and_retried_by_a_member() {
    let mut sim = Sim::new();
    let good = sim.token();
    let mut bad = good.clone();
    bad.server_key = Key::generate_private().public_key();
    let a = sim.add_agent(&bad, "alpha", 11);
    sim.advance(Duration::from_secs(1));
    assert_eq!(
        sim.agents[a].ctrl.last_error(),
        Some(
            "coordinator coord:7777 closed the connection during the handshake: \
             the token's server key may be wrong, or it is not a warren coordinator"
        )
    );
    assert!(matches!(sim.agents[a].ctrl.phase(), Phase::Waiting { .. }));

    // A joining node gives up after a few hung-up handshakes: one refusal, for good.
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.agents[a].dials.len(), JOIN_HANDSHAKE_HANGUPS as usize);
    let reason = "coordinator coord:7777 hung up during the handshake 3 times: \
                  the token's server key is wrong (or it is not a warren coordinator)";
    assert_eq!(
        sim.agents[a].refused,
        vec![(ErrorCode::InviteUnknown, reason.to_string(), true)]
    );
    assert!(matches!(sim.agents[a].ctrl.phase(), Phase::Failed { .. }));

    // The coordinator keeps serving a node with the right key, and the error clears on success.
    let b = sim.add_agent(&good, "beta", 12);
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.agents[b].ctrl.phase(), &Phase::Connected);
    assert_eq!(sim.agents[b].ctrl.last_error(), None);
    assert!(sim.peer_names(b).is_empty(), "the wrong-key node never enrolled");

    // A member whose coordinator now answers with another key keeps trying,
    // backing off: the key it pinned has worked, so this may be a mistake being fixed.
    sim.server_down();
    sim.server_key = Key::generate_private();
    sim.server_up();
    let before = sim.agents[b].dials.len();
    sim.advance(Duration::from_secs(120));
    let dials = sim.agents[b].dials[before..].to_vec();
    assert!(dials.len() > JOIN_HANDSHAKE_HANGUPS as usize + 1, "{dials:?}");
    let gaps: Vec<Duration> = dials.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(gaps.last() > gaps.first(), "{gaps:?}");
    assert!(sim.agents[b].refused.is_empty(), "{:?}", sim.agents[b].refused);
    assert!(matches!(
        sim.agents[b].ctrl.phase(),
        Phase::Waiting { .. } | Phase::Connecting { .. }
    ));
}

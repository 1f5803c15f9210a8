//! The mapper against simulated routers speaking PCP, NAT-PMP and UPnP (the
//! real codecs on both sides), on a simulated clock.

use std::collections::HashMap;

use super::*;

const GW: Gateway = Gateway {
    router: Ipv4Addr::new(10, 1, 0, 1),
    local: Ipv4Addr::new(10, 1, 0, 2),
};
const WG: u16 = 51820;
const CHECK: u16 = 51821;

/// A home router: which protocols it speaks, what it grants, its table.
struct Router {
    pcp: bool,
    natpmp: bool,
    /// A NAT-PMP-only box that answers PCP with "unsupported version"
    /// (instead of ignoring it).
    natpmp_rejects_pcp: bool,
    upnp: bool,
    silent: bool,
    external: Ipv4Addr,
    booted: Instant,
    max_lease: Duration,
    /// Ports taken by other LAN hosts: the router grants the next free one.
    taken: Vec<u16>,
    table: HashMap<u16, u16>,
    datagrams: usize,
    commands: usize,
}

impl Router {
    fn new(now: Instant) -> Router {
        Router {
            pcp: true,
            natpmp: true,
            natpmp_rejects_pcp: false,
            upnp: true,
            silent: false,
            external: Ipv4Addr::new(198, 51, 100, 20),
            booted: now,
            max_lease: LEASE,
            taken: Vec::new(),
            table: HashMap::new(),
            datagrams: 0,
            commands: 0,
        }
    }

    fn epoch(&self, now: Instant) -> u32 {
        now.duration_since(self.booted).as_secs() as u32
    }

    fn restart(&mut self, now: Instant) {
        self.booted = now;
        self.table.clear();
    }

    fn grant(&mut self, internal: u16, suggested: u16) -> u16 {
        if let Some(e) = self.table.get(&internal) {
            return *e;
        }
        let mut e = if suggested == 0 { internal } else { suggested };
        while self.taken.contains(&e) || self.table.values().any(|v| *v == e) {
            e += 1;
        }
        self.table.insert(internal, e);
        e
    }

    fn lease(&self, asked: u32) -> u32 {
        asked.min(self.max_lease.as_secs() as u32)
    }

    fn datagram(&mut self, now: Instant, bytes: &[u8]) -> Option<Vec<u8>> {
        self.datagrams += 1;
        if self.silent {
            return None;
        }
        let epoch_secs = self.epoch(now);
        if bytes[0] == pcp::VERSION {
            if self.natpmp_rejects_pcp {
                return Some(
                    natpmp::Response::Error {
                        op: 1,
                        result: 1,
                        epoch_secs,
                    }
                    .encode(),
                );
            }
            if !self.pcp {
                return None;
            }
            let r = pcp::MapRequest::decode(bytes).expect("the mapper sends valid PCP");
            assert_eq!(
                r.client_ip,
                IpAddr::V4(GW.local),
                "PCP must carry our own address"
            );
            assert!([WG, CHECK].contains(&r.internal_port), "maps only its two ports");
            let (external_port, lifetime_secs) = if r.lifetime_secs == 0 {
                self.table.remove(&r.internal_port);
                (0, 0)
            } else {
                (
                    self.grant(r.internal_port, r.suggested_external_port),
                    self.lease(r.lifetime_secs),
                )
            };
            return Some(pcp::encode_response(&pcp::Response::Map {
                result: 0,
                lifetime_secs,
                epoch_secs,
                nonce: r.nonce,
                internal_port: r.internal_port,
                external_port,
                external_ip: IpAddr::V4(self.external),
            }));
        }
        if !self.natpmp {
            return None;
        }
        let resp = match natpmp::Request::decode(bytes).expect("the mapper sends valid NAT-PMP") {
            natpmp::Request::ExternalAddress => natpmp::Response::ExternalAddress {
                epoch_secs,
                ip: self.external,
            },
            natpmp::Request::MapUdp {
                internal_port,
                suggested_external_port,
                lifetime_secs,
            } => {
                assert!([WG, CHECK].contains(&internal_port), "maps only its two ports");
                if lifetime_secs == 0 {
                    self.table.remove(&internal_port);
                    natpmp::Response::MapUdp {
                        epoch_secs,
                        internal_port,
                        external_port: 0,
                        lifetime_secs: 0,
                    }
                } else {
                    natpmp::Response::MapUdp {
                        epoch_secs,
                        internal_port,
                        external_port: self.grant(internal_port, suggested_external_port),
                        lifetime_secs: self.lease(lifetime_secs),
                    }
                }
            }
        };
        Some(resp.encode())
    }

    fn command(&mut self, command: &upnp::Command) -> upnp::Outcome {
        self.commands += 1;
        if !self.upnp || self.silent {
            return upnp::Outcome::Failed("no UPnP gateway answered within 2 s".into());
        }
        match command {
            upnp::Command::Discover => upnp::Outcome::Discovered {
                control: "10.1.0.1:5000".parse().unwrap(),
                local: GW.local,
                external: Some(IpAddr::V4(self.external)),
                external_error: None,
            },
            upnp::Command::Map {
                internal,
                external_port,
                lease_secs,
                ..
            } => {
                assert_eq!(*internal.ip(), GW.local);
                assert!([WG, CHECK].contains(&internal.port()), "maps only its two ports");
                let e = self.grant(internal.port(), *external_port);
                upnp::Outcome::Mapped {
                    internal: *internal,
                    external_port: e,
                    lease_secs: self.lease(*lease_secs),
                }
            }
            upnp::Command::Check {
                internal,
                external_port,
            } => upnp::Outcome::Checked {
                external_port: *external_port,
                present: self.table.get(&internal.port()) == Some(external_port),
            },
            upnp::Command::Unmap { external_port } => {
                self.table.retain(|_, e| e != external_port);
                upnp::Outcome::Unmapped {
                    external_port: *external_port,
                }
            }
        }
    }
}

struct World {
    now: Instant,
    m: PortMapper,
    r: Router,
    events: Vec<(Instant, Event)>,
}

impl World {
    fn new(configure: impl FnOnce(&mut Router)) -> World {
        let now = Instant::now();
        let mut r = Router::new(now);
        configure(&mut r);
        let mut m = PortMapper::new(now, true, WG, CHECK, [7; 32]);
        m.set_gateway(now, Some(GW));
        let mut w = World {
            now,
            m,
            r,
            events: Vec::new(),
        };
        w.exchange();
        w
    }

    /// Delivers everything queued, answers included (a LAN round trip takes no time here).
    fn exchange(&mut self) {
        for _ in 0..1000 {
            let mut any = false;
            while let Some((to, bytes)) = self.m.poll_transmit() {
                assert_eq!(to, SocketAddr::from((GW.router, 5351)));
                any = true;
                if let Some(answer) = self.r.datagram(self.now, &bytes) {
                    self.m.handle_datagram(self.now, to, &answer);
                }
            }
            while let Some((id, command)) = self.m.poll_upnp() {
                any = true;
                let outcome = self.r.command(&command);
                self.m.handle_upnp(self.now, upnp::Reply { id, command, outcome });
            }
            while let Some(e) = self.m.poll_event() {
                self.events.push((self.now, e));
            }
            if !any {
                return;
            }
        }
        panic!("the mapper and the router never went quiet");
    }

    /// Runs the clock to `now + d`, firing every timer on the way.
    fn run(&mut self, d: Duration) {
        let end = self.now + d;
        for _ in 0..100_000 {
            match self.m.poll_timeout() {
                Some(t) if t <= end => {
                    assert!(
                        t + Duration::from_secs(1) >= self.now,
                        "a timer in the past: busy loop"
                    );
                    self.now = self.now.max(t);
                    self.m.handle_timeout(self.now);
                    self.exchange();
                }
                _ => {
                    self.now = end;
                    return;
                }
            }
        }
        panic!("timers fired without end");
    }

    fn candidate(&self) -> Option<Candidate> {
        self.m.candidate()
    }
}

fn ext(port: u16) -> SocketAddr {
    SocketAddr::from(([198, 51, 100, 20], port))
}

#[test]
fn pcp_router_maps_both_ports_at_once() {
    let w = World::new(|_| {});
    let c = w.candidate().expect("mapped");
    assert_eq!(c.kind, Kind::Pcp);
    assert_eq!((c.wg, c.check), (ext(WG), ext(CHECK)));
    assert_eq!(w.r.table.len(), 2, "exactly two mappings");
    let st = w.m.status();
    assert_eq!(st.protocol, Some(Protocol::Pcp));
    assert_eq!(st.mappings.len(), 2);
    assert!(w.events.iter().any(|(_, e)| *e == Event::Chosen(Protocol::Pcp)));
}

#[test]
fn natpmp_only_router_is_used_after_pcp_goes_unanswered() {
    let mut w = World::new(|r| r.pcp = false);
    assert_eq!(w.candidate(), None, "PCP still has its probe time");
    w.run(Duration::from_secs(5));
    let c = w.candidate().expect("mapped by NAT-PMP");
    assert_eq!(c.kind, Kind::NatPmp);
    assert_eq!((c.wg, c.check), (ext(WG), ext(CHECK)));
    let st = w.m.status();
    assert_eq!(st.probes[0].1, "no answer");
    assert_eq!(st.probes[1].1, "answered");
}

#[test]
fn natpmp_box_that_rejects_pcp_is_used_at_once() {
    let w = World::new(|r| r.natpmp_rejects_pcp = true);
    assert_eq!(w.candidate().map(|c| c.kind), Some(Kind::NatPmp));
    assert!(w.m.status().probes[0].1.contains("version 0"));
}

#[test]
fn upnp_only_router_after_both_udp_protocols_time_out() {
    let mut w = World::new(|r| {
        r.pcp = false;
        r.natpmp = false;
    });
    w.run(Duration::from_secs(5));
    let c = w.candidate().expect("mapped by UPnP");
    assert_eq!(c.kind, Kind::Upnp);
    assert_eq!((c.wg, c.check), (ext(WG), ext(CHECK)));
}

#[test]
fn closed_port_5351_moves_on_to_upnp_at_once() {
    let mut w = World::new(|r| {
        r.pcp = false;
        r.natpmp = false;
    });
    assert_eq!(w.candidate(), None, "still waiting for PCP and NAT-PMP");
    let now = w.now;
    w.m.handle_port_closed(now);
    w.exchange();
    assert_eq!(w.candidate().map(|c| c.kind), Some(Kind::Upnp));
    assert!(w.m.status().probes[0].1.contains("closed"));
}

#[test]
fn taken_port_gets_what_the_router_grants() {
    let w = World::new(|r| r.taken = vec![WG]);
    let c = w.candidate().unwrap();
    // WireGuard's gets the next free port, and so the check socket the one after.
    assert_eq!(c.wg, ext(WG + 1));
    assert_eq!(c.check, ext(CHECK + 1));
}

#[test]
fn leases_are_renewed_before_they_run_out() {
    let mut w = World::new(|r| r.max_lease = Duration::from_secs(600));
    let first = w.r.datagrams;
    w.run(Duration::from_secs(3 * 3600));
    // The router never dropped them: renewals kept both alive all along.
    let st = w.m.status();
    assert_eq!(st.mappings.len(), 2);
    for (_, _, m) in &st.mappings {
        let left = m.left(w.now).unwrap();
        assert!(left > Duration::from_secs(240), "lease left {left:?}");
    }
    // Renewed at most every 60 s (WireGuard's, confirmed) and every 300 s (check's).
    let sent = w.r.datagrams - first;
    assert!((180..=300).contains(&sent), "{sent} renewals in 3 h");
    assert_eq!(
        w.events
            .iter()
            .filter(|(_, e)| matches!(e, Event::Mapped { .. }))
            .count(),
        2,
        "renewals are not new mappings: {:?}",
        w.events
    );
}

#[test]
fn restarted_pcp_router_is_noticed_by_its_epoch_and_mapped_again() {
    for rejects in [false, true] {
        let mut w = World::new(|r| {
            r.natpmp_rejects_pcp = rejects;
            r.max_lease = Duration::from_secs(2 * 3600);
        });
        w.run(Duration::from_secs(600));
        let now = w.now;
        w.r.restart(now);
        w.run(CONFIRM_INTERVAL + Duration::from_secs(1));
        assert_eq!(w.r.table.len(), 2, "both mapped again within a confirm interval");
        assert!(w.candidate().is_some());
        assert!(
            w.events
                .iter()
                .any(|(t, e)| *t >= now && matches!(e, Event::Lost { why, .. } if why.contains("epoch"))),
            "{:?}",
            w.events
        );
    }
}

#[test]
fn restarted_upnp_router_loses_entries_and_gets_them_back() {
    let mut w = World::new(|r| {
        r.pcp = false;
        r.natpmp = false;
    });
    w.run(Duration::from_secs(600));
    let now = w.now;
    w.r.restart(now);
    assert!(w.r.table.is_empty());
    w.run(CONFIRM_INTERVAL + Duration::from_secs(1));
    assert_eq!(w.r.table.len(), 2, "both mapped again");
    assert_eq!(w.candidate().map(|c| c.kind), Some(Kind::Upnp));
}

#[test]
fn external_address_change_reaches_the_candidate() {
    for (pcp, natpmp) in [(true, true), (false, true), (false, false)] {
        let mut w = World::new(|r| {
            r.pcp = pcp;
            r.natpmp = natpmp;
        });
        w.run(Duration::from_secs(10));
        assert_eq!(w.candidate().unwrap().wg.ip(), IpAddr::from([198, 51, 100, 20]));
        w.r.external = Ipv4Addr::new(198, 51, 100, 99);
        w.run(UPNP_REDISCOVER + CONFIRM_INTERVAL);
        let c = w.candidate().unwrap();
        assert_eq!(
            c.wg.ip(),
            IpAddr::from([198, 51, 100, 99]),
            "pcp {pcp} natpmp {natpmp}"
        );
        assert_eq!(c.check.ip(), c.wg.ip());
    }
}

#[test]
fn silent_gateway_costs_a_few_packets_an_hour() {
    let mut w = World::new(|r| r.silent = true);
    w.run(Duration::from_secs(24 * 3600));
    assert_eq!(w.candidate(), None);
    // 8 datagrams and one SSDP search per probe; probes back off from 60 s to 30 min.
    let probes = w.r.commands;
    assert!(probes <= 60, "{probes} probes in a day");
    assert!(w.r.datagrams <= probes * 8, "{} datagrams", w.r.datagrams);
    let st = w.m.status();
    assert!(st.probes.iter().all(|(_, s)| s != "answered"));
}

#[test]
fn router_that_stops_answering_loses_the_candidate_and_is_probed_again() {
    let mut w = World::new(|_| {});
    assert!(w.candidate().is_some());
    w.r.silent = true;
    w.run(CONFIRM_INTERVAL + Duration::from_secs(30));
    assert_eq!(w.candidate(), None, "a router that is gone holds nothing");
    assert!(w.events.iter().any(|(_, e)| matches!(e, Event::Lost { .. })));
    w.r.silent = false;
    w.r.table.clear();
    w.run(REPROBE_INITIAL * 2);
    assert!(w.candidate().is_some(), "back once the router answers again");
}

#[test]
fn release_gives_both_mappings_back() {
    for (pcp, natpmp) in [(true, true), (false, true), (false, false)] {
        let mut w = World::new(|r| {
            r.pcp = pcp;
            r.natpmp = natpmp;
        });
        w.run(Duration::from_secs(5));
        assert_eq!(w.r.table.len(), 2);
        let (datagrams, ports) = w.m.release();
        for (_, d) in datagrams {
            w.r.datagram(w.now, &d);
        }
        for p in ports {
            w.r.command(&upnp::Command::Unmap { external_port: p });
        }
        assert!(w.r.table.is_empty(), "pcp {pcp} natpmp {natpmp}: {:?}", w.r.table);
        assert_eq!(w.candidate(), None);
    }
}

#[test]
fn off_or_without_gateway_does_nothing() {
    let now = Instant::now();
    let mut m = PortMapper::new(now, false, WG, CHECK, [1; 32]);
    m.set_gateway(now, Some(GW));
    assert!(m.poll_transmit().is_none() && m.poll_upnp().is_none() && m.poll_timeout().is_none());
    assert!(m.status().error.unwrap().contains("--no-portmap"));
    let mut m = PortMapper::new(now, true, WG, CHECK, [1; 32]);
    m.set_gateway(now, None);
    assert!(m.poll_transmit().is_none() && m.poll_timeout().is_none());
}

#[test]
fn new_gateway_starts_over_and_strangers_are_ignored() {
    let mut w = World::new(|_| {});
    assert!(w.candidate().is_some());
    // Answers from anyone but the router's 5351 are ignored.
    let forged = pcp::encode_response(&pcp::Response::Map {
        result: 0,
        lifetime_secs: 7200,
        epoch_secs: 0,
        nonce: [0; 12],
        internal_port: WG,
        external_port: 1,
        external_ip: IpAddr::from([6, 6, 6, 6]),
    });
    w.m.handle_datagram(w.now, SocketAddr::from(([10, 1, 0, 9], 5351)), &forged);
    w.m.handle_datagram(w.now, SocketAddr::from((GW.router, 5351)), &forged);
    w.m.handle_datagram(w.now, SocketAddr::from((GW.router, 5351)), &[2, 0x81, 0]);
    assert_eq!(w.candidate().unwrap().wg, ext(WG));
    let now = w.now;
    w.m.set_gateway(
        now,
        Some(Gateway {
            router: Ipv4Addr::new(10, 9, 0, 1),
            local: GW.local,
        }),
    );
    assert_eq!(w.candidate(), None);
    assert!(matches!(w.m.poll_event(), Some(Event::Lost { .. })));
}

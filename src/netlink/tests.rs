//! rtnetlink against the real kernel, each test in a throwaway network
//! namespace of its own thread: the namespace (and every link in it) goes
//! away when the thread ends, also when an assertion fails.

use std::io;
use std::net::IpAddr;

use super::*;
use crate::wg::AllowedIp;

/// Runs `f` in a fresh network namespace; skips (returns without running)
/// when we may not create one (not root).
fn in_fresh_netns(f: impl FnOnce() + Send + 'static) {
    let handle = std::thread::spawn(move || {
        // SAFETY: unshare only changes this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            log!(
                "skipping: cannot create a network namespace ({})",
                io::Error::last_os_error()
            );
            return;
        }
        f();
    });
    if let Err(panic) = handle.join() {
        std::panic::resume_unwind(panic);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn links_addresses_routes_in_a_namespace() {
    in_fresh_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        let mut monitor = Monitor::open().unwrap();
        assert_eq!(rtnl.link_index("lo").unwrap(), Some(1));
        assert_eq!(rtnl.link_index("wt-missing").unwrap(), None);

        let idx = rtnl.create_veth("wt0", "wt1").unwrap();
        assert_eq!(rtnl.link_index("wt0").unwrap(), Some(idx));
        let err = rtnl.create_veth("wt0", "wt2").unwrap_err().to_string();
        assert!(err.contains("wt0") && err.contains("File exists"), "{err}");

        rtnl.set_mtu(idx, 1380).unwrap();
        rtnl.set_link_up(idx, true).unwrap();
        let state = rtnl.link("wt0").unwrap().unwrap();
        assert_eq!(
            (state.mtu, state.up, state.kind.as_deref()),
            (1380, true, Some("veth"))
        );
        rtnl.set_link_up(idx, false).unwrap();
        assert!(!rtnl.link_by_index(idx).unwrap().unwrap().up);
        rtnl.set_link_up(idx, true).unwrap();

        rtnl.add_address(idx, ip("10.9.0.1"), 24).unwrap();
        rtnl.add_address(idx, ip("10.9.0.1"), 24).unwrap(); // idempotent
        rtnl.add_address(idx, ip("fd00:9::1"), 64).unwrap();
        rtnl.add_address(idx, ip("fd00:9::1"), 64).unwrap();
        let addrs = rtnl.addresses(idx).unwrap();
        assert!(addrs.contains(&(ip("10.9.0.1"), 24)), "{addrs:?}");
        assert!(addrs.contains(&(ip("fd00:9::1"), 64)), "{addrs:?}");

        let mesh: AllowedIp = "100.64.0.0/10".parse().unwrap();
        let v6: AllowedIp = "fd7a::/48".parse().unwrap();
        rtnl.replace_route(mesh, idx).unwrap();
        rtnl.replace_route(mesh, idx).unwrap(); // replace, not duplicate
        rtnl.replace_route(v6, idx).unwrap();
        let routes = rtnl.routes().unwrap();
        assert_eq!(
            routes
                .iter()
                .filter(|r| r.dst == mesh && r.oif == Some(idx))
                .count(),
            1,
            "{routes:?}"
        );
        assert!(
            routes.iter().any(|r| r.dst == v6 && r.oif == Some(idx)),
            "{routes:?}"
        );
        rtnl.del_route(mesh, idx).unwrap();
        assert!(!rtnl.routes().unwrap().iter().any(|r| r.dst == mesh));
        let err = rtnl.del_route(mesh, idx).unwrap_err().to_string();
        assert!(err.contains("100.64.0.0/10") && err.contains("wt0"), "{err}");

        rtnl.del_address(idx, ip("10.9.0.1"), 24).unwrap();
        assert!(!rtnl.addresses(idx).unwrap().contains(&(ip("10.9.0.1"), 24)));

        // The monitor saw the changes as they happened.
        let events = monitor.read_events().unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, NetEvent::LinkChanged(l) if l.name == "wt0")),
            "{events:?}"
        );
        assert!(events.contains(&NetEvent::AddressAdded {
            index: idx,
            addr: ip("10.9.0.1"),
            prefix: 24
        }));
        assert!(events.contains(&NetEvent::AddressRemoved {
            index: idx,
            addr: ip("10.9.0.1"),
            prefix: 24
        }));
        assert!(
            events
                .iter()
                .any(|e| matches!(e, NetEvent::RouteAdded(r) if r.dst == mesh))
        );
        assert!(
            events
                .iter()
                .any(|e| matches!(e, NetEvent::RouteRemoved(r) if r.dst == mesh))
        );
        assert!(monitor.read_events().unwrap().is_empty());

        rtnl.delete_link(idx).unwrap();
        assert_eq!(rtnl.link_index("wt0").unwrap(), None);
        assert_eq!(rtnl.link_index("wt1").unwrap(), None);
        let events = monitor.read_events().unwrap();
        assert!(
            events
                .iter()
                .any(|e| matches!(e, NetEvent::LinkRemoved { name, .. } if name == "wt0"))
        );
    });
}

#[test]
fn errors_name_the_object() {
    in_fresh_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        let err = rtnl
            .add_address(9999, ip("10.9.0.1"), 24)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("adding 10.9.0.1/24 to index 9999: "), "{err}");
        let err = rtnl.set_mtu(9999, 1400).unwrap_err().to_string();
        assert!(err.contains("index 9999"), "{err}");
        let err = rtnl.add_address(1, ip("10.9.0.1"), 33).unwrap_err().to_string();
        assert!(err.contains("/33"), "{err}");
        let err = rtnl.link_index("this-name-is-too-long").unwrap_err().to_string();
        assert!(err.contains("invalid interface name"), "{err}");
        // On a kernel without wireguard.ko this says so; with it, it works.
        match rtnl.create_wireguard_link("wt-wg0") {
            Ok(idx) => rtnl.delete_link(idx).unwrap(),
            Err(e) => assert!(e.to_string().contains("wt-wg0"), "{e}"),
        }
    });
}

#[test]
fn mio_can_own_the_monitor() {
    in_fresh_netns(|| {
        let mut poll = mio::Poll::new().unwrap();
        let mut monitor = Monitor::open().unwrap();
        poll.registry()
            .register(&mut monitor, mio::Token(1), mio::Interest::READABLE)
            .unwrap();
        let mut rtnl = Rtnl::open().unwrap();
        rtnl.set_link_up(1, true).unwrap();
        let mut events = mio::Events::with_capacity(4);
        poll.poll(&mut events, Some(std::time::Duration::from_secs(5)))
            .unwrap();
        assert!(events.iter().any(|e| e.token() == mio::Token(1)));
        assert!(!monitor.read_events().unwrap().is_empty());
    });
}

/// What `ip ARGS` prints (the real tool is the oracle); panics when it fails.
fn ip_cmd(args: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rules_match_ip_rule() {
    in_fresh_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        let exit = RuleSpec {
            priority: 1000,
            fwmark: Some(0xca6c),
            invert: true,
            table: 51820,
            suppress_prefixlen: None,
        };
        let suppress = RuleSpec {
            priority: 999,
            fwmark: None,
            invert: false,
            table: 254,
            suppress_prefixlen: Some(0),
        };
        let small_table = RuleSpec {
            priority: 1001,
            fwmark: Some(7),
            invert: false,
            table: 100,
            suppress_prefixlen: None,
        };
        for r in [&exit, &suppress, &small_table] {
            rtnl.add_rule(r).unwrap();
        }
        let shown = ip_cmd(&["-4", "rule", "show"]);
        assert!(
            shown.contains("1000:\tnot from all fwmark 0xca6c lookup 51820"),
            "{shown}"
        );
        assert!(
            shown.contains("999:\tfrom all lookup main suppress_prefixlength 0"),
            "{shown}"
        );
        assert!(shown.contains("1001:\tfrom all fwmark 0x7 lookup 100"), "{shown}");

        let err = rtnl.add_rule(&exit).unwrap_err().to_string();
        assert!(
            err.contains("not from all fwmark 0xca6c lookup 51820") && err.contains("File exists"),
            "{err}"
        );

        // What `ip rule add` made reads back the same way.
        ip_cmd(&[
            "rule", "add", "priority", "1002", "not", "fwmark", "0x10", "table", "300",
        ]);
        let rules = rtnl.rules_v4().unwrap();
        for r in [&exit, &suppress, &small_table] {
            assert!(rules.contains(r), "{r:?} in {rules:?}");
        }
        let from_ip = RuleSpec {
            priority: 1002,
            fwmark: Some(0x10),
            invert: true,
            table: 300,
            suppress_prefixlen: None,
        };
        assert!(rules.contains(&from_ip), "{rules:?}");
        // The kernel's own rules: local, main, default.
        assert!(
            rules.iter().any(|r| r.priority == 0 && r.table == 255),
            "{rules:?}"
        );

        rtnl.del_rule(&exit).unwrap();
        rtnl.del_rule(&exit).unwrap(); // already gone is fine
        rtnl.del_rule(&from_ip).unwrap();
        let shown = ip_cmd(&["-4", "rule", "show"]);
        assert!(
            !shown.contains("51820") && !shown.contains("lookup 300"),
            "{shown}"
        );
        assert!(shown.contains("suppress_prefixlength 0"), "{shown}");
    });
}

#[test]
fn routes_in_a_table_match_ip_route() {
    in_fresh_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        let idx = rtnl.create_veth("wt0", "wt1").unwrap();
        rtnl.set_link_up(idx, true).unwrap();
        let default: AllowedIp = "0.0.0.0/0".parse().unwrap();
        let v6_default: AllowedIp = "::/0".parse().unwrap();
        let lan: AllowedIp = "192.168.7.0/24".parse().unwrap();
        rtnl.replace_route_in(51820, default, idx).unwrap();
        rtnl.replace_route_in(51820, default, idx).unwrap(); // replace, not duplicate
        rtnl.replace_route_in(51820, v6_default, idx).unwrap();
        rtnl.replace_route_in(100, lan, idx).unwrap();

        let shown = ip_cmd(&["route", "show", "table", "51820"]);
        assert!(
            shown.starts_with("default dev wt0 proto 87 scope link"),
            "{shown}"
        );
        assert_eq!(shown.lines().count(), 1, "{shown}");
        let shown = ip_cmd(&["-6", "route", "show", "table", "51820"]);
        assert!(shown.starts_with("default dev wt0 proto 87"), "{shown}");
        let shown = ip_cmd(&["route", "show", "table", "100"]);
        assert!(shown.starts_with("192.168.7.0/24 dev wt0"), "{shown}");
        // Not in main.
        assert!(
            !rtnl
                .routes()
                .unwrap()
                .iter()
                .any(|r| r.dst == default || r.dst == lan)
        );

        let in_table = rtnl.routes_in(51820).unwrap();
        assert_eq!(in_table.len(), 2, "{in_table:?}");
        assert!(in_table.iter().all(|r| r.oif == Some(idx)), "{in_table:?}");
        assert!(in_table.iter().any(|r| r.dst == default), "{in_table:?}");
        assert!(in_table.iter().any(|r| r.dst == v6_default), "{in_table:?}");
        // What `ip route add` made reads back too.
        // (With warren's protocol: deletes match the protocol, so a route
        // of another protocol is left alone, as checked below.)
        ip_cmd(&[
            "route",
            "add",
            "10.1.0.0/16",
            "dev",
            "wt0",
            "proto",
            "87",
            "table",
            "51820",
        ]);
        let ten: AllowedIp = "10.1.0.0/16".parse().unwrap();
        assert!(rtnl.routes_in(51820).unwrap().iter().any(|r| r.dst == ten));

        rtnl.del_route_in(51820, default, idx).unwrap();
        rtnl.del_route_in(51820, ten, idx).unwrap();
        ip_cmd(&[
            "route",
            "add",
            "10.2.0.0/16",
            "dev",
            "wt0",
            "proto",
            "static",
            "table",
            "51820",
        ]);
        let admins: AllowedIp = "10.2.0.0/16".parse().unwrap();
        assert!(rtnl.del_route_in(51820, admins, idx).is_err());
        ip_cmd(&["route", "del", "10.2.0.0/16", "dev", "wt0", "table", "51820"]);
        let err = rtnl.del_route_in(51820, default, idx).unwrap_err().to_string();
        assert!(err.contains("0.0.0.0/0") && err.contains("table 51820"), "{err}");
        assert!(ip_cmd(&["route", "show", "table", "51820"]).trim().is_empty());
        assert_eq!(rtnl.routes_in(100).unwrap().len(), 1);
    });
}

/// The raw answers of this namespace's dumps (links, addresses, routes of
/// both families, rules), as whole netlink messages.
fn captured_answers(rtnl: &mut Rtnl) -> Vec<Vec<u8>> {
    use netlink_packet_core::NLM_F_DUMP;
    let dumps: [(u16, &[u8]); 5] = [
        (18, &[0u8; 16]),                             // RTM_GETLINK, ifinfomsg
        (22, &[0u8; 8]),                              // RTM_GETADDR, ifaddrmsg
        (26, &[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  // RTM_GETROUTE, AF_INET
        (26, &[10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]), // RTM_GETROUTE, AF_INET6
        (34, &[2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),  // RTM_GETRULE, AF_INET
    ];
    let mut out = Vec::new();
    for (kind, header) in dumps {
        for reply in rtnl
            .request(attr::Request::new(kind, header), NLM_F_DUMP)
            .unwrap()
        {
            let mut msg = attr::Request::new(reply.kind, &[]);
            msg.raw(&reply.payload);
            out.push(msg.finish(0, 1));
        }
    }
    out
}

#[test]
fn parsers_survive_every_truncation_and_bit_flip_of_real_answers() {
    in_fresh_netns(|| {
        let mut rtnl = Rtnl::open().unwrap();
        let idx = rtnl.create_veth("wt0", "wt1").unwrap();
        rtnl.set_link_up(idx, true).unwrap();
        rtnl.add_address(idx, ip("10.9.0.1"), 24).unwrap();
        rtnl.add_address(idx, ip("fd00:9::1"), 64).unwrap();
        rtnl.replace_route_in(51820, "0.0.0.0/0".parse().unwrap(), idx)
            .unwrap();
        let rule = RuleSpec {
            priority: 1000,
            fwmark: Some(0xca6c),
            invert: true,
            table: 51820,
            suppress_prefixlen: Some(0),
        };
        rtnl.add_rule(&rule).unwrap();

        let answers = captured_answers(&mut rtnl);
        assert!(answers.len() >= 10, "{} messages", answers.len());
        let mut kinds = std::collections::HashSet::new();
        for msg in &answers {
            // Whole, each message parses as what it is.
            let kind = u16::from_ne_bytes([msg[4], msg[5]]);
            kinds.insert(kind);
            assert!(fuzz_decode(msg) >= 1, "kind {kind} did not parse");
            for n in 0..msg.len() {
                fuzz_decode(&msg[..n]);
            }
            for byte in 0..msg.len() {
                for bit in [0, 3, 7] {
                    let mut flipped = msg.clone();
                    flipped[byte] ^= 1 << bit;
                    fuzz_decode(&flipped);
                }
            }
        }
        // RTM_NEWLINK, NEWADDR, NEWROUTE, NEWRULE all were among them.
        for kind in [16, 20, 24, 32] {
            assert!(kinds.contains(&kind), "no message of kind {kind}: {kinds:?}");
        }
    });
}

#[test]
fn truncated_payloads_are_malformed_and_name_what_was_read() {
    let mut link = attr::Request::new(16, &[0u8; 16]);
    link.str(3, "wt0").u32(4, 1420);
    let msg = link.finish(0, 1);
    let payload = &msg[16..];
    assert_eq!(LinkState::parse(payload).unwrap().mtu, 1420);
    for n in 0..payload.len() {
        let Err(e) = LinkState::parse(&payload[..n]) else {
            // Cut exactly between attributes: the first one is all there.
            assert!(n == 16 || n == 24, "cut at {n} parsed");
            continue;
        };
        let text = e.to_string();
        let what = if n < 16 { "ifinfomsg" } else { "link attribute" };
        assert!(text.contains(what), "cut at {n}: {text}");
    }
    // An MTU attribute too short for its u32.
    let mut bad = attr::Request::new(16, &[0u8; 16]);
    bad.attr(4, &[1, 2]);
    let msg = bad.finish(0, 1);
    let err = LinkState::parse(&msg[16..]).unwrap_err().to_string();
    assert!(err.contains("IFLA_MTU"), "{err}");
    // Unknown attributes are skipped.
    let mut unknown = attr::Request::new(16, &[0u8; 16]);
    unknown.attr(999, &[1, 2, 3]).u32(4, 1280);
    let msg = unknown.finish(0, 1);
    assert_eq!(LinkState::parse(&msg[16..]).unwrap().mtu, 1280);
}

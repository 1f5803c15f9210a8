//! The applier: a [`Ruleset`] rendered as `table inet warren_filter_IF` and
//! applied with one `nft -f -` transaction that deletes and recreates the
//! table, so there is no instant with no rules or half of them. Sources are
//! named sets (a thousand peers is one set, not a thousand rules).
//!
//! Only traffic arriving on the mesh interface is filtered (the base chains
//! accept everything else): replies to this node's own connections pass by
//! conntrack, accepted connections pass, the rest is refused (TCP reset,
//! ICMP administratively prohibited) so a peer sees "refused" at once.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::policy::{Accept, Ruleset, Sources};
use crate::control::policy::{PortSpec, Proto};

/// How long one `nft` run may take before it is killed: the agent's loop
/// waits for it (a 1,000-address set applies in tens of milliseconds).
pub const NFT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the loop looks whether `nft` is done while it waits.
const NFT_POLL: Duration = Duration::from_millis(2);
/// Where `nft` is looked for before `PATH` (a daemon's PATH may lack sbin).
const NFT_PATHS: &[&str] = &["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

/// Where nft is, if in one of the usual places.
pub fn binary() -> Option<&'static str> {
    NFT_PATHS
        .iter()
        .find(|p| std::path::Path::new(p).exists())
        .copied()
}

/// The table of the policy for interface `ifname`.
pub fn table_name(ifname: &str) -> String {
    format!("warren_filter_{ifname}")
}

/// The transaction that replaces the table with `rules`.
pub fn render(ifname: &str, rules: &Ruleset) -> String {
    let table = table_name(ifname);
    // One named set per distinct source set, shared by the rules that have it.
    let mut sets: Vec<(&Sources, String)> = Vec::new();
    for a in rules.input.iter().chain(&rules.forward) {
        if matches!(a.sources, Sources::Set(_)) && !sets.iter().any(|(s, _)| *s == &a.sources) {
            let name = format!("src_{}", sets.len());
            sets.push((&a.sources, name));
        }
    }
    let mut s = String::new();
    // Creating the table first makes the delete valid when it does not exist yet.
    let _ = writeln!(
        s,
        "table inet {table}\ndelete table inet {table}\ntable inet {table} {{"
    );
    for (sources, name) in &sets {
        let Sources::Set(addrs) = sources else { continue };
        let elements: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            s,
            "  set {name} {{\n    type ipv4_addr\n    elements = {{ {} }}\n  }}",
            elements.join(", ")
        );
    }
    for (hook, chain, accepts) in [
        ("input", "mesh_in", &rules.input),
        ("forward", "mesh_fwd", &rules.forward),
    ] {
        let _ = writeln!(
            s,
            "  chain {hook} {{\n    type filter hook {hook} priority filter; policy accept;\n    iifname \"{ifname}\" jump {chain}\n  }}"
        );
        let _ = writeln!(
            s,
            "  chain {chain} {{\n    ct state established,related accept\n    ct state invalid drop"
        );
        for a in accepts.iter() {
            for line in accept_lines(a, &sets) {
                let _ = writeln!(s, "    {line}");
            }
        }
        let _ = writeln!(
            s,
            "    meta l4proto tcp reject with tcp reset\n    reject with icmpx admin-prohibited\n  }}"
        );
    }
    s.push_str("}\n");
    s
}

fn accept_lines(a: &Accept, sets: &[(&Sources, String)]) -> Vec<String> {
    let mut head = String::new();
    if let Some((_, name)) = sets.iter().find(|(s, _)| *s == &a.sources) {
        let _ = write!(head, "ip saddr @{name} ");
    }
    if !a.dests.is_empty() {
        let d: Vec<String> = a.dests.iter().map(|p| p.to_string()).collect();
        let _ = write!(head, "ip daddr {{ {} }} ", d.join(", "));
    }
    a.ports
        .iter()
        .map(|p| {
            let m = match p {
                PortSpec::Any => String::new(),
                PortSpec::Proto(Proto::Icmp) => "meta l4proto icmp ".into(),
                PortSpec::Proto(pr) => format!("meta l4proto {} ", pr.name()),
                PortSpec::Range(pr, lo, hi) if lo == hi => format!("{} dport {lo} ", pr.name()),
                PortSpec::Range(pr, lo, hi) => format!("{} dport {lo}-{hi} ", pr.name()),
            };
            format!("{head}{m}accept")
        })
        .collect()
}

/// The transaction that removes the table (a no-op when it does not exist).
pub fn render_remove(ifname: &str) -> String {
    let table = table_name(ifname);
    format!("table inet {table}\ndelete table inet {table}\n")
}

/// Runs `nft -f -` with `script`, bounded by [`NFT_TIMEOUT`]; the error is
/// nft's first complaint on one line.
pub fn run(script: &str) -> Result<()> {
    let nft = binary().unwrap_or("nft");
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {nft} (is nftables installed?)"))?;
    let written = child
        .stdin
        .take()
        .map(|mut i| i.write_all(script.as_bytes()))
        .unwrap_or(Ok(()));
    let deadline = Instant::now() + NFT_TIMEOUT;
    let status = loop {
        if let Some(st) = child.try_wait().context("waiting for nft")? {
            break st;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("nft did not finish within {} s; killed", NFT_TIMEOUT.as_secs());
        }
        std::thread::sleep(NFT_POLL);
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !status.success() {
        let first = err
            .lines()
            .find(|l| l.starts_with("Error") || l.contains("rror:"))
            .or_else(|| err.lines().next())
            .unwrap_or("")
            .trim();
        bail!("nft failed ({status}): {first}");
    }
    written.context("writing the ruleset to nft")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::policy::Prefix;
    use std::net::Ipv4Addr;

    fn set(l: &[u8]) -> Sources {
        Sources::Set(l.iter().map(|&x| Ipv4Addr::new(100, 64, 0, x)).collect())
    }

    #[test]
    fn renders_one_transaction_with_named_sets_shared_by_equal_sources() {
        let rules = Ruleset {
            input: vec![
                Accept {
                    sources: set(&[11, 12]),
                    dests: vec![],
                    ports: vec![PortSpec::Range(Proto::Tcp, 22, 22), PortSpec::Proto(Proto::Icmp)],
                },
                Accept {
                    sources: Sources::Any,
                    dests: vec![],
                    ports: vec![PortSpec::Range(Proto::Udp, 5000, 5100)],
                },
            ],
            forward: vec![Accept {
                sources: set(&[11, 12]),
                dests: vec![Prefix {
                    addr: Ipv4Addr::new(192, 168, 1, 0),
                    len: 24,
                }],
                ports: vec![PortSpec::Any],
            }],
        };
        let want = r#"table inet warren_filter_wg0
delete table inet warren_filter_wg0
table inet warren_filter_wg0 {
  set src_0 {
    type ipv4_addr
    elements = { 100.64.0.11, 100.64.0.12 }
  }
  chain input {
    type filter hook input priority filter; policy accept;
    iifname "wg0" jump mesh_in
  }
  chain mesh_in {
    ct state established,related accept
    ct state invalid drop
    ip saddr @src_0 tcp dport 22 accept
    ip saddr @src_0 meta l4proto icmp accept
    udp dport 5000-5100 accept
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    iifname "wg0" jump mesh_fwd
  }
  chain mesh_fwd {
    ct state established,related accept
    ct state invalid drop
    ip saddr @src_0 ip daddr { 192.168.1.0/24 } accept
    meta l4proto tcp reject with tcp reset
    reject with icmpx admin-prohibited
  }
}
"#;
        assert_eq!(render("wg0", &rules), want);
        assert_eq!(
            render_remove("wg0"),
            "table inet warren_filter_wg0\ndelete table inet warren_filter_wg0\n"
        );
    }

    #[test]
    fn a_missing_nft_is_one_line_error() {
        // `run` with a script nft refuses shows nft's complaint; a box without nft says so.
        if binary().is_some() {
            return;
        }
        let e = format!("{:#}", run("flush ruleset").unwrap_err());
        assert!(e.contains("is nftables installed"), "{e}");
    }
}

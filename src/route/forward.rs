//! The node that carries traffic for the others (subnet routes, exit node):
//! IPv4 forwarding on, and masquerade of what arrives from the mesh and
//! leaves by another interface, so that LAN hosts and the internet answer
//! to this node's address without a route back to the mesh.
//!
//! The masquerade lives in its own table, `table ip warren_nat_IF`, replaced
//! whole in one `nft -f -` transaction; nobody else edits it, and it filters
//! nothing (filtering is the policy's table). `ip_forward` is global to the
//! network namespace: it is set back to 0 on a clean stop only if this agent
//! turned it on.

use std::io::Write;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The nat table's name for `ifname`: nft names take letters, digits and `_`.
pub fn table_name(ifname: &str) -> String {
    let safe: String = ifname
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("warren_nat_{safe}")
}

/// The whole table, as one transaction that replaces any previous one
/// (declaring it first makes the delete succeed when there was none).
fn replace_script(ifname: &str) -> String {
    let t = table_name(ifname);
    format!(
        "table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tiifname \"{ifname}\" oifname != \"{ifname}\" masquerade\n\
         \t}}\n}}\n"
    )
}

fn remove_script(ifname: &str) -> String {
    let t = table_name(ifname);
    format!("table ip {t}\ndelete table ip {t}\n")
}

fn nft(script: &str) -> Result<()> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).context("writing to nft")?;
    }
    let out = child.wait_with_output().context("running nft")?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        bail!("nft: {}", err.lines().next().unwrap_or("failed").trim());
    }
    Ok(())
}

/// Forwarding and masquerade, as this agent set them up.
pub struct Forwarding {
    ifname: String,
    /// This agent turned ip_forward on: it turns it off again.
    turned_on: bool,
    nat: bool,
}

impl Forwarding {
    /// `snat`: masquerade (off for LANs that route the mesh range back).
    pub fn start(ifname: &str, snat: bool) -> Result<Forwarding> {
        let was = std::fs::read_to_string(IP_FORWARD).with_context(|| format!("reading {IP_FORWARD}"))?;
        let turned_on = was.trim() == "0";
        if turned_on {
            std::fs::write(IP_FORWARD, "1").with_context(|| format!("turning on {IP_FORWARD}"))?;
            log!("agent: IPv4 forwarding on (it was off; off again when warren stops)");
        }
        if snat {
            nft(&replace_script(ifname)).with_context(|| format!("masquerading for {ifname}"))?;
            log!(
                "agent: masquerading traffic from {ifname} to other interfaces (table ip {})",
                table_name(ifname)
            );
        } else {
            remove_stale(ifname);
        }
        Ok(Forwarding {
            ifname: ifname.to_string(),
            turned_on,
            nat: snat,
        })
    }

    pub fn stop(&mut self) {
        if std::mem::take(&mut self.nat) {
            match nft(&remove_script(&self.ifname)) {
                Ok(()) => log!("agent: removed table ip {}", table_name(&self.ifname)),
                Err(e) => log_warn!("agent: removing table ip {}: {e:#}", table_name(&self.ifname)),
            }
        }
        if std::mem::take(&mut self.turned_on) {
            match std::fs::write(IP_FORWARD, "0") {
                Ok(()) => log!("agent: IPv4 forwarding off again"),
                Err(e) => log_warn!("agent: turning off {IP_FORWARD}: {e}"),
            }
        }
    }
}

/// A table left by an agent that did not stop cleanly, when this one does
/// not masquerade. Quiet when there is none (or no nft: then there is none).
pub fn remove_stale(ifname: &str) {
    if nft(&format!("list table ip {}\n", table_name(ifname))).is_ok() && nft(&remove_script(ifname)).is_ok()
    {
        log!("agent: removed a stale table ip {}", table_name(ifname));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_named_for_the_interface_and_replaced_whole() {
        assert_eq!(table_name("warren0"), "warren_nat_warren0");
        assert_eq!(table_name("wr-a.1"), "warren_nat_wr_a_1");
        let s = replace_script("wr-a");
        assert!(
            s.starts_with("table ip warren_nat_wr_a\ndelete table ip warren_nat_wr_a\n"),
            "{s}"
        );
        assert!(
            s.contains("iifname \"wr-a\" oifname != \"wr-a\" masquerade"),
            "{s}"
        );
    }
}

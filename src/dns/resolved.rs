//! systemd-resolved: the mesh interface gets the agent as its DNS server
//! and `~DOMAIN` (plus the mesh's reverse zones) as routing domains, so
//! only mesh names go to the agent; `resolvectl revert` undoes both.
//! /etc/resolv.conf is never touched.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// The stub resolver's file: present where resolved manages resolv.conf.
const STUB_RESOLV_CONF: &str = "/run/systemd/resolve/stub-resolv.conf";
/// resolved's varlink socket: present only while it runs.
const RESOLVE_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// Whether systemd-resolved runs here and `resolvectl` can talk to it.
pub fn present() -> bool {
    Path::new(STUB_RESOLV_CONF).exists() && Path::new(RESOLVE_SOCKET).exists() && on_path("resolvectl")
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
}

/// The commands that point resolved at the agent for `domain` on `ifname`.
pub fn set_commands(ifname: &str, server: SocketAddr, domain: &str) -> Vec<Vec<String>> {
    // resolvectl takes ADDR or ADDR:PORT; port 53 is written plainly so
    // that older versions, which know no port, understand it too.
    let server = if server.port() == 53 {
        server.ip().to_string()
    } else {
        server.to_string()
    };
    let mut domains = vec!["domain".to_string(), ifname.to_string(), format!("~{domain}")];
    // 100.64.0.0/10 in reverse: 64.100.in-addr.arpa .. 127.100.in-addr.arpa.
    domains.extend((64..=127).map(|b| format!("~{b}.100.in-addr.arpa")));
    let mut out = vec![vec!["dns".to_string(), ifname.to_string(), server]];
    out.push(domains);
    out
}

/// The command that drops everything set on `ifname`.
pub fn revert_command(ifname: &str) -> Vec<String> {
    vec!["revert".to_string(), ifname.to_string()]
}

/// Runs `resolvectl ARGS`, one call.
pub fn resolvectl(args: &[String]) -> Result<()> {
    let out = Command::new("resolvectl")
        .args(args)
        .output()
        .with_context(|| format!("running resolvectl {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "resolvectl {}: {}",
            args.first().map(String::as_str).unwrap_or(""),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_the_link_server_and_routing_domains() {
        let cmds = set_commands("warren0", "100.64.0.9:53".parse().unwrap(), "warren");
        assert_eq!(cmds[0], ["dns", "warren0", "100.64.0.9"]);
        assert_eq!(&cmds[1][..3], ["domain", "warren0", "~warren"]);
        assert!(cmds[1].contains(&"~64.100.in-addr.arpa".to_string()));
        assert!(cmds[1].contains(&"~127.100.in-addr.arpa".to_string()));
        assert!(!cmds[1].contains(&"~128.100.in-addr.arpa".to_string()));
        assert_eq!(cmds[1].len(), 3 + 64);
        let other = set_commands("wg1", "100.64.0.9:5353".parse().unwrap(), "mesh");
        assert_eq!(other[0], ["dns", "wg1", "100.64.0.9:5353"]);
        assert_eq!(other[1][2], "~mesh");
        assert_eq!(revert_command("warren0"), ["revert", "warren0"]);
    }
}

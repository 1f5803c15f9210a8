//! `warren wg apply | show | delete`: the low-level WireGuard commands for
//! operators and tests. `apply` is declarative: the interface ends up exactly
//! as the file says, and re-applying changes nothing.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use super::out::outln;
use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};

use crate::keys::Key;
use crate::netlink::Rtnl;
use crate::wg::config::{self, InterfaceAddress, WgFile};
use crate::wg::reconcile::{self, ApplyReport};
use crate::wg::select::{self, BackendChoice};
use crate::wg::{Backend, BackendKind, DeviceState};

#[derive(Subcommand, Debug)]
pub enum WgCommand {
    /// Make a WireGuard interface match a config file (creating it if needed).
    Apply(ApplyArgs),
    /// Show a WireGuard interface and its peers (never private or preshared keys).
    Show(ShowArgs),
    /// Delete a WireGuard interface.
    Delete(DeleteArgs),
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[arg(long)]
    pub interface: String,
    #[arg(long)]
    pub config: PathBuf,
    /// Default: $WARREN_WG_BACKEND, else auto (kernel if available).
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
}

#[derive(Args, Debug)]
pub struct ShowArgs {
    #[arg(long)]
    pub json: bool,
    pub interface: String,
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    pub interface: String,
    #[arg(long, value_enum)]
    pub backend: Option<BackendChoice>,
}

pub fn run(cmd: WgCommand) -> Result<()> {
    match cmd {
        WgCommand::Apply(a) => apply(a).context("wg apply"),
        WgCommand::Show(a) => show(a).context("wg show"),
        WgCommand::Delete(a) => delete(a).context("wg delete"),
    }
}

/// Linux's rule for interface names (`dev_valid_name`).
pub fn validate_ifname(name: &str) -> Result<()> {
    const IFNAMSIZ: usize = 16;
    if name.is_empty() || name.len() >= IFNAMSIZ {
        bail!(
            "invalid interface name {name:?}: must be 1 to {} bytes",
            IFNAMSIZ - 1
        );
    }
    if name == "." || name == ".." || name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
        bail!("invalid interface name {name:?}: no '/', ':', whitespace, '.' or '..'");
    }
    Ok(())
}

/// Configuring WireGuard needs CAP_NET_ADMIN (and the UAPI sockets are
/// root's): say so up front instead of failing half-way with EPERM.
fn require_net_admin() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok());
    let has = match effective {
        Some(caps) => caps & (1 << CAP_NET_ADMIN) != 0,
        // SAFETY: geteuid has no preconditions.
        None => (unsafe { libc::geteuid() }) == 0,
    };
    if !has {
        bail!("needs root (CAP_NET_ADMIN)");
    }
    Ok(())
}

fn apply(args: ApplyArgs) -> Result<()> {
    let ifname = args.interface.as_str();
    validate_ifname(ifname)?;
    require_net_admin()?;
    let file = config::load(&args.config)?;
    let choice = BackendChoice::resolve(args.backend)?;
    // An interface that exists stays with the backend serving it.
    let mut backend = match select::backend_for_existing(choice, ifname)? {
        Some(b) => b,
        None => select::open_backend(choice, file.userspace_command.clone())?,
    };
    let report = reconcile::apply(backend.as_mut(), ifname, &file.device)
        .with_context(|| format!("applying {}", args.config.display()))?;
    let link = match configure_link(ifname, &file) {
        Ok(l) => l,
        Err(e) => {
            if report.created {
                // Nothing half-applied: the interface did not exist before this call.
                if let Err(d) = backend.delete(ifname) {
                    log_warn!("warren: {ifname}: removing the half-configured interface failed: {d:#}");
                }
            }
            return Err(e.context(format!("applying {}", args.config.display())));
        }
    };
    outln!("{}", summary(ifname, &report, &link))?;
    Ok(())
}

#[derive(Debug, Default)]
struct LinkChanges {
    addresses_added: usize,
    addresses_removed: usize,
}

/// Addresses (exactly the listed ones), MTU and link up, over rtnetlink.
fn configure_link(ifname: &str, file: &WgFile) -> Result<LinkChanges> {
    let mut rtnl = Rtnl::open().context("opening rtnetlink")?;
    let index = rtnl
        .link_index(ifname)
        .with_context(|| format!("looking up link {ifname}"))?
        .with_context(|| format!("link {ifname} is not in this network namespace"))?;
    if let Some(mtu) = file.mtu {
        rtnl.set_mtu(index, mtu)
            .with_context(|| format!("{ifname}: setting MTU {mtu}"))?;
    }
    let mut changes = LinkChanges::default();
    let present: Vec<InterfaceAddress> = rtnl
        .addresses(index)
        .with_context(|| format!("{ifname}: reading addresses"))?
        .into_iter()
        .map(|(addr, prefix)| InterfaceAddress { addr, prefix })
        .collect();
    for a in present.iter().filter(|a| !file.addresses.contains(a)) {
        if is_ipv6_link_local(a) {
            // The kernel's own fe80:: address, not ours to manage.
            continue;
        }
        rtnl.del_address(index, a.addr, a.prefix)
            .with_context(|| format!("{ifname}: removing address {a}"))?;
        changes.addresses_removed += 1;
    }
    for a in file.addresses.iter().filter(|a| !present.contains(a)) {
        rtnl.add_address(index, a.addr, a.prefix)
            .with_context(|| format!("{ifname}: adding address {a}"))?;
        changes.addresses_added += 1;
    }
    rtnl.set_link_up(index, true)
        .with_context(|| format!("{ifname}: setting link up"))?;
    Ok(changes)
}

fn is_ipv6_link_local(a: &InterfaceAddress) -> bool {
    matches!(a.addr, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn summary(ifname: &str, r: &ApplyReport, link: &LinkChanges) -> String {
    let mut line = if !r.changed_anything() {
        format!("{ifname}: up to date")
    } else {
        let unit = match r.backend {
            BackendKind::Userspace => plural(r.cost.messages, "UAPI request", "UAPI requests"),
            BackendKind::Kernel => plural(r.cost.messages, "netlink message", "netlink messages"),
        };
        format!(
            "{ifname}: {} added, {} removed, {} changed ({}{}, {unit}, {})",
            plural(r.peers_added, "peer", "peers"),
            r.peers_removed,
            r.peers_changed,
            r.backend,
            if r.created { ", created" } else { "" },
            plural(r.cost.bytes, "byte", "bytes"),
        )
    };
    if link.addresses_added + link.addresses_removed > 0 {
        line.push_str(&format!(
            "; addresses: {} added, {} removed",
            link.addresses_added, link.addresses_removed
        ));
    }
    line
}

fn no_such(ifname: &str) -> anyhow::Error {
    anyhow::anyhow!("no WireGuard interface {ifname:?}")
}

fn show(args: ShowArgs) -> Result<()> {
    let ifname = args.interface.as_str();
    validate_ifname(ifname)?;
    require_net_admin()?;
    let choice = BackendChoice::resolve(args.backend)?;
    let mut backend = select::backend_for_existing(choice, ifname)?.ok_or_else(|| no_such(ifname))?;
    let state = backend.get(ifname)?;
    let view = ShowView::new(ifname, backend.as_ref(), &state, SystemTime::now());
    if args.json {
        let json = serde_json::to_string_pretty(&view).context("encoding JSON")?;
        outln!("{json}")
    } else {
        super::out::write(&view.text())
    }
}

fn delete(args: DeleteArgs) -> Result<()> {
    let ifname = args.interface.as_str();
    validate_ifname(ifname)?;
    require_net_admin()?;
    let choice = BackendChoice::resolve(args.backend)?;
    let mut backend = select::backend_for_existing(choice, ifname)?.ok_or_else(|| no_such(ifname))?;
    backend.delete(ifname)
}

/// What `wg show` prints: public data only, by construction.
#[derive(serde::Serialize)]
struct ShowView {
    interface: String,
    backend: BackendKind,
    public_key: Option<Key>,
    listen_port: u16,
    fwmark: u32,
    peers: Vec<PeerView>,
}

#[derive(serde::Serialize)]
struct PeerView {
    public_key: Key,
    endpoint: Option<std::net::SocketAddr>,
    allowed_ips: Vec<crate::wg::AllowedIp>,
    /// Seconds since the Unix epoch; `null` before the first handshake.
    latest_handshake: Option<u64>,
    #[serde(skip)]
    handshake_ago: Option<Duration>,
    rx_bytes: u64,
    tx_bytes: u64,
    persistent_keepalive: Option<u16>,
    has_preshared_key: bool,
}

impl ShowView {
    fn new(ifname: &str, backend: &dyn Backend, state: &DeviceState, now: SystemTime) -> ShowView {
        ShowView {
            interface: ifname.to_string(),
            backend: backend.kind(),
            public_key: state.public_key,
            listen_port: state.listen_port,
            fwmark: state.fwmark,
            peers: state
                .peers
                .iter()
                .map(|p| PeerView {
                    public_key: p.public_key,
                    endpoint: p.endpoint,
                    allowed_ips: p.allowed_ips.clone(),
                    latest_handshake: p
                        .last_handshake
                        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                        .map(|d| d.as_secs()),
                    handshake_ago: p.last_handshake.and_then(|t| now.duration_since(t).ok()),
                    rx_bytes: p.rx_bytes,
                    tx_bytes: p.tx_bytes,
                    persistent_keepalive: p.persistent_keepalive,
                    has_preshared_key: p.preshared_key.is_some(),
                })
                .collect(),
        }
    }

    fn text(&self) -> String {
        let mut s = format!("interface: {}\n  backend: {}\n", self.interface, self.backend);
        match &self.public_key {
            Some(k) => s.push_str(&format!("  public key: {k}\n")),
            None => s.push_str("  public key: (none)\n"),
        }
        s.push_str(&format!("  listening port: {}\n", self.listen_port));
        if self.fwmark != 0 {
            s.push_str(&format!("  fwmark: {:#x}\n", self.fwmark));
        }
        for p in &self.peers {
            s.push_str(&format!("\npeer: {}\n", p.public_key));
            if p.has_preshared_key {
                s.push_str("  preshared key: (hidden)\n");
            }
            if let Some(e) = p.endpoint {
                s.push_str(&format!("  endpoint: {e}\n"));
            }
            let ips: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
            s.push_str(&format!(
                "  allowed ips: {}\n",
                if ips.is_empty() {
                    "(none)".to_string()
                } else {
                    ips.join(", ")
                }
            ));
            match (p.latest_handshake, p.handshake_ago) {
                (None, _) => s.push_str("  latest handshake: never\n"),
                (Some(_), Some(ago)) => s.push_str(&format!("  latest handshake: {} s ago\n", ago.as_secs())),
                (Some(t), None) => s.push_str(&format!("  latest handshake: at {t} (clock skew)\n")),
            }
            s.push_str(&format!(
                "  transfer: {} B received, {} B sent\n",
                p.rx_bytes, p.tx_bytes
            ));
            if let Some(ka) = p.persistent_keepalive {
                s.push_str(&format!("  persistent keepalive: every {ka} s\n"));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wg::{PeerState, WireCost};

    #[test]
    fn interface_names() {
        for good in ["wg0", "a", "warren-mesh-123"] {
            validate_ifname(good).unwrap();
        }
        for bad in ["", "0123456789abcdef", "a/b", "a b", "a:1", ".", "..", "wg\t0"] {
            assert!(validate_ifname(bad).is_err(), "{bad:?}");
        }
    }

    fn report(added: usize, removed: usize, changed: usize, created: bool) -> ApplyReport {
        ApplyReport {
            backend: BackendKind::Userspace,
            created,
            peers_added: added,
            peers_removed: removed,
            peers_changed: changed,
            device_changed: created,
            cost: WireCost {
                messages: 1,
                bytes: 812,
            },
        }
    }

    #[test]
    fn summaries() {
        let none = LinkChanges::default();
        assert_eq!(
            summary("wg0", &report(2, 0, 0, false), &none),
            "wg0: 2 peers added, 0 removed, 0 changed (userspace, 1 UAPI request, 812 bytes)"
        );
        assert_eq!(
            summary("wg0", &report(1, 0, 0, true), &none),
            "wg0: 1 peer added, 0 removed, 0 changed (userspace, created, 1 UAPI request, 812 bytes)"
        );
        let mut quiet = report(0, 0, 0, false);
        quiet.cost = WireCost::default();
        assert_eq!(summary("wg0", &quiet, &none), "wg0: up to date");
        let link = LinkChanges {
            addresses_added: 1,
            addresses_removed: 0,
        };
        assert_eq!(
            summary("wg0", &quiet, &link),
            "wg0: up to date; addresses: 1 added, 0 removed"
        );
    }

    struct Fixed;
    impl Backend for Fixed {
        fn kind(&self) -> BackendKind {
            BackendKind::Userspace
        }
        fn exists(&mut self, _: &str) -> Result<bool> {
            Ok(true)
        }
        fn create(&mut self, _: &str) -> Result<()> {
            Ok(())
        }
        fn delete(&mut self, _: &str) -> Result<()> {
            Ok(())
        }
        fn get(&mut self, _: &str) -> Result<DeviceState> {
            unreachable!()
        }
        fn set(&mut self, _: &str, _: &crate::wg::DeviceUpdate) -> Result<WireCost> {
            unreachable!()
        }
    }

    #[test]
    fn show_never_prints_private_or_preshared_keys() {
        let private = Key::generate_private();
        let psk = Key::generate_preshared();
        let state = DeviceState {
            private_key: Some(private),
            public_key: Some(private.public_key()),
            listen_port: 51820,
            fwmark: 0x1234,
            peers: vec![PeerState {
                public_key: Key([7; 32]),
                preshared_key: Some(psk),
                endpoint: Some("[fd00::1]:51820".parse().unwrap()),
                allowed_ips: vec!["10.9.0.2/32".parse().unwrap()],
                persistent_keepalive: Some(25),
                last_handshake: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1000)),
                rx_bytes: 10,
                tx_bytes: 20,
            }],
        };
        let view = ShowView::new(
            "wg0",
            &Fixed,
            &state,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1012),
        );
        let text = view.text();
        let json = serde_json::to_string(&view).unwrap();
        for out in [&text, &json] {
            assert!(!out.contains(&private.to_base64()) && !out.contains(&private.to_hex()));
            assert!(!out.contains(&psk.to_base64()) && !out.contains(&psk.to_hex()));
            assert!(out.contains(&private.public_key().to_base64()));
        }
        assert!(text.contains("latest handshake: 12 s ago"), "{text}");
        assert!(text.contains("fwmark: 0x1234"));
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["backend"], "userspace");
        assert_eq!(v["peers"][0]["latest_handshake"], 1000);
        assert_eq!(v["peers"][0]["allowed_ips"][0], "10.9.0.2/32");
        assert_eq!(v["peers"][0]["endpoint"], "[fd00::1]:51820");
    }
}

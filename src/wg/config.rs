//! The declarative TOML file of `warren wg apply`: one interface, its keys,
//! port, mark, addresses, MTU and peers. Reading it resolves key files and
//! checks everything, so nothing is touched when the file is wrong.

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;

use super::{AllowedIp, DeviceConfig, PeerConfig};
use crate::keys::Key;

/// A key file holds one base64 key and a newline; refuse to slurp anything big.
const MAX_KEY_FILE_BYTES: u64 = 1024;
const MAX_CONFIG_BYTES: u64 = 64 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    private_key_file: PathBuf,
    listen_port: Option<u16>,
    fwmark: Option<u32>,
    #[serde(default)]
    address: Vec<String>,
    mtu: Option<u32>,
    userspace_command: Option<Vec<String>>,
    #[serde(default)]
    peer: Vec<RawPeer>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeer {
    public_key: String,
    endpoint: Option<String>,
    #[serde(default)]
    allowed_ips: Vec<String>,
    persistent_keepalive: Option<u16>,
    preshared_key_file: Option<PathBuf>,
}

/// An interface address: unlike an allowed IP it keeps its host bits
/// (`10.9.0.1/24` is the address 10.9.0.1 on a /24).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InterfaceAddress {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl std::fmt::Display for InterfaceAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl std::str::FromStr for InterfaceAddress {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<InterfaceAddress> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.parse().map_err(|_| anyhow!("invalid address {s:?}"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| anyhow!("invalid address {s:?}: prefix length must be 0..={max}"))?,
        };
        Ok(InterfaceAddress { addr, prefix })
    }
}

/// Everything `warren wg apply` needs, checked.
#[derive(Clone, Debug)]
pub struct WgFile {
    pub device: DeviceConfig,
    pub addresses: Vec<InterfaceAddress>,
    pub mtu: Option<u32>,
    pub userspace_command: Option<Vec<String>>,
}

/// Reads and checks a config file; every error starts with the file's name.
pub fn load(path: &Path) -> Result<WgFile> {
    let text = read_limited(path, MAX_CONFIG_BYTES).with_context(|| format!("{}", path.display()))?;
    parse(&text, path.parent().unwrap_or(Path::new(".")), &read_key_file)
        .with_context(|| format!("{}", path.display()))
}

/// Parses config text; relative key paths are taken from `base`.
/// `read_key` reads a key file (tests substitute their own).
pub fn parse(text: &str, base: &Path, read_key: &dyn Fn(&Path) -> Result<Key>) -> Result<WgFile> {
    let raw: RawFile = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    let private_key = read_key(&base.join(&raw.private_key_file)).context("private_key_file")?;
    let mut addresses = Vec::new();
    for a in &raw.address {
        let parsed: InterfaceAddress = a.parse().context("address")?;
        if !addresses.contains(&parsed) {
            addresses.push(parsed);
        }
    }
    if let Some(mtu) = raw.mtu
        && !(MIN_MTU..=MAX_MTU).contains(&mtu)
    {
        bail!("mtu {mtu} out of range {MIN_MTU}..={MAX_MTU}");
    }
    if let Some(cmd) = &raw.userspace_command
        && cmd.first().is_none_or(|p| p.is_empty())
    {
        bail!("userspace_command is empty: name a program such as wireguard-go");
    }
    let mut peers = Vec::with_capacity(raw.peer.len());
    for (i, p) in raw.peer.iter().enumerate() {
        let public_key: Key = p
            .public_key
            .parse()
            .with_context(|| format!("peer {}: public_key {:?}", i + 1, p.public_key))?;
        let name = super::reconcile::peer_name(i, &public_key);
        peers.push(peer(p, base, read_key).with_context(|| name.clone())?);
    }
    let device = DeviceConfig {
        private_key,
        listen_port: raw.listen_port,
        fwmark: raw.fwmark.filter(|&m| m != 0),
        peers,
    };
    super::reconcile::validate(&device)?;
    Ok(WgFile {
        device,
        addresses,
        mtu: raw.mtu,
        userspace_command: raw.userspace_command,
    })
}

/// IPv4 needs 576; WireGuard's 80 bytes of overhead on a 65535 jumbo frame.
const MIN_MTU: u32 = 576;
const MAX_MTU: u32 = 65535 - 80;

fn peer(p: &RawPeer, base: &Path, read_key: &dyn Fn(&Path) -> Result<Key>) -> Result<PeerConfig> {
    let endpoint = p.endpoint.as_deref().map(parse_endpoint).transpose()?;
    let allowed_ips = p
        .allowed_ips
        .iter()
        .map(|s| s.parse::<AllowedIp>())
        .collect::<Result<Vec<_>>>()?;
    let preshared_key = p
        .preshared_key_file
        .as_ref()
        .map(|f| read_key(&base.join(f)).context("preshared_key_file"))
        .transpose()?;
    Ok(PeerConfig {
        public_key: p.public_key.parse()?,
        preshared_key,
        endpoint,
        allowed_ips,
        persistent_keepalive: p.persistent_keepalive.filter(|&k| k != 0),
    })
}

/// Only literal addresses: resolving names here would make applying depend
/// on DNS, and a config that silently changes meaning when DNS does.
pub fn parse_endpoint(s: &str) -> Result<SocketAddr> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    match s.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() && !host.is_empty() => {
            if host.contains(':') && !host.starts_with('[') {
                bail!("invalid endpoint {s:?}: IPv6 endpoints are written [address]:port");
            }
            if host
                .trim_matches(|c| c == '[' || c == ']')
                .parse::<IpAddr>()
                .is_err()
            {
                bail!("invalid endpoint {s:?}: hostnames are not resolved, give an IP address and port");
            }
            bail!("invalid endpoint {s:?}: expected address:port or [IPv6 address]:port")
        }
        _ => bail!("invalid endpoint {s:?}: expected address:port or [IPv6 address]:port"),
    }
}

/// One line out of toml's multi-line message: "line 3: unknown field ...".
fn toml_error(text: &str, e: &toml::de::Error) -> anyhow::Error {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            anyhow!("line {line}: {msg}")
        }
        None => anyhow!("{msg}"),
    }
}

fn read_limited(path: &Path, limit: u64) -> Result<String> {
    let file = std::fs::File::open(path)?;
    let mut text = String::new();
    file.take(limit + 1).read_to_string(&mut text)?;
    if text.len() as u64 > limit {
        bail!("larger than {limit} bytes");
    }
    Ok(text)
}

/// Reads a base64 key file (`wg genkey` output), refusing one that others
/// than its owner may read or write: a key readable by others is no longer
/// private, and we would rather stop than spread that mistake.
pub fn read_key_file(path: &Path) -> Result<Key> {
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("{shown}"))?;
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 {
        bail!("{shown} is accessible by group or others (mode {mode:04o}); run `chmod 600 {shown}`");
    }
    let text = read_limited(path, MAX_KEY_FILE_BYTES).with_context(|| format!("{shown}"))?;
    text.parse::<Key>().with_context(|| format!("{shown}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRIV: &str = "UAlMDnEVznZzktyVQA4JZRPYsqjrUD6k3bGKspS9k0E=";
    const PEER1: &str = "GcbKAmy+RA8n13X7BCHypTgmoU2KfpEaSlT6odWM6wc=";
    const PEER2: &str = "Kn0g+ejvs6gH1ZAIj0K6J17hVkQDZ9w0APK0tuYFUgI=";
    const PSK: &str = "W2+UTuK0qsNvvgffW1NNmncDm5Lph/3ksEYzCiPwRVg=";

    fn keys(path: &Path) -> Result<Key> {
        match path.file_name().and_then(|n| n.to_str()) {
            Some("wg0.key") => PRIV.parse(),
            Some("psk") => PSK.parse(),
            _ => bail!("{}: No such file or directory (os error 2)", path.display()),
        }
    }

    fn parse_str(text: &str) -> Result<WgFile> {
        parse(text, Path::new("/etc/warren"), &keys)
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse_str(text).unwrap_err())
    }

    #[test]
    fn full_example() {
        let f = parse_str(&format!(
            r#"
private_key_file = "/etc/warren/wg0.key"
listen_port = 51820
fwmark = 4660
address = ["10.9.0.1/24", "fd00:9::1/64"]
mtu = 1420
userspace_command = ["boringtun-cli", "--foreground"]
[[peer]]
public_key = "{PEER1}"
endpoint = "203.0.113.2:51820"
allowed_ips = ["10.9.0.2/32"]
persistent_keepalive = 25
preshared_key_file = "psk"
[[peer]]
public_key = "{PEER2}"
endpoint = "[fd00::1]:51820"
"#
        ))
        .unwrap();
        assert_eq!(f.device.private_key, PRIV.parse().unwrap());
        assert_eq!(f.device.listen_port, Some(51820));
        assert_eq!(f.device.fwmark, Some(4660));
        assert_eq!(f.addresses.len(), 2);
        assert_eq!(f.addresses[0].to_string(), "10.9.0.1/24");
        assert_eq!(f.mtu, Some(1420));
        assert_eq!(
            f.userspace_command.unwrap(),
            vec!["boringtun-cli", "--foreground"]
        );
        let p = &f.device.peers[0];
        assert_eq!(p.public_key, PEER1.parse().unwrap());
        assert_eq!(p.endpoint, Some("203.0.113.2:51820".parse().unwrap()));
        assert_eq!(p.allowed_ips, vec!["10.9.0.2/32".parse().unwrap()]);
        assert_eq!(p.persistent_keepalive, Some(25));
        assert_eq!(p.preshared_key, Some(PSK.parse().unwrap()));
        assert_eq!(
            f.device.peers[1].endpoint,
            Some("[fd00::1]:51820".parse().unwrap())
        );
        assert!(f.device.peers[1].allowed_ips.is_empty());
    }

    #[test]
    fn minimal() {
        let f = parse_str("private_key_file = \"wg0.key\"").unwrap();
        assert_eq!(f.device.listen_port, None);
        assert_eq!(f.device.fwmark, None);
        assert!(f.device.peers.is_empty() && f.addresses.is_empty());
    }

    #[test]
    fn errors_name_the_peer_and_what_is_wrong() {
        let head = "private_key_file = \"wg0.key\"\n";
        assert_eq!(
            err(&format!(
                "{head}[[peer]]\npublic_key = \"{PEER1}\"\nendpoint = \"vpn.example.com:51820\"\n"
            )),
            "peer 1 (GcbKAmy+…): invalid endpoint \"vpn.example.com:51820\": hostnames are not resolved, \
             give an IP address and port"
        );
        assert_eq!(
            err(&format!(
                "{head}[[peer]]\npublic_key = \"{PEER1}\"\n[[peer]]\npublic_key = \"{PEER2}\"\nallowed_ips = [\"10.0.0.0/33\"]\n"
            )),
            "peer 2 (Kn0g+ejv…): invalid allowed IP \"10.0.0.0/33\": invalid prefix length /33 for 10.0.0.0: at most /32"
        );
        assert!(
            err(&format!("{head}[[peer]]\npublic_key = \"xyz\"\n"))
                .starts_with("peer 1: public_key \"xyz\": invalid key")
        );
        assert!(
            err(&format!(
                "{head}[[peer]]\npublic_key = \"{PEER1}\"\npreshared_key_file = \"nope\"\n"
            ))
            .starts_with("peer 1 (GcbKAmy+…): preshared_key_file: /etc/warren/nope: No such file")
        );
        assert_eq!(
            err(&format!(
                "{head}[[peer]]\npublic_key = \"{PEER1}\"\nallowed_ips = [\"10.0.0.0/8\"]\n\
                 [[peer]]\npublic_key = \"{PEER2}\"\nallowed_ips = [\"10.0.0.0/8\"]\n"
            )),
            "peer 2 (Kn0g+ejv…): allowed IP 10.0.0.0/8 is also peer 1 (GcbKAmy+…)'s"
        );
        assert!(
            err(&format!(
                "{head}[[peer]]\npublic_key = \"{PEER1}\"\nendpoint = \"fd00::1:51820\"\n"
            ))
            .contains("IPv6 endpoints are written [address]:port")
        );
    }

    #[test]
    fn unknown_and_missing_fields_are_one_line_errors() {
        let e = err("private_key_file = \"wg0.key\"\nlisten_prot = 1\n");
        assert!(e.starts_with("line 2: unknown field `listen_prot`"), "{e}");
        assert!(!e.contains('\n'));
        let e = err(&format!(
            "private_key_file = \"wg0.key\"\n[[peer]]\npublic_key = \"{PEER1}\"\nkeepalive = 5\n"
        ));
        assert!(e.contains("unknown field `keepalive`"), "{e}");
        assert!(err("listen_port = 1\n").contains("missing field `private_key_file`"));
        assert!(err("private_key_file = \"wg0.key\"\nlisten_port = 70000\n").starts_with("line 2:"));
        assert!(
            err("private_key_file = \"other.key\"\n").starts_with("private_key_file: /etc/warren/other.key")
        );
    }

    #[test]
    fn addresses_and_mtu_are_checked() {
        let head = "private_key_file = \"wg0.key\"\n";
        assert!(err(&format!("{head}address = [\"10.0.0.1/40\"]")).starts_with("address: invalid address"));
        assert!(err(&format!("{head}address = [\"nope\"]")).starts_with("address: invalid address"));
        assert!(err(&format!("{head}mtu = 100")).starts_with("mtu 100 out of range"));
        assert!(err(&format!("{head}userspace_command = []")).starts_with("userspace_command is empty"));
        let f = parse_str(&format!("{head}address = [\"10.0.0.1\", \"10.0.0.1/32\"]")).unwrap();
        assert_eq!(f.addresses.len(), 1, "duplicates collapse");
    }

    #[test]
    fn key_files_must_be_private() {
        let dir = std::env::temp_dir().join(format!("warren-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("k");
        std::fs::write(&path, format!("{PRIV}\n")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", read_key_file(&path).unwrap_err());
        assert!(
            e.ends_with(&format!(
                "is accessible by group or others (mode 0644); run `chmod 600 {}`",
                path.display()
            )),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_key_file(&path).unwrap(), PRIV.parse().unwrap());
        std::fs::write(&path, "garbage\n").unwrap();
        assert!(format!("{:#}", read_key_file(&path).unwrap_err()).contains("invalid key"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `warren bugreport`: one text file to attach to an issue. Sections, each
//! under a `=== name ===` line: version, system, status, netcheck, wireguard,
//! addresses and routes, log. Every section passes through [`Redactor`]: no
//! private key, no join token, public keys shortened. A section that cannot
//! be gathered says why instead, so a report of a broken node is still whole.

mod redact;

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use anyhow::{Context, Result};
use clap::Args;

use crate::agent::api::{self, DEFAULT_SOCKET, Request, Response};
use crate::wg::select::{self, BackendChoice};
use redact::Redactor;

/// How many log lines the report keeps.
const LOG_LINES: usize = 200;
/// The agent's systemd unit (systemd/warren.service).
const AGENT_UNIT: &str = "warren";
/// Where the shipped unit reads the join token (systemd/warren.service).
const DEFAULT_JOIN_FILE: &str = "/etc/warren/join-token";
/// What `warren up` writes its agent's output to, in the state directory.
const UP_LOG_FILE: &str = "agent.log";

#[derive(Args, Debug)]
pub struct BugreportArgs {
    /// Where to write the report (mode 0600); `-` is stdout. Default:
    /// warren-bugreport-UNIXTIME.txt in the current directory.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// The agent's control socket.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The agent's state directory: its secrets are kept out of the report,
    /// and its agent.log (from `warren up`) is the log when there is no journal.
    #[arg(long, default_value = "/var/lib/warren")]
    pub state_dir: PathBuf,
    /// WireGuard interface (default: the agent's, else warren0).
    #[arg(long)]
    pub interface: Option<String>,
    /// WireGuard implementation (default: $WARREN_WG_BACKEND, else auto).
    #[arg(long)]
    pub backend: Option<BackendChoice>,
    /// Take the last log lines from FILE instead of the journal.
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// A join token file whose token is kept out of the report (tokens are
    /// also recognised by their form).
    #[arg(long, value_name = "FILE", default_value = DEFAULT_JOIN_FILE)]
    pub join_file: PathBuf,
    /// Config file whose [agent] section says where the agent keeps its
    /// socket, state, interface and token file. Default:
    /// /etc/warren/warren.toml, when it exists and this user may read it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

pub fn run(a: BugreportArgs) -> Result<()> {
    let redactor = redactor(&a);
    let text = redactor.apply(&report(&a));
    match &a.output {
        Some(p) if p.as_os_str() == "-" => super::out::write(&text),
        Some(p) => write_private(p, &text, false),
        None => {
            let unix = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let path = PathBuf::from(format!("warren-bugreport-{unix}.txt"));
            write_private(&path, &text, true)?;
            super::out::outln!("wrote {} (check it before attaching it)", path.display())
        }
    }
}

/// Writes `text` to `path`, readable by its owner only, also when it
/// existed. Root writes it: a symlink planted there is refused, not followed.
fn write_private(path: &Path, text: &str, fresh: bool) -> Result<()> {
    let what = || format!("writing the bug report to {}", path.display());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .create_new(fresh)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(what)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))
        .with_context(what)?;
    f.write_all(text.as_bytes()).with_context(what)
}

/// Everything secret this node keeps: its keys and join secret (the cache),
/// server key files beside them, the token file.
fn redactor(a: &BugreportArgs) -> Redactor {
    let mut r = Redactor::default();
    // Read as plain JSON, not as the agent's type: whatever the file's
    // version, every private or secret field is kept out.
    let cache = std::fs::read(crate::agent::cache::path(&a.state_dir)).ok();
    if let Some(serde_json::Value::Object(fields)) = cache.and_then(|b| serde_json::from_slice(&b).ok()) {
        for (name, value) in &fields {
            if (name.contains("private") || name.contains("secret"))
                && let Some(v) = value.as_str()
            {
                r.secret(v);
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(&a.state_dir) {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "key")
                && let Ok(k) = std::fs::read_to_string(e.path())
            {
                r.secret(&k);
            }
        }
    }
    if let Ok(t) = std::fs::read_to_string(&a.join_file) {
        r.secret(&t);
    }
    r
}

fn section(out: &mut String, name: &str, body: &str) {
    let _ = writeln!(out, "=== {name} ===");
    out.push_str(body);
    if !body.ends_with('\n') {
        out.push('\n');
    }
    out.push('\n');
}

fn report(a: &BugreportArgs) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "warren bug report (private keys and join tokens removed, public keys shortened)\n"
    );
    section(
        &mut out,
        "version",
        &format!("warren {}", env!("CARGO_PKG_VERSION")),
    );
    section(&mut out, "system", &system());
    let status = api::request(&a.socket, &Request::Status);
    let (interface, backend) = match &status {
        Ok(Response::Status { status }) => (Some(status.interface.clone()), Some(status.backend.clone())),
        _ => (None, None),
    };
    let interface = a
        .interface
        .clone()
        .or(interface)
        .unwrap_or_else(|| "warren0".into());
    let backend_line = match (backend, BackendChoice::resolve(a.backend)) {
        (Some(b), _) => format!("agent's backend: {b}"),
        (None, Ok(c)) => format!("agent not answering; backend asked for: {c:?}").to_lowercase(),
        (None, Err(e)) => format!("agent not answering; backend: {e:#}"),
    };
    section(&mut out, "backend", &backend_line);
    section(
        &mut out,
        "status",
        &agent_json(status, |r| match r {
            Response::Status { status } => serde_json::to_string_pretty(&status).ok(),
            _ => None,
        }),
    );
    let netcheck = api::request(&a.socket, &Request::Netcheck);
    section(
        &mut out,
        "netcheck",
        &agent_json(netcheck, |r| match r {
            Response::Netcheck { report } => serde_json::to_string_pretty(&report).ok(),
            _ => None,
        }),
    );
    section(
        &mut out,
        &format!("wireguard {interface}"),
        &wireguard(&interface, a.backend),
    );
    section(
        &mut out,
        &format!("addresses and routes {interface}"),
        &routes(&interface),
    );
    let (source, lines) = log_lines(a);
    section(&mut out, &format!("log ({source})"), &lines);
    out
}

/// An agent answer as JSON, or why there is none.
fn agent_json(r: Result<Response>, json: impl FnOnce(Response) -> Option<String>) -> String {
    match r {
        Ok(r) => json(r).unwrap_or_else(|| "unexpected answer from the agent".into()),
        Err(e) => format!("not available: {e:#}"),
    }
}

fn system() -> String {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    let kernel = match (
        read("/proc/sys/kernel/osrelease"),
        read("/proc/sys/kernel/version"),
    ) {
        (Ok(r), Ok(v)) => format!("Linux {r} {v} {}", std::env::consts::ARCH),
        (Err(e), _) | (_, Err(e)) => format!("unknown ({e})"),
    };
    let os = read("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_string())
        })
        .or_else(|| read("/etc/openwrt_release").ok())
        .unwrap_or_else(|| "unknown (no /etc/os-release)".into());
    format!("kernel: {kernel}\nos: {os}\n")
}

/// The interface as WireGuard itself has it (not the agent's belief): no
/// private or preshared key is read out, public keys are shortened.
fn wireguard(ifname: &str, backend: Option<BackendChoice>) -> String {
    let state = || -> Result<(String, crate::wg::DeviceState)> {
        let choice = BackendChoice::resolve(backend)?;
        let mut b = select::backend_for_existing(choice, ifname)?
            .with_context(|| format!("no WireGuard interface {ifname:?}"))?;
        let state = b.get(ifname)?;
        Ok((b.kind().to_string(), state))
    };
    let (kind, state) = match state() {
        Ok(s) => s,
        Err(e) => return format!("not available: {e:#}"),
    };
    let now = SystemTime::now();
    let mut s = String::new();
    let key = state.public_key.map_or("(none)".into(), |k| k.short());
    let _ = writeln!(
        s,
        "backend {kind}, public key {key}, listening port {}, {} peer(s)",
        state.listen_port,
        state.peers.len()
    );
    for p in &state.peers {
        let hs = match p.last_handshake.map(|t| now.duration_since(t)) {
            None => "never".to_string(),
            Some(Ok(ago)) => format!("{} s ago", ago.as_secs()),
            Some(Err(_)) => "in the future (clock skew)".to_string(),
        };
        let ips: Vec<String> = p.allowed_ips.iter().map(|a| a.to_string()).collect();
        let _ = writeln!(
            s,
            "peer {} endpoint {} allowed {} handshake {hs} rx {} B tx {} B keepalive {}{}",
            p.public_key.short(),
            p.endpoint.map_or("-".into(), |e| e.to_string()),
            if ips.is_empty() { "-".into() } else { ips.join(",") },
            p.rx_bytes,
            p.tx_bytes,
            p.persistent_keepalive.map_or("off".into(), |k| format!("{k} s")),
            if p.preshared_key.is_some() {
                " preshared key (hidden)"
            } else {
                ""
            },
        );
    }
    s
}

/// `$ CMD` and its output (or why it failed), for each command.
fn commands(cmds: &[&[&str]]) -> String {
    let mut s = String::new();
    for c in cmds {
        let _ = writeln!(s, "$ {}", c.join(" "));
        match Command::new(c[0]).args(&c[1..]).output() {
            Ok(o) => {
                s.push_str(&String::from_utf8_lossy(&o.stdout));
                s.push_str(&String::from_utf8_lossy(&o.stderr));
                if !o.status.success() {
                    let _ = writeln!(s, "({})", o.status);
                }
            }
            Err(e) => {
                let _ = writeln!(s, "not run: {e}");
            }
        }
    }
    s
}

fn routes(ifname: &str) -> String {
    commands(&[
        &["ip", "address", "show", "dev", ifname],
        &["ip", "-4", "route", "show", "table", "all", "dev", ifname],
        &["ip", "-6", "route", "show", "table", "all", "dev", ifname],
        &["ip", "rule", "show"],
    ])
}

/// What `cmd` printed, if it ran, succeeded and printed something.
fn output_of(cmd: &str, args: &[&str]) -> Option<String> {
    let o = Command::new(cmd).args(args).output().ok()?;
    (o.status.success() && !o.stdout.is_empty()).then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_LINES)..].join("\n")
}

/// The last log lines and where they came from: --log-file, else the
/// journal of the agent's unit (systemd), else the system log with warren's
/// lines (OpenWrt's logread: procd sends the agent's stderr there), else
/// the state directory's agent.log (`warren up`), else a sentence saying
/// none of them exists.
fn log_lines(a: &BugreportArgs) -> (String, String) {
    if let Some(f) = &a.log_file {
        return (f.display().to_string(), tail_file(f));
    }
    let n = LOG_LINES.to_string();
    let journal = ["-u", AGENT_UNIT, "-n", &n, "--no-pager", "-q", "-o", "short-iso"];
    if let Some(text) = output_of("journalctl", &journal) {
        return (format!("journalctl -u {AGENT_UNIT} -n {n}"), text);
    }
    if let Some(text) = output_of("logread", &["-e", AGENT_UNIT]) {
        return (format!("logread -e {AGENT_UNIT}"), last_lines(&text));
    }
    let up_log = a.state_dir.join(UP_LOG_FILE);
    if up_log.exists() {
        return (up_log.display().to_string(), tail_file(&up_log));
    }
    (
        "none".into(),
        format!(
            "no log found: no journal lines of unit {AGENT_UNIT}, no logread lines of it, and no {}; \
             pass --log-file FILE where the agent's stderr goes",
            up_log.display()
        ),
    )
}

fn tail_file(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => last_lines(&String::from_utf8_lossy(&bytes)),
        Err(e) => format!("not available: reading {}: {e}", path.display()),
    }
}

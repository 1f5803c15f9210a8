//! `warren wg` on bad input: one line on stderr naming what is wrong, exit
//! status 1, no panic, and nothing touched. These cases fail before any
//! WireGuard interface is involved, so they run unprivileged too.

use std::path::PathBuf;
use std::process::Command;

fn warren(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(args)
        .env_remove("WARREN_WG_BACKEND")
        .output()
        .expect("running warren");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn is_root_with_net_admin() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|c| c & (1 << 12) != 0)
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dir(name: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("warren-cli-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    Dir(d)
}

fn write_private(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

const KEY: &str = "UAlMDnEVznZzktyVQA4JZRPYsqjrUD6k3bGKspS9k0E=";
const PEER1: &str = "GcbKAmy+RA8n13X7BCHypTgmoU2KfpEaSlT6odWM6wc=";
const PEER2: &str = "Kn0g+ejvs6gH1ZAIj0K6J17hVkQDZ9w0APK0tuYFUgI=";

fn assert_one_line_error(code: i32, stderr: &str, expected: &str) {
    assert_eq!(code, 1, "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr.trim_end().ends_with(expected) || stderr.contains(expected),
        "{stderr}"
    );
}

#[test]
fn invalid_interface_name() {
    let (code, err) = warren(&[
        "wg",
        "apply",
        "--interface",
        "much-too-long-name",
        "--config",
        "/nonexistent",
    ]);
    assert_one_line_error(
        code,
        &err,
        "warren: wg apply: invalid interface name \"much-too-long-name\"",
    );
    let (code, err) = warren(&["wg", "show", "a/b"]);
    assert_one_line_error(code, &err, "warren: wg show: invalid interface name \"a/b\"");
}

#[test]
fn bad_configs() {
    if !is_root_with_net_admin() {
        let (code, err) = warren(&["wg", "apply", "--interface", "wgx0", "--config", "/nonexistent"]);
        assert_one_line_error(code, &err, "warren: wg apply: needs root (CAP_NET_ADMIN)");
        return;
    }
    let d = dir("bad");
    write_private(&d.0.join("k"), &format!("{KEY}\n"));
    let cases = [
        (
            format!(
                "private_key_file = \"k\"\n[[peer]]\npublic_key = \"{PEER1}\"\nallowed_ips = [\"10.9.0.0/24\"]\n\
                 [[peer]]\npublic_key = \"{PEER2}\"\nallowed_ips = [\"10.9.0.0/24\"]\n"
            ),
            "peer 2 (Kn0g+ejv…): allowed IP 10.9.0.0/24 is also peer 1 (GcbKAmy+…)'s",
        ),
        (
            "private_key_file = \"k\"\n[[peer]]\npublic_key = \"AAAA\"\n".to_string(),
            "peer 1: public_key \"AAAA\": invalid key: expected 44 base64 characters (32 bytes), got 4 characters",
        ),
        (
            format!(
                "private_key_file = \"k\"\n[[peer]]\npublic_key = \"{PEER1}\"\nendpoint = \"example.com:1\"\n"
            ),
            "hostnames are not resolved, give an IP address and port",
        ),
        (
            "private_key_file = \"k\"\nlisten_prot = 1\n".to_string(),
            "line 2: unknown field `listen_prot`",
        ),
        (
            "private_key_file = \"missing\"\n".to_string(),
            "private_key_file: ",
        ),
    ];
    for (i, (text, expected)) in cases.iter().enumerate() {
        let cfg = d.0.join(format!("c{i}.toml"));
        std::fs::write(&cfg, text).unwrap();
        let (code, err) = warren(&[
            "wg",
            "apply",
            "--interface",
            "wgx0",
            "--config",
            cfg.to_str().unwrap(),
        ]);
        assert_one_line_error(code, &err, expected);
        assert!(
            err.starts_with(&format!("warren: wg apply: {}: ", cfg.display())),
            "{err}"
        );
    }
    // No interface was created by any of them.
    assert!(!std::path::Path::new("/var/run/wireguard/wgx0.sock").exists());
}

#[test]
fn world_readable_private_key_is_refused() {
    if !is_root_with_net_admin() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = dir("mode");
    let key = d.0.join("k");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = d.0.join("c.toml");
    std::fs::write(&cfg, "private_key_file = \"k\"\n").unwrap();
    let (code, err) = warren(&[
        "wg",
        "apply",
        "--interface",
        "wgx1",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    assert_one_line_error(
        code,
        &err,
        "is accessible by group or others (mode 0644); run `chmod 600",
    );
}

#[test]
fn unknown_interface() {
    if !is_root_with_net_admin() {
        return;
    }
    let (code, err) = warren(&["wg", "show", "--backend", "userspace", "wgnosuch0"]);
    assert_one_line_error(
        code,
        &err,
        "warren: wg show: no WireGuard interface \"wgnosuch0\"",
    );
    let (code, err) = warren(&["wg", "delete", "--backend", "userspace", "wgnosuch0"]);
    assert_one_line_error(
        code,
        &err,
        "warren: wg delete: no WireGuard interface \"wgnosuch0\"",
    );
}

#[test]
fn agent_refuses_port_zero_and_server_refuses_a_malformed_relay_or_wgstun() {
    let d = dir("agent-port");
    let state = d.0.join("state");
    let (code, err) = warren(&[
        "agent",
        "--port",
        "0",
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        d.0.join("s").to_str().unwrap(),
    ]);
    assert_one_line_error(code, &err, "the agent needs a fixed port (e.g. --port 51820)");
    assert!(!state.exists(), "a refused agent created its state directory");
    for (relay, why) in [
        ("203.0.113.7:7778", "expected KEY@HOST:PORT"),
        ("nokey@203.0.113.7:7778", "bad relay key"),
        (&format!("{PEER1}@203.0.113.7"), "expected KEY@HOST:PORT"),
    ] {
        let (code, err) = warren(&[
            "server",
            "--state-dir",
            d.0.join("srv").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--relay",
            relay,
        ]);
        assert_one_line_error(code, &err, why);
        assert!(err.contains(&format!("--relay {relay:?}")), "{err}");
    }
    for (wgstun, why) in [
        ("203.0.113.7:3479", "expected KEY@HOST:PORT"),
        ("nokey@203.0.113.7:3479", "bad WG-STUN key"),
        (&format!("{PEER1}@203.0.113.7"), "expected KEY@HOST:PORT"),
    ] {
        let (code, err) = warren(&[
            "server",
            "--state-dir",
            d.0.join("srv").to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--wgstun",
            wgstun,
        ]);
        assert_one_line_error(code, &err, why);
        assert!(err.contains(&format!("--wgstun {wgstun:?}")), "{err}");
    }
    assert!(
        !d.0.join("srv").exists(),
        "a refused server created its state directory"
    );
}

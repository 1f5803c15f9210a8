use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use clap::{ArgMatches, CommandFactory};

use super::apply;
use crate::cli::Cli;

/// A config file of `text` with `mode`, removed when dropped.
struct File(PathBuf);

impl File {
    fn new(text: &str, mode: u32) -> File {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("warren-config-{}-{n}.toml", std::process::id()));
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        File(p)
    }
    fn path(&self) -> String {
        self.0.display().to_string()
    }
}

impl Drop for File {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn argv(words: &[&str]) -> Vec<OsString> {
    std::iter::once("warren")
        .chain(words.iter().copied())
        .map(OsString::from)
        .collect()
}

/// The subcommand's matches after the file at `file` is applied to `words`.
fn parse(file: &File, words: &[&str]) -> ArgMatches {
    let mut words = words.to_vec();
    let path = file.path();
    words.extend(["--config", path.as_str()]);
    let full = apply(Cli::command(), argv(&words)).unwrap();
    let m = Cli::command().try_get_matches_from(full).unwrap();
    m.subcommand().unwrap().1.clone()
}

fn apply_err(text: &str, words: &[&str]) -> String {
    let file = File::new(text, 0o600);
    let mut words = words.to_vec();
    let path = file.path();
    words.extend(["--config", path.as_str()]);
    let e = apply(Cli::command(), argv(&words)).unwrap_err();
    format!("{e:#}").replace(&path, "FILE")
}

fn one<T: Clone + Send + Sync + 'static>(m: &ArgMatches, id: &str) -> T {
    m.get_one::<T>(id).unwrap().clone()
}

#[test]
fn keys_are_flags_and_the_command_line_wins() {
    let file = File::new(
        "[agent]\nport = 5000\nstate_dir = \"/srv/warren\"\ninterface = \"mesh0\"\n\
         portmap = false\nlog_level = \"warn\"\njoin_token_file = \"/etc/warren/join-token\"\n\
         cache_dir = \"/tmp/warren\"\n",
        0o600,
    );
    let m = parse(&file, &["agent"]);
    assert_eq!(one::<u16>(&m, "port"), 5000);
    assert_eq!(one::<PathBuf>(&m, "state_dir"), PathBuf::from("/srv/warren"));
    assert_eq!(one::<PathBuf>(&m, "cache_dir"), PathBuf::from("/tmp/warren"));
    assert_eq!(one::<String>(&m, "interface"), "mesh0");
    assert!(one::<bool>(&m, "no_portmap"));
    assert_eq!(
        one::<crate::logline::Level>(&m, "log_level"),
        crate::logline::Level::Warn
    );
    assert_eq!(
        one::<PathBuf>(&m, "join_file"),
        PathBuf::from("/etc/warren/join-token")
    );

    // `up` reads [agent] too; its flags win, and --join drops the file's
    // join_token_file instead of conflicting with it.
    let m = parse(&file, &["up", "--port", "6000", "--join", "TOKEN"]);
    assert_eq!(one::<u16>(&m, "port"), 6000);
    assert_eq!(one::<String>(&m, "join"), "TOKEN");
    assert!(m.get_one::<PathBuf>("join_file").is_none());
    assert_eq!(one::<String>(&m, "interface"), "mesh0");
}

#[test]
fn route_keys_are_the_route_flags_and_are_checked() {
    let file = File::new(
        "[agent]\nadvertise_routes = \"192.168.1.0/24, 10.0.0.0/8\"\nadvertise_exit = true\n\
         snat_routes = false\nexit_node = \"gw\"\n",
        0o600,
    );
    for cmd in ["agent", "up"] {
        let m = parse(&file, &[cmd]);
        let routes = one::<crate::cli::agent_routes::RouteList>(&m, "advertise_routes").0;
        let want: Vec<crate::wg::AllowedIp> =
            vec!["192.168.1.0/24".parse().unwrap(), "10.0.0.0/8".parse().unwrap()];
        assert_eq!(routes, want, "{cmd}");
        assert!(one::<bool>(&m, "advertise_exit") && one::<bool>(&m, "no_snat_routes"));
        assert_eq!(one::<String>(&m, "exit_node"), "gw");
    }
    let err = apply_err("[agent]\nadvertise_routes = \"0.0.0.0/0\"\n", &["agent"]);
    assert!(
        err.starts_with("FILE: [agent] advertise_routes: invalid value \"0.0.0.0/0\"")
            && err.contains("--advertise-exit")
            && !err.contains('\n'),
        "{err}"
    );
}

#[test]
fn lists_and_negated_switches_of_the_servers() {
    let file = File::new(
        "[server]\nadvertise = [\"203.0.113.5:7777\", \"[2001:db8::5]:7777\"]\nrelay = false\n\
         stun = false\nlisten = \"0.0.0.0:7000\"\n\
         [relay]\nmax_clients = 10\n[wgstun]\nstun = false\nstats_interval = 30\n",
        0o600,
    );
    let m = parse(&file, &["server"]);
    let adv: Vec<String> = m.get_many::<String>("advertise").unwrap().cloned().collect();
    assert_eq!(adv, ["203.0.113.5:7777", "[2001:db8::5]:7777"]);
    assert!(one::<bool>(&m, "no_relay") && one::<bool>(&m, "no_stun") && !one::<bool>(&m, "no_wgstun"));
    assert_eq!(one::<std::net::SocketAddr>(&m, "listen").port(), 7000);
    // A list on the command line replaces the file's, it does not add to it.
    let m = parse(&file, &["server", "--advertise", "198.51.100.1:7777"]);
    let adv: Vec<String> = m.get_many::<String>("advertise").unwrap().cloned().collect();
    assert_eq!(adv, ["198.51.100.1:7777"]);
    // `server`'s admin subcommands read [server] too (its state_dir finds the socket).
    let m = parse(&file, &["server", "nodes"]);
    assert!(one::<bool>(&m, "no_relay"));

    let m = parse(&file, &["relay"]);
    assert_eq!(one::<usize>(&m, "max_clients"), 10);
    let m = parse(&file, &["wgstun"]);
    assert!(one::<bool>(&m, "no_stun"));
    assert_eq!(one::<u64>(&m, "stats_interval"), 30);
}

#[test]
fn a_bad_key_or_value_is_one_line_naming_file_and_key() {
    let cases = [
        ("[agent]\nprot = 1\n", "FILE: [agent] unknown key \"prot\""),
        (
            "[agent]\nport = \"x\"\n",
            "FILE: [agent] port: invalid value \"x\": invalid digit found in string",
        ),
        (
            "[agent]\nbackend = \"bsd\"\n",
            "FILE: [agent] backend: invalid value \"bsd\": expected one of auto, kernel, userspace",
        ),
        (
            "[agent]\nportmap = \"off\"\n",
            "FILE: [agent] portmap: expected true or false",
        ),
        (
            "[agent]\nport = [1, 2]\n",
            "FILE: [agent] port: expected one value, not a list",
        ),
        (
            "[agent]\njoin = \"T\"\n",
            "FILE: [agent] join: a join token is never a config value: put it in a file (mode 0600) and set join_token_file",
        ),
        (
            "[agent]\nportmap = false\nno_portmap = true\n",
            "FILE: [agent] portmap: the same setting as no_portmap",
        ),
        (
            "[agnet]\n",
            "FILE: unknown section [agnet] (expected [agent], [server], [relay], [wgstun])",
        ),
        (
            "[agent]\nport = \n",
            "FILE: line 2: string values must be quoted, expected literal string",
        ),
    ];
    for (text, want) in cases {
        let got = apply_err(text, &["agent"]);
        assert!(!got.contains('\n'), "{got}");
        // toml's own wording may change between versions; the prefix is ours.
        if want.contains("line 2") {
            assert!(got.starts_with("FILE: line 2: "), "{text:?}: {got}");
        } else {
            assert_eq!(got, want, "{text:?}");
        }
    }
    // Only the section of the subcommand run is checked against its flags.
    let file = File::new("[agent]\nport = 1\n[relay]\nprot = 2\n", 0o600);
    assert_eq!(one::<u16>(&parse(&file, &["agent"]), "port"), 1);
}

#[test]
fn a_missing_given_file_and_a_file_others_may_write_are_refused() {
    let e = apply(
        Cli::command(),
        argv(&["agent", "--config", "/nonexistent/warren.toml"]),
    )
    .unwrap_err();
    assert_eq!(
        format!("{e:#}"),
        "/nonexistent/warren.toml: No such file or directory (os error 2)"
    );
    let file = File::new("[agent]\n", 0o622);
    let path = file.path();
    let e = apply(Cli::command(), argv(&["agent", "--config", &path])).unwrap_err();
    assert!(
        format!("{e:#}").contains("writable by other users (mode 0622)"),
        "{e:#}"
    );
    // A missing default file is no config at all.
    assert!(
        super::file::load_section("/nonexistent/warren.toml".as_ref(), "agent", true)
            .unwrap()
            .is_none()
    );
}

#[test]
fn other_commands_and_bad_command_lines_pass_through() {
    for words in [&["status"][..], &["agent", "--bogus"], &[]] {
        assert_eq!(apply(Cli::command(), argv(words)).unwrap(), argv(words));
    }
}

/// The shipped example, as it is and with every commented key set, is a
/// valid file for each daemon (a key another build lacks is left out).
#[test]
fn the_shipped_example_is_valid() {
    let text = include_str!("../../packaging/warren.toml");
    let shipped = File::new(text, 0o600);
    let m = parse(&shipped, &["agent"]);
    assert_eq!(
        one::<PathBuf>(&m, "join_file"),
        PathBuf::from("/etc/warren/join-token")
    );
    let has = |sub: &str, long: &str| {
        Cli::command()
            .find_subcommand(sub)
            .is_some_and(|c| c.get_arguments().any(|a| a.get_long() == Some(long)))
    };
    let mut section = String::new();
    let mut all = String::new();
    for line in text.lines() {
        if let Some(s) = line.strip_prefix('[') {
            section = s.trim_end_matches(']').to_string();
        }
        let line = match line.strip_prefix("# ") {
            Some(kv) if kv.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => kv,
            _ => line,
        };
        let key = line.split(" = ").next().unwrap_or_default();
        if key == "metrics_listen" && !has(&section, "metrics-listen") {
            continue;
        }
        all.push_str(line);
        all.push('\n');
    }
    let all = File::new(&all, 0o600);
    let m = parse(&all, &["agent"]);
    assert_eq!(one::<String>(&m, "interface"), "warren0");
    assert!(!one::<bool>(&m, "no_portmap"));
    assert_eq!(one::<PathBuf>(&m, "cache_dir"), PathBuf::from("/var/lib/warren"));
    let m = parse(&all, &["server"]);
    assert!(one::<bool>(&m, "no_relay") && one::<bool>(&m, "no_wgstun"));
    assert_eq!(one::<usize>(&parse(&all, &["relay"]), "max_clients"), 700);
    assert!(one::<bool>(&parse(&all, &["wgstun"]), "no_stun"));
}

#[test]
fn commands_talking_to_the_agent_take_where_it_is_from_its_section() {
    let file = File::new(
        "[agent]\nsocket = \"/run/mesh/warren.sock\"\nstate_dir = \"/srv/warren\"\n\
         interface = \"mesh0\"\nport = 5000\nportmap = false\njoin_token_file = \"/srv/token\"\n",
        0o600,
    );
    for cmd in ["status", "down", "netcheck", "rotate-key"] {
        let m = parse(&file, &[cmd]);
        assert_eq!(
            one::<PathBuf>(&m, "socket"),
            PathBuf::from("/run/mesh/warren.sock"),
            "{cmd}"
        );
    }
    let m = parse(&file, &["ping", "nas"]);
    assert_eq!(
        one::<PathBuf>(&m, "socket"),
        PathBuf::from("/run/mesh/warren.sock")
    );
    let m = parse(&file, &["bugreport"]);
    assert_eq!(one::<PathBuf>(&m, "state_dir"), PathBuf::from("/srv/warren"));
    assert_eq!(one::<String>(&m, "interface"), "mesh0");
    assert_eq!(one::<PathBuf>(&m, "join_file"), PathBuf::from("/srv/token"));
    // The command line still wins.
    let m = parse(&file, &["status", "--socket", "/tmp/s"]);
    assert_eq!(one::<PathBuf>(&m, "socket"), PathBuf::from("/tmp/s"));
    // A bad value of a key the command uses is still an error naming it.
    let e = apply_err("[agent]\nbackend = \"steam\"\n", &["bugreport"]);
    assert!(e.starts_with("FILE: [agent] backend: invalid value"), "{e}");
}

//! `warren server` as a process: `--log-level` leaves out the less severe
//! lines, and on the journal (JOURNAL_STREAM naming its stderr) lines carry
//! the sd-daemon priority prefix instead of a timestamp.

mod common;
use common::TempDir;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: the CPU is shared; the server is up in milliseconds.
const DEADLINE: Duration = Duration::from_secs(20);

enum Journal {
    /// No JOURNAL_STREAM.
    No,
    /// JOURNAL_STREAM names the stderr file.
    Yes,
    /// JOURNAL_STREAM names another stream (stderr was redirected).
    Elsewhere,
}

/// Runs a coordinator (no relay, no WG-STUN) until its admin socket is up,
/// stops it, and returns its stderr. Its config file is readable by others,
/// which it warns about: a warning line besides the info lines.
fn server_lines(extra: &[&str], journal: Journal) -> Vec<String> {
    let dir = TempDir::new("log-test");
    let state = dir.0.join("state");
    let config = dir.0.join("warren.toml");
    std::fs::write(
        &config,
        "[server]\nlisten = \"127.0.0.1:0\"\nrelay = false\nwgstun = false\n",
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err_path = dir.0.join("stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let meta = err.metadata().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.arg("server")
        .arg("--config")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .env_remove("JOURNAL_STREAM");
    match journal {
        Journal::No => {}
        Journal::Yes => {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()));
        }
        Journal::Elsewhere => {
            cmd.env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino() + 1));
        }
    }
    let mut child = cmd.spawn().unwrap();
    // An answer on the admin socket comes from the server's loop, which
    // logs its listening line before it starts.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let nodes = Command::new(env!("CARGO_BIN_EXE_warren"))
            .args(["server", "nodes", "--state-dir"])
            .arg(&state)
            .env_remove("JOURNAL_STREAM")
            .output()
            .unwrap();
        if nodes.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not start: {}",
            read(&err_path)
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "the server exited: {}",
            read(&err_path)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    read(&err_path).lines().map(str::to_string).collect()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

const WARNING: &str = "is readable by other users (mode 0644)";
const INFO: &str = "coordinator: listening on 127.0.0.1:";

/// "2026-12-03T15:16:06.123Z " at the start of `line`, and what follows it.
fn after_timestamp(line: &str) -> Option<&str> {
    let (ts, rest) = line.split_once(' ')?;
    let b = ts.as_bytes();
    let shape = ts.len() == 24
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'.'
        && b[23] == b'Z'
        && ts.chars().filter(char::is_ascii_digit).count() == 17;
    shape.then_some(rest)
}

#[test]
fn a_log_level_leaves_out_less_severe_lines() {
    let all = server_lines(&[], Journal::No);
    let info: Vec<_> = all.iter().filter_map(|l| after_timestamp(l)).collect();
    assert_eq!(info.len(), all.len(), "every line has a timestamp: {all:?}");
    assert!(info.iter().any(|l| l.starts_with(INFO)), "{all:?}");
    assert!(
        info.iter()
            .any(|l| l.starts_with("WARN warren: ") && l.contains(WARNING)),
        "{all:?}"
    );

    let warn = server_lines(&["--log-level", "warn"], Journal::No);
    assert!(!warn.is_empty());
    for line in &warn {
        let rest = after_timestamp(line).unwrap_or_else(|| panic!("no timestamp: {line}"));
        assert!(
            rest.starts_with("WARN ") || rest.starts_with("ERROR "),
            "{warn:?}"
        );
    }
    assert!(warn.iter().any(|l| l.contains(WARNING)), "{warn:?}");

    // From the config file too, and the command line wins over it.
    let error = server_lines(&["--log-level", "error"], Journal::No);
    assert!(error.is_empty(), "{error:?}");
}

#[test]
fn on_the_journal_lines_have_priorities_and_no_timestamps() {
    let lines = server_lines(&["--log-level", "info"], Journal::Yes);
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("<6>{INFO}"))),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("<4>warren: ") && l.contains(WARNING)),
        "{lines:?}"
    );
    for l in &lines {
        let level = l.get(..3).unwrap_or_default();
        assert!(["<3>", "<4>", "<6>", "<7>"].contains(&level), "{l}");
        assert!(after_timestamp(&l[3..]).is_none(), "{l}");
    }
    // JOURNAL_STREAM inherited by a process whose stderr went elsewhere: not the journal.
    let lines = server_lines(&[], Journal::Elsewhere);
    assert!(lines.iter().all(|l| after_timestamp(l).is_some()), "{lines:?}");
}

#[test]
fn a_failed_command_ends_with_one_error_line() {
    let dir = TempDir::new("log-test");
    let err_path = dir.0.join("stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let meta = err.metadata().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["relay", "--config", "/nonexistent/warren.toml"])
        .stderr(err)
        .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
        .status()
        .unwrap();
    assert!(!status.success());
    assert_eq!(
        read(&err_path),
        "<3>warren: /nonexistent/warren.toml: No such file or directory (os error 2)\n"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .args(["relay", "--config", "/nonexistent/warren.toml"])
        .env_remove("JOURNAL_STREAM")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "warren: /nonexistent/warren.toml: No such file or directory (os error 2)\n"
    );
}

//! One config file for every daemon subcommand (`/etc/warren/warren.toml`):
//! a section per subcommand family, a key per long flag (`state_dir` is
//! `--state-dir`, `portmap = false` is `--no-portmap`, `join_token_file` is
//! the agent's `--join-file`). The section becomes flags placed before the
//! command line's own, and a flag given on the command line drops the key,
//! so the command line wins and clap checks everything as for flags.

mod file;
mod flags;

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{Result, anyhow};
use clap::parser::ValueSource;
use clap::{ArgMatches, Command};

/// Read when `--config` is not given; its absence is fine then.
pub const DEFAULT_PATH: &str = "/etc/warren/warren.toml";
/// The id of the `--config` argument on each daemon subcommand.
pub const CONFIG_ARG: &str = "config";

/// Who reads a section.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reader {
    /// The daemon it configures: every key must be one of its flags.
    Daemon,
    /// A command talking to that daemon (`warren status`): it takes the keys
    /// it has flags for (where the socket and state are) and leaves the
    /// daemon's own to the daemon; a default file it may not read (root's
    /// 0600 file, read by a user) is as good as none.
    Client,
}

/// The section configuring each subcommand, and how it reads it.
fn section_for(subcommand: &str) -> Option<(&'static str, Reader)> {
    match subcommand {
        "agent" | "up" => Some(("agent", Reader::Daemon)),
        "down" | "status" | "ping" | "netcheck" | "rotate-key" | "bugreport" => {
            Some(("agent", Reader::Client))
        }
        "server" => Some(("server", Reader::Daemon)),
        "relay" => Some(("relay", Reader::Daemon)),
        "wgstun" => Some(("wgstun", Reader::Daemon)),
        _ => None,
    }
}

/// `argv` with the config file's section for its subcommand put in as
/// flags. A command line clap rejects is handed back as it is, for clap
/// to report when it parses it.
pub fn apply(cmd: Command, argv: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut cmd = cmd;
    cmd.build();
    let Ok(matches) = cmd.clone().try_get_matches_from(&argv) else {
        return Ok(argv);
    };
    let Some((sub, sub_matches)) = matches.subcommand() else {
        return Ok(argv);
    };
    let Some((section, reader)) = section_for(sub) else {
        return Ok(argv);
    };
    let Some(sub_cmd) = cmd.find_subcommand(sub) else {
        return Ok(argv);
    };
    let explicit = sub_matches
        .try_get_one::<PathBuf>(CONFIG_ARG)
        .ok()
        .flatten()
        .cloned();
    let path = explicit.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_PATH));
    let loaded = file::load_section(&path, section, explicit.is_none());
    let table = match loaded {
        Ok(Some(table)) => table,
        Ok(None) => return Ok(argv),
        Err(e) if reader == Reader::Client && explicit.is_none() && file::is_permission_denied(&e) => {
            return Ok(argv);
        }
        Err(e) => return Err(e),
    };
    let table = match reader {
        Reader::Daemon => table,
        Reader::Client => flags::known_keys(sub_cmd, table),
    };
    let mut given = HashSet::new();
    given_on_command_line(sub_cmd, sub_matches, &mut given);
    let flags = flags::section_flags(sub_cmd, section, &table, &given)
        .map_err(|e| anyhow!("{}: {e}", path.display()))?;
    // Right after the subcommand's name: warren has no options before it.
    let names: Vec<&str> = std::iter::once(sub_cmd.get_name())
        .chain(sub_cmd.get_all_aliases())
        .collect();
    let at = argv
        .iter()
        .skip(1)
        .position(|a| a.to_str().is_some_and(|a| names.contains(&a)))
        .map(|i| i + 2)
        .ok_or_else(|| {
            anyhow!(
                "{}: cannot find the subcommand {sub} in the command line",
                path.display()
            )
        })?;
    let mut out = argv;
    out.splice(at..at, flags);
    Ok(out)
}

/// Ids of the arguments given on the command line, also after a nested
/// subcommand (`warren server invite --state-dir DIR`).
fn given_on_command_line(cmd: &Command, m: &ArgMatches, given: &mut HashSet<String>) {
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if m.value_source(id) == Some(ValueSource::CommandLine) {
            given.insert(id.to_string());
        }
    }
    if let Some((name, nested)) = m.subcommand()
        && let Some(nested_cmd) = cmd.find_subcommand(name)
    {
        given_on_command_line(nested_cmd, nested, given);
    }
}

#[cfg(test)]
mod tests;

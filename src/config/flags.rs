//! A config section as command-line flags. A key is a long flag of the
//! subcommand with `-` as `_`, checked against the subcommand's clap
//! definition, so every flag anyone adds is a key with no more work here.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;

use clap::builder::ValueRange;
use clap::error::{ContextKind, ContextValue};
use clap::{Arg, ArgAction, Command};

/// The key naming the agent's `--join-file`: the token is read from a file,
/// never written into the config file itself.
const JOIN_TOKEN_FILE_KEY: &str = "join_token_file";
const JOIN_FILE_FLAG: &str = "join-file";

/// Keys that are flags but make no sense in the file, and why.
const REFUSED: &[(&str, &str)] = &[
    (
        "join",
        "a join token is never a config value: put it in a file (mode 0600) and set join_token_file",
    ),
    ("config", "a config file cannot name another"),
    ("help", "not a setting"),
    ("version", "not a setting"),
];

/// The flags `section` stands for, for the subcommand `cmd`. `given`: ids of
/// the arguments given on the command line; a key for one of those (or for
/// one that conflicts with one of those) is left out, as the command line
/// wins. Errors are "[agent] port: invalid value ...", for the caller to
/// prefix with the file.
pub fn section_flags(
    cmd: &Command,
    section_name: &str,
    section: &toml::Table,
    given: &HashSet<String>,
) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (key, value) in section {
        let err = |msg: String| format!("[{section_name}] {msg}");
        if let Some((_, why)) = REFUSED.iter().find(|(k, _)| k == key) {
            return Err(err(format!("{key}: {why}")));
        }
        let Some((arg, values)) = resolve(cmd, key, value).map_err(err)? else {
            continue;
        };
        // `no_X = true` and `X = false`, or join_file and join_token_file.
        if let Some(first) = seen.insert(arg.get_id().to_string(), key) {
            return Err(err(format!("{key}: the same setting as {first}")));
        }
        let id = arg.get_id().as_str();
        let overridden = given.contains(id) || conflicts_with_given(cmd, arg, given);
        if overridden {
            continue;
        }
        let long = arg.get_long().expect("resolve finds long flags only");
        match values {
            None => out.push(OsString::from(format!("--{long}"))),
            Some(values) => {
                for v in values {
                    check_value(arg, &v).map_err(|why| err(format!("{key}: invalid value {v:?}: {why}")))?;
                    out.push(OsString::from(format!("--{long}")));
                    out.push(OsString::from(v));
                }
            }
        }
    }
    Ok(out)
}

/// The keys of `section` that are flags of `cmd` (also as `X = false` for
/// `--no-X`), for a command that reads another's section.
pub fn known_keys(cmd: &Command, section: toml::Table) -> toml::Table {
    section
        .into_iter()
        .filter(|(key, _)| {
            let flag = if key == JOIN_TOKEN_FILE_KEY {
                JOIN_FILE_FLAG.to_string()
            } else {
                key.replace('_', "-")
            };
            cmd.get_arguments().any(|a| {
                !a.is_positional()
                    && (a.get_long() == Some(flag.as_str()) || a.get_long() == Some(&format!("no-{flag}")))
            })
        })
        .collect()
}

/// Whether `arg` conflicts with one given on the command line (clap's
/// conflicts are declared on one side, so look at both).
fn conflicts_with_given(cmd: &Command, arg: &Arg, given: &HashSet<String>) -> bool {
    let id = arg.get_id();
    cmd.get_arguments()
        .filter(|g| given.contains(g.get_id().as_str()))
        .any(|g| {
            cmd.get_arg_conflicts_with(arg)
                .iter()
                .any(|c| c.get_id() == g.get_id())
                || cmd.get_arg_conflicts_with(g).iter().any(|c| c.get_id() == id)
        })
}

/// The argument `key` sets and its values (`None`: a flag without value),
/// or `None` when the value is the default of a flag (`portmap = true`).
#[allow(clippy::type_complexity)]
fn resolve<'c>(
    cmd: &'c Command,
    key: &str,
    value: &toml::Value,
) -> Result<Option<(&'c Arg, Option<Vec<String>>)>, String> {
    let flag = if key == JOIN_TOKEN_FILE_KEY {
        JOIN_FILE_FLAG.to_string()
    } else {
        key.replace('_', "-")
    };
    let find = |long: &str| {
        cmd.get_arguments()
            .find(|a| a.get_long() == Some(long) && !a.is_positional())
    };
    let unknown = || format!("unknown key {key:?}");
    if let toml::Value::Boolean(on) = value {
        // `X = false` is `--no-X`; `X = true` is `--X` for a plain switch.
        if let Some(a) = find(&flag).filter(|a| is_switch(a)) {
            return Ok(on.then_some((a, None)));
        }
        if let Some(a) = find(&format!("no-{flag}")).filter(|a| is_switch(a)) {
            return Ok((!on).then_some((a, None)));
        }
        // A key that takes a value (`--something true`) goes on below.
    }
    let Some(arg) = find(&flag).filter(|a| !a.is_hide_set()) else {
        if find(&format!("no-{flag}")).is_some_and(is_switch) {
            return Err(format!("{key}: expected true or false"));
        }
        return Err(unknown());
    };
    if is_switch(arg) {
        return Err(format!("{key}: expected true or false"));
    }
    let many = matches!(arg.get_action(), ArgAction::Append);
    let values = match value {
        toml::Value::Array(items) if many => {
            items.iter().map(|v| scalar(key, v)).collect::<Result<_, _>>()?
        }
        toml::Value::Array(_) => return Err(format!("{key}: expected one value, not a list")),
        v => vec![scalar(key, v)?],
    };
    Ok(Some((arg, Some(values))))
}

fn is_switch(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse)
        || arg.get_num_args() == Some(ValueRange::EMPTY)
}

fn scalar(key: &str, v: &toml::Value) -> Result<String, String> {
    match v {
        toml::Value::String(s) => Ok(s.clone()),
        toml::Value::Integer(i) => Ok(i.to_string()),
        toml::Value::Float(f) => Ok(f.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(d) => Ok(d.to_string()),
        toml::Value::Array(_) => Err(format!("{key}: expected a value, not a list of lists")),
        toml::Value::Table(_) => Err(format!("{key}: expected a value, not a table")),
    }
}

/// Parses `value` as `arg` would on the command line, for an error that
/// names the key (clap's would name the flag and not the file).
fn check_value(arg: &Arg, value: &str) -> Result<(), String> {
    let probe = Arg::new("value")
        .long("value")
        .action(ArgAction::Set)
        .value_parser(arg.get_value_parser().clone());
    let probe = Command::new("config").no_binary_name(true).arg(probe);
    let Err(e) = probe.try_get_matches_from(["--value", value]) else {
        return Ok(());
    };
    if let Some(source) = std::error::Error::source(&e) {
        return Err(source.to_string());
    }
    if let Some(ContextValue::Strings(valid)) = e.get(ContextKind::ValidValue) {
        return Err(format!("expected one of {}", valid.join(", ")));
    }
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    Err(first.trim_start_matches("error: ").to_string())
}

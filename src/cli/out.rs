//! Writing command output to stdout. A reader that stops early
//! (`warren server nodes | head -1`) closes the pipe: that ends the command
//! quietly instead of panicking as `println!` would.
//!
//! Read commands given `--json` print one JSON document on stdout, and so do
//! their errors: `{"error": "one line"}`, with the exit code the text error
//! has. [`json_errors`] is the one place that decides this for every command.

use std::fmt;
use std::io::{ErrorKind, Write};

use anyhow::{Context, Result};
use serde::Serialize;

/// The reader of our stdout went away; `main` exits quietly on it.
#[derive(Debug)]
pub struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Writes `text` to stdout and flushes it.
pub fn write(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        r => r.context("writing to stdout"),
    }
}

/// Whether `e` means only that stdout's reader went away.
pub fn is_stdout_closed(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<StdoutClosed>())
}

/// A command's error already printed on stdout as JSON: `main` only sets
/// the exit code.
#[derive(Debug)]
pub struct ReportedAsJson;

impl fmt::Display for ReportedAsJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("error reported on stdout as JSON")
    }
}

impl std::error::Error for ReportedAsJson {}

/// Whether `e` was already printed on stdout as JSON.
pub fn is_reported_as_json(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<ReportedAsJson>())
}

/// `{"error": "..."}`: the outermost context first, then each cause, one line.
pub fn error_json(message: &str) -> String {
    let one_line = message.lines().map(str::trim).collect::<Vec<_>>().join(" ");
    serde_json::json!({ "error": one_line }).to_string()
}

/// Runs a command. With `json`, a failure is printed on stdout as
/// [`error_json`] and comes back as [`ReportedAsJson`]; without, as it was.
pub fn json_errors(json: bool, command: impl FnOnce() -> Result<()>) -> Result<()> {
    json_errors_to(json, command, write)
}

fn json_errors_to(
    json: bool,
    command: impl FnOnce() -> Result<()>,
    print: impl FnOnce(&str) -> Result<()>,
) -> Result<()> {
    match command() {
        Err(e) if json && !is_stdout_closed(&e) => {
            print(&format!("{}\n", error_json(&format!("{e:#}"))))?;
            Err(ReportedAsJson.into())
        }
        r => r,
    }
}

/// Prints `value` as pretty JSON, one document.
pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).context("encoding JSON")?;
    write(&format!("{text}\n"))
}

/// `println!` for command output: `outln!(...)?`.
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::out::write(&format!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_our_stdout_marker_counts_as_closed_stdout() {
        let closed = anyhow::Error::from(StdoutClosed).context("listing nodes");
        assert!(is_stdout_closed(&closed));
        // A broken pipe elsewhere (the agent's socket, a coordinator) is a real error.
        let other =
            anyhow::Error::from(std::io::Error::from(ErrorKind::BrokenPipe)).context("asking the agent");
        assert!(!is_stdout_closed(&other));
    }

    #[test]
    fn json_error_is_one_line_with_every_cause() {
        let e = anyhow::anyhow!("no such peer \"x\"\n(try warren status)").context("ping");
        let v: serde_json::Value = serde_json::from_str(&error_json(&format!("{e:#}"))).unwrap();
        assert_eq!(v["error"], "ping: no such peer \"x\" (try warren status)");
        assert_eq!(v.as_object().unwrap().len(), 1);
    }

    #[test]
    fn only_json_commands_turn_errors_into_json() {
        let mut printed = String::new();
        let failed = json_errors_to(
            true,
            || anyhow::bail!("boom"),
            |t| {
                printed.push_str(t);
                Ok(())
            },
        );
        assert!(is_reported_as_json(&failed.unwrap_err()));
        assert_eq!(printed, "{\"error\":\"boom\"}\n");
        let failed = json_errors_to(false, || anyhow::bail!("boom"), |_| panic!("printed"));
        assert!(!is_reported_as_json(&failed.unwrap_err()));
        // A closed stdout stays what it is: there is nobody to print to.
        let closed = json_errors_to(true, || Err(StdoutClosed.into()), |_| panic!("printed"));
        assert!(is_stdout_closed(&closed.unwrap_err()));
        // Success prints nothing of its own.
        assert!(json_errors_to(true, || Ok(()), |_| panic!("printed")).is_ok());
    }
}

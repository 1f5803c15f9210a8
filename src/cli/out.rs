//! Writing command output to stdout. A reader that stops early
//! (`warren server nodes | head -1`) closes the pipe: that ends the command
//! quietly instead of panicking as `println!` would.

use std::fmt;
use std::io::{ErrorKind, Write};

use anyhow::{Context, Result};

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
}

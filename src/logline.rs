//! Log lines on stderr that can never end the process. `eprintln!` panics
//! when stderr's reader went away (a pipe to a logger that exited); a
//! daemon must keep serving instead: a line that cannot be written is
//! dropped and counted.

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Writes one line with a single write, so lines of different threads do
/// not interleave.
pub fn write_line(args: fmt::Arguments<'_>) {
    let mut line = fmt::format(args);
    line.push('\n');
    if std::io::stderr().lock().write_all(line.as_bytes()).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Lines dropped because stderr could not take them.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// `eprintln!` for daemons: never panics.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::logline::write_line(format_args!($($arg)*))
    };
}

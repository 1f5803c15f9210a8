//! Log lines on stderr that can never end the process. `eprintln!` panics
//! when stderr's reader went away (a pipe to a logger that exited); a
//! daemon must keep serving instead: a line that cannot be written is
//! dropped and counted.
//!
//! Each line has a level (`log_error!`, `log_warn!`, `log!` = info,
//! `log_debug!`); lines below the level set by `--log-level` are not
//! written. On the journal (systemd sets `JOURNAL_STREAM` to stderr's
//! device:inode) a line starts with the sd-daemon priority prefix (`<4>`)
//! and no timestamp, the journal keeps its own; anywhere else with an
//! RFC 3339 UTC timestamp and the level's name (none for info).

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

static DROPPED: AtomicU64 = AtomicU64::new(0);

/// How much is logged; the value is the syslog priority the journal reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
#[repr(u8)]
pub enum Level {
    Error = 3,
    Warn = 4,
    Info = 6,
    Debug = 7,
}

impl Level {
    /// As `--log-level` spells it.
    pub fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    /// What a line of this level starts with when it is not on the journal.
    fn text_prefix(self) -> &'static str {
        match self {
            Level::Error => "ERROR ",
            Level::Warn => "WARN ",
            Level::Info => "",
            Level::Debug => "DEBUG ",
        }
    }
}

static LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

/// Lines from before the level was known (reading the config file that sets it).
static EARLY: Mutex<Vec<(Level, String)>> = Mutex::new(Vec::new());

/// Lines less severe than `level` are not written from now on; lines held
/// by `write_early` are written now, if `level` lets them.
pub fn set_level(level: Level) {
    LEVEL.store(level as u8, Ordering::Relaxed);
    flush_early();
}

/// A line of `level` held until `set_level`: the level is not known yet.
pub fn write_early(level: Level, args: fmt::Arguments<'_>) {
    if let Ok(mut early) = EARLY.lock() {
        early.push((level, fmt::format(args)));
    }
}

fn flush_early() {
    let lines = EARLY
        .lock()
        .map(|mut e| std::mem::take(&mut *e))
        .unwrap_or_default();
    for (level, line) in lines {
        write_at(level, format_args!("{line}"));
    }
}

/// Whether a line of `level` would be written (checked before formatting it).
pub fn enabled(level: Level) -> bool {
    level as u8 <= LEVEL.load(Ordering::Relaxed)
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is
/// "DEVICE:INODE" of the stream systemd connected, and a child that
/// redirected stderr elsewhere inherits the variable, so compare.
fn stderr_is_journal() -> bool {
    static JOURNAL: OnceLock<bool> = OnceLock::new();
    *JOURNAL.get_or_init(|| {
        let Some(var) = std::env::var_os("JOURNAL_STREAM") else {
            return false;
        };
        let Some((dev, ino)) = var.to_str().and_then(|v| v.split_once(':')) else {
            return false;
        };
        let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
        // SAFETY: fstat writes a stat into the buffer when it returns 0.
        if unsafe { libc::fstat(2, st.as_mut_ptr()) } != 0 {
            return false;
        }
        // SAFETY: fstat succeeded.
        let st = unsafe { st.assume_init() };
        dev.parse::<u64>() == Ok(st.st_dev) && ino.parse::<u64>() == Ok(st.st_ino)
    })
}

/// Writes one line with a single write, so lines of different threads do
/// not interleave.
fn write_raw(line: String) {
    if std::io::stderr().lock().write_all(line.as_bytes()).is_err() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}

/// Writes one line of `level`, if that level is enabled.
pub fn write_at(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let line = if stderr_is_journal() {
        format!("<{}>{args}\n", level as u8)
    } else {
        format!("{} {}{args}\n", rfc3339_now(), level.text_prefix())
    };
    write_raw(line);
}

/// An info line (what `log!` writes).
pub fn write_line(args: fmt::Arguments<'_>) {
    write_at(Level::Info, args);
}

/// The line a command ends with when it fails: on a terminal just the
/// message (no timestamp: it answers what was typed), on the journal an error.
pub fn write_final_error(args: fmt::Arguments<'_>) {
    flush_early();
    if stderr_is_journal() {
        write_raw(format!("<{}>{args}\n", Level::Error as u8));
    } else {
        write_raw(format!("{args}\n"));
    }
}

/// Lines dropped because stderr could not take them.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Now as "2026-12-03T15:16:06.123Z".
fn rfc3339_now() -> String {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    rfc3339(since.as_secs(), since.subsec_millis())
}

fn rfc3339(unix_secs: u64, millis: u32) -> String {
    let days = (unix_secs / 86_400) as i64;
    let secs = unix_secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Year, month, day of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`, proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `eprintln!` for daemons: an info line, never panics.
macro_rules! log {
    ($($arg:tt)*) => {
        $crate::logline::write_at($crate::logline::Level::Info, format_args!($($arg)*))
    };
}

/// A failure the daemon cannot work around (it stops, or a part of it does).
#[allow(unused_macros)]
macro_rules! log_error {
    ($($arg:tt)*) => {
        $crate::logline::write_at($crate::logline::Level::Error, format_args!($($arg)*))
    };
}

/// A failure the daemon works around (it retries, falls back, drops one thing).
#[allow(unused_macros)]
macro_rules! log_warn {
    ($($arg:tt)*) => {
        $crate::logline::write_at($crate::logline::Level::Warn, format_args!($($arg)*))
    };
}

/// Detail for finding a bug; off unless `--log-level debug`.
#[allow(unused_macros)]
macro_rules! log_debug {
    ($($arg:tt)*) => {
        if $crate::logline::enabled($crate::logline::Level::Debug) {
            $crate::logline::write_at($crate::logline::Level::Debug, format_args!($($arg)*))
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day of a century leap year) 12:34:56.
        assert_eq!(rfc3339(951_827_696, 7), "2000-02-29T12:34:56.007Z");
        assert_eq!(rfc3339(1_804_032_000, 999), "2027-03-03T00:00:00.999Z");
        assert_eq!(rfc3339(4_102_444_799, 0), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn levels_order_by_severity() {
        assert!(Level::Error < Level::Warn && Level::Warn < Level::Info && Level::Info < Level::Debug);
        assert!(enabled(Level::Info) && !enabled(Level::Debug));
    }
}

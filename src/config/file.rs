//! Reading the config file: its permissions, its TOML, its sections.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{Result, anyhow, bail};

/// The sections a file may have, one per daemon subcommand family.
pub const SECTIONS: &[&str] = &["agent", "server", "relay", "wgstun"];

/// A config file is a few hundred bytes; more is not one.
const MAX_FILE_LEN: u64 = 1 << 20;

/// The section `name` of the file at `path` (empty when the file has none);
/// `None` when the file does not exist and `missing_ok`.
pub fn load_section(path: &Path, name: &str, missing_ok: bool) -> Result<Option<toml::Table>> {
    let shown = path.display();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if missing_ok && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::Error::new(e).context(format!("{shown}"))),
    };
    let meta = file.metadata().map_err(|e| anyhow!("{shown}: {e}"))?;
    check_permissions(path, &meta)?;
    let mut text = String::new();
    file.take(MAX_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| anyhow!("{shown}: {e}"))?;
    if text.len() as u64 > MAX_FILE_LEN {
        bail!("{shown}: larger than {MAX_FILE_LEN} bytes, not a config file");
    }
    let mut table: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow!("{shown}: {}", toml_error(&text, &e)))?;
    for (key, value) in &table {
        if !SECTIONS.contains(&key.as_str()) {
            bail!(
                "{shown}: unknown section [{key}] (expected {})",
                SECTIONS
                    .iter()
                    .map(|s| format!("[{s}]"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if !value.is_table() {
            bail!("{shown}: {key} must be a section ([{key}]), not a value");
        }
    }
    Ok(Some(match table.remove(name) {
        Some(toml::Value::Table(t)) => t,
        _ => toml::Table::new(),
    }))
}

/// Whether `e` (from [`load_section`]) is that the file may not be opened.
pub fn is_permission_denied(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == std::io::ErrorKind::PermissionDenied)
}

/// The file says what a root daemon runs and where it reads its token: one
/// that other users may change is refused, one owned by another (non-root)
/// user too. Readable by others is only warned about: it holds no secret,
/// but names where the token is.
fn check_permissions(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        bail!(
            "{}: writable by other users (mode {mode:04o}); they could change what warren runs: chmod 600 it",
            path.display()
        );
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid && meta.uid() != 0 {
        bail!(
            "{}: owned by user {}, not by root or this user ({euid}): chown it",
            path.display(),
            meta.uid()
        );
    }
    if mode & 0o044 != 0 {
        // Written once --log-level (perhaps from this file) is known.
        crate::logline::write_early(
            crate::logline::Level::Warn,
            format_args!(
                "warren: {} is readable by other users (mode {mode:04o}); keep it mode 0600",
                path.display()
            ),
        );
    }
    Ok(())
}

/// One line out of toml's multi-line message: "line 3: expected ...".
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

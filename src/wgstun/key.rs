//! The server's WireGuard key, kept in the state directory (mode 0600).
//! Clients pin its public key in their `[Peer]` stanza, so it must survive restarts.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::keys::Key;

pub const KEY_FILE: &str = "wgstun.key";

pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join(KEY_FILE)
}

/// Loads the key, or creates it atomically: written to a private temporary
/// file, then hard-linked into place, which fails instead of overwriting if
/// another process won the race (its key is then loaded).
pub fn load_or_create(state_dir: &Path) -> Result<Key> {
    load_or_create_file(state_dir, KEY_FILE, "WG-STUN key")
}

/// The same for another server role's key (`what` names it in errors, e.g. "relay key").
pub fn load_or_create_file(state_dir: &Path, file: &str, what: &str) -> Result<Key> {
    let path = state_dir.join(file);
    match load(&path, what) {
        Ok(k) => return Ok(k),
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(e),
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let key = Key::generate_private();
    let tmp = state_dir.join(format!(".{file}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(format!("{key}\n").as_bytes())?;
        f.sync_all()
    };
    let linked = write().and_then(|()| fs::hard_link(&tmp, &path));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(key),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => load(&path, what),
        Err(e) => Err(e).with_context(|| format!("creating {what} {}", path.display())),
    }
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|io| io.kind() == ErrorKind::NotFound)
}

fn load(path: &Path, what: &str) -> Result<Key> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(e.into()),
        Err(e) => return Err(e).with_context(|| format!("reading {what} {}", path.display())),
    };
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "reading {what} {}: readable by group or others (mode {:o}); chmod 600 it",
            path.display(),
            meta.permissions().mode() & 0o777
        );
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {what} {}", path.display()))?;
    text.parse()
        .with_context(|| format!("reading {what} {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("warren-wgstun-key-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn key_is_created_once_private_and_reloaded() {
        let dir = temp_dir("create");
        let k1 = load_or_create(&dir).unwrap();
        let mode = fs::metadata(key_path(&dir)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let k2 = load_or_create(&dir).unwrap();
        assert_eq!(k1, k2);
        assert_eq!(
            fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left behind"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn world_readable_key_is_refused() {
        let dir = temp_dir("perm");
        load_or_create(&dir).unwrap();
        fs::set_permissions(key_path(&dir), fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", load_or_create(&dir).unwrap_err());
        assert!(err.contains("readable by group or others"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }
}

//! Which node keys a separate relay serves: the mesh's members as its
//! coordinator last told it (`feed.rs` listens, `coord/relayfeed.rs` tells).
//!
//! No set known (no `--coordinator`, or it never answered yet): every key
//! that completes the handshake is served, as before the feed existed, so a
//! relay starting while its coordinator is down does not cut the mesh off.
//! Once a set is known it is kept while the coordinator is unreachable, and
//! persisted in the state directory so a restart keeps refusing removed keys.

use std::collections::HashSet;
use std::fs;
use std::io::{ErrorKind, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use crate::keys::Key;

/// The persisted set in the relay's state directory (mode 0600).
pub const MEMBERS_FILE: &str = "relay-members";
/// First line of [`MEMBERS_FILE`]; one base64 key per line follows.
const FILE_HEADER: &str = "# warren relay members v1";

/// A change the coordinator sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberUpdate {
    /// Every member: replaces the set.
    Full(Vec<Key>),
    Delta {
        added: Vec<Key>,
        removed: Vec<Key>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberSet {
    /// `None`: no set known yet, serve any key.
    keys: Option<HashSet<Key>>,
}

impl MemberSet {
    /// No set known: every key is served.
    pub fn open() -> MemberSet {
        MemberSet::default()
    }

    pub fn allows(&self, key: &Key) -> bool {
        self.keys.as_ref().is_none_or(|k| k.contains(key))
    }

    pub fn is_known(&self) -> bool {
        self.keys.is_some()
    }

    /// Members known, if a set is.
    pub fn known_len(&self) -> Option<usize> {
        self.keys.as_ref().map(HashSet::len)
    }

    /// Applies a change. A delta before any full set cannot be placed (the
    /// coordinator always sends the set first) and is ignored.
    pub fn apply(&mut self, update: &MemberUpdate) {
        match update {
            MemberUpdate::Full(keys) => self.keys = Some(keys.iter().copied().collect()),
            MemberUpdate::Delta { added, removed } => {
                if let Some(keys) = &mut self.keys {
                    for k in removed {
                        keys.remove(k);
                    }
                    keys.extend(added.iter().copied());
                }
            }
        }
    }

    /// The set persisted in `dir`; no file means no set known.
    pub fn load(dir: &Path) -> Result<MemberSet> {
        let path = dir.join(MEMBERS_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(MemberSet::open()),
            Err(e) => return Err(e).with_context(|| format!("reading relay members {}", path.display())),
        };
        let mut lines = text.lines();
        if lines.next() != Some(FILE_HEADER) {
            bail!(
                "relay members {}: not a member file (bad first line)",
                path.display()
            );
        }
        let mut keys = HashSet::new();
        for (i, line) in lines.enumerate() {
            let key = line
                .parse()
                .with_context(|| format!("relay members {} line {}: bad key", path.display(), i + 2))?;
            keys.insert(key);
        }
        Ok(MemberSet { keys: Some(keys) })
    }

    /// Writes the set to `dir` (mode 0600, replaced atomically); nothing when no set is known.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let Some(keys) = &self.keys else { return Ok(()) };
        let path = dir.join(MEMBERS_FILE);
        let tmp = dir.join(format!(".{MEMBERS_FILE}.tmp"));
        let mut text = String::with_capacity(FILE_HEADER.len() + 1 + keys.len() * 45);
        text.push_str(FILE_HEADER);
        text.push('\n');
        for k in keys {
            text.push_str(&k.to_base64());
            text.push('\n');
        }
        let write = || -> std::io::Result<()> {
            let _ = fs::remove_file(&tmp);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        };
        write().with_context(|| format!("writing relay members {}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::coord::store::tests::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn key() -> Key {
        Key::generate_private().public_key()
    }

    #[test]
    fn serves_any_key_until_a_set_is_known_then_only_members() {
        let (a, b, c) = (key(), key(), key());
        let mut m = MemberSet::open();
        assert!(m.allows(&a) && !m.is_known());
        // A delta cannot come first; if it did it must not make a set of one change.
        m.apply(&MemberUpdate::Delta {
            added: vec![a],
            removed: vec![],
        });
        assert!(m.allows(&b) && !m.is_known());
        m.apply(&MemberUpdate::Full(vec![a, b]));
        assert!(m.allows(&a) && m.allows(&b) && !m.allows(&c));
        m.apply(&MemberUpdate::Delta {
            added: vec![c],
            removed: vec![a],
        });
        assert!(!m.allows(&a) && m.allows(&b) && m.allows(&c));
        assert_eq!(m.known_len(), Some(2));
        // An empty mesh refuses everyone: known, not open.
        m.apply(&MemberUpdate::Full(vec![]));
        assert!(!m.allows(&b) && m.is_known());
    }

    #[test]
    fn a_saved_set_loads_back_and_is_private() {
        let dir = TempDir::new("relay-members");
        assert_eq!(MemberSet::load(&dir.0).unwrap(), MemberSet::open());
        MemberSet::open().save(&dir.0).unwrap();
        assert!(!dir.0.join(MEMBERS_FILE).exists(), "no set, no file");
        let (a, b) = (key(), key());
        let mut m = MemberSet::open();
        m.apply(&MemberUpdate::Full(vec![a, b]));
        m.save(&dir.0).unwrap();
        m.apply(&MemberUpdate::Delta {
            added: vec![],
            removed: vec![a],
        });
        m.save(&dir.0).unwrap();
        let loaded = MemberSet::load(&dir.0).unwrap();
        assert_eq!(loaded, m);
        assert!(!loaded.allows(&a) && loaded.allows(&b));
        let mode = fs::metadata(dir.0.join(MEMBERS_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // The empty set survives too: it is not "no set".
        m.apply(&MemberUpdate::Full(vec![]));
        m.save(&dir.0).unwrap();
        assert!(MemberSet::load(&dir.0).unwrap().is_known());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_it() {
        let dir = TempDir::new("relay-members-bad");
        fs::write(dir.0.join(MEMBERS_FILE), format!("{FILE_HEADER}\nnot-a-key\n")).unwrap();
        let e = format!("{:#}", MemberSet::load(&dir.0).unwrap_err());
        assert!(e.contains("relay-members line 2: bad key"), "{e}");
        fs::write(dir.0.join(MEMBERS_FILE), "junk\n").unwrap();
        assert!(MemberSet::load(&dir.0).is_err());
    }
}

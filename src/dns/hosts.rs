//! The fallback for machines whose resolver nobody can point at the agent:
//! a block of `ADDR NAME.DOMAIN` lines in a hosts file, between markers.
//! Lines outside the block are never changed; the file is replaced
//! atomically, so a reader sees the old file or the new one.

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

pub const BEGIN: &str = "# BEGIN warren";
pub const END: &str = "# END warren";
/// The mode of a hosts file we create: world-readable, as /etc/hosts is.
const NEW_FILE_MODE: u32 = 0o644;

/// `current` without any complete warren block (a lone marker is not ours to judge).
pub fn without_block(current: &str) -> String {
    let lines: Vec<&str> = current.split_inclusive('\n').collect();
    let mut out = String::with_capacity(current.len());
    let mut i = 0;
    while i < lines.len() {
        if lines[i].trim_end() == BEGIN
            && let Some(end) = lines[i..].iter().position(|l| l.trim_end() == END)
        {
            i += end + 1;
            continue;
        }
        out.push_str(lines[i]);
        i += 1;
    }
    out
}

/// `current` with the block for `entries` at its end (none when `entries` is empty).
pub fn with_block(current: &str, entries: &[(String, Ipv4Addr)]) -> String {
    let mut out = without_block(current);
    if entries.is_empty() {
        return out;
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(BEGIN);
    out.push_str("\n# written by the warren agent: edits between these markers are lost\n");
    for (name, addr) in entries {
        out.push_str(&format!("{addr}\t{name}\n"));
    }
    out.push_str(END);
    out.push('\n');
    out
}

/// Puts the block for `entries` into the file at `path` (removes it when
/// `entries` is empty). Returns whether the file changed.
pub fn update(path: &Path, entries: &[(String, Ipv4Addr)]) -> Result<bool> {
    let current = match std::fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && entries.is_empty() => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = with_block(&current, entries);
    if new == current {
        return Ok(false);
    }
    replace(path, &new).with_context(|| format!("writing {}", path.display()))?;
    Ok(true)
}

/// Writes a temporary file beside `path` and renames it over `path`, with
/// the old file's mode. A hosts file that is a mount point (containers
/// bind-mount /etc/hosts) cannot be renamed over: it is written in place.
fn replace(path: &Path, text: &str) -> std::io::Result<()> {
    let mode = std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(NEW_FILE_MODE);
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("hosts");
    let tmp = path.with_file_name(format!(".{name}.warren-new"));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()
    })();
    let renamed = written.and_then(|()| std::fs::rename(&tmp, path));
    match renamed {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
            let _ = std::fs::remove_file(&tmp);
            std::fs::write(path, text)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries() -> Vec<(String, Ipv4Addr)> {
        vec![
            ("laptop.warren".into(), Ipv4Addr::new(100, 64, 0, 10)),
            ("nas.warren".into(), Ipv4Addr::new(100, 64, 0, 9)),
        ]
    }

    const OTHERS: &str = "127.0.0.1\tlocalhost\n# a comment\n::1 localhost ip6-localhost\n";

    #[test]
    fn block_added_replaced_and_removed_leaving_other_lines() {
        let with = with_block(OTHERS, &entries());
        assert!(with.starts_with(OTHERS));
        assert!(with.contains("100.64.0.9\tnas.warren\n"));
        assert!(with.ends_with("# END warren\n"));
        // Replaced, not appended twice.
        let again = with_block(&with, &entries()[..1]);
        assert_eq!(again.matches(BEGIN).count(), 1);
        assert!(!again.contains("nas.warren"));
        assert_eq!(without_block(&again), OTHERS);
        assert_eq!(with_block(&with, &[]), OTHERS);
    }

    #[test]
    fn lines_after_the_block_and_a_missing_newline_survive() {
        let mid = format!("{OTHERS}{BEGIN}\n100.64.0.1\told.warren\n{END}\n10.0.0.1 router");
        let new = with_block(&mid, &entries());
        assert!(new.starts_with(&format!("{OTHERS}10.0.0.1 router\n{BEGIN}")));
        assert!(!new.contains("old.warren"));
        // A BEGIN without END is someone else's text: kept as it is.
        let lone = format!("{OTHERS}{BEGIN}\n1.2.3.4 x\n");
        assert_eq!(without_block(&lone), lone);
    }

    #[test]
    fn update_writes_only_on_change_and_keeps_the_mode() {
        let dir = std::env::temp_dir().join(format!("warren-hosts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("hosts");
        std::fs::write(&path, OTHERS).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(update(&path, &entries()).unwrap());
        assert!(!update(&path, &entries()).unwrap(), "unchanged: not rewritten");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o640
        );
        assert!(update(&path, &[]).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), OTHERS);
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `warren man DIR` (hidden): writes the man pages, generated from the clap
//! definitions so they never drift from `--help`. `make deb` runs it on the
//! release binary and packages DIR; nothing generated is committed.

use std::path::Path;

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Writes warren.1 and one page per visible subcommand (warren-server.1,
/// warren-server-invite.1, …) into `dir`, creating it.
pub fn run(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating man page directory {}", dir.display()))?;
    clap_mangen::generate_to(super::Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_main_page_and_visible_subcommands_only() {
        let dir = std::env::temp_dir().join(format!("warren-man-test-{}", std::process::id()));
        run(&dir).unwrap();
        let main = std::fs::read_to_string(dir.join("warren.1")).unwrap();
        assert!(
            main.starts_with(".ie"),
            "not roff: {}",
            &main[..40.min(main.len())]
        );
        assert!(main.contains("agent"), "the main page lists the subcommands");
        assert!(dir.join("warren-server.1").exists());
        assert!(dir.join("warren-server-invite.1").exists());
        assert!(
            !dir.join("warren-man.1").exists(),
            "hidden subcommands get no page"
        );
        assert!(!dir.join("warren-relay-load.1").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! `cargo run --example man -- DIR`: writes the man pages, generated from the
//! clap definitions so they never drift from `--help`. `make deb` runs it and
//! packages DIR; nothing generated is committed. An example rather than a
//! subcommand: clap_mangen stays out of the binary (64 KiB of a router's flash).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::CommandFactory;

/// Writes warren.1 and one page per visible subcommand (warren-server.1,
/// warren-server-invite.1, …) into `dir`, creating it.
fn write_pages(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating man page directory {}", dir.display()))?;
    clap_mangen::generate_to(warren::cli::Cli::command(), dir)
        .with_context(|| format!("writing man pages into {}", dir.display()))
}

fn main() -> ExitCode {
    let Some(dir) = std::env::args_os().nth(1).map(PathBuf::from) else {
        eprintln!("usage: cargo run --example man -- DIR");
        return ExitCode::from(2);
    };
    match write_pages(&dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("man: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_main_page_and_visible_subcommands_only() {
        let dir = std::env::temp_dir().join(format!("warren-man-test-{}", std::process::id()));
        write_pages(&dir).unwrap();
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
            !dir.join("warren-relay-load.1").exists(),
            "hidden subcommands get no page"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

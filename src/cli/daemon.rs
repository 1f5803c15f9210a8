//! Arguments every daemon subcommand shares: its config file and log level.

use std::path::PathBuf;

use clap::Args;

use crate::logline::Level;

#[derive(Args, Debug, Clone)]
pub struct DaemonArgs {
    /// Config file: this subcommand's section of it ([agent], [server],
    /// [relay], [wgstun]; a key is a long flag with `_` for `-`). Flags
    /// given here win. Default: /etc/warren/warren.toml, if it exists.
    #[arg(long, value_name = "FILE", global = true)]
    pub config: Option<PathBuf>,
    /// Least severe log lines written.
    #[arg(long, value_enum, value_name = "LEVEL", default_value_t = Level::Info, global = true)]
    pub log_level: Level,
}

impl DaemonArgs {
    /// Applies the log level; the first thing a daemon subcommand does.
    pub fn start(&self) {
        crate::logline::set_level(self.log_level);
    }
}

//! Command-line surface: one file per subcommand family.

mod keys;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "warren",
    version,
    about = "WireGuard mesh network for machines that run unattended"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print a new private key (like `wg genkey`).
    Genkey,
    /// Read a private key on stdin, print its public key (like `wg pubkey`).
    Pubkey,
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Genkey => keys::genkey(),
        Command::Pubkey => keys::pubkey(),
    }
}

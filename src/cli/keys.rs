//! `warren genkey`, `warren pubkey`: byte-compatible with `wg genkey` / `wg pubkey`.

use std::io::Read;

use anyhow::{Context, Result};
use clap::Args;

use crate::keys::Key;

/// `wg pubkey` accepts at most one key plus whitespace; so do we.
const MAX_KEY_INPUT: u64 = 1024;

pub fn genkey() -> Result<()> {
    let key = Key::generate_private();
    super::out::write(&format!("{key}\n"))
}

#[derive(Args, Debug)]
pub struct PubkeyArgs {
    /// Print `{"public_key": KEY}` (errors as `{"error": ...}`).
    #[arg(long)]
    pub json: bool,
}

pub fn pubkey(a: PubkeyArgs) -> Result<()> {
    let mut input = String::new();
    std::io::stdin()
        .take(MAX_KEY_INPUT)
        .read_to_string(&mut input)
        .context("reading a private key from stdin")?;
    let private: Key = input.parse().context("reading a private key from stdin")?;
    if a.json {
        return super::out::json(&serde_json::json!({ "public_key": private.public_key() }));
    }
    super::out::write(&format!("{}\n", private.public_key()))
}

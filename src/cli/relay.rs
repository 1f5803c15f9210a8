//! `warren relay`: run the relay on its own (it is also meant to run inside `warren server`).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::relay::client_conn::Limits;
use crate::relay::server::{RelayConfig, RelayServer};
use crate::relay::{DEFAULT_PORT, KEY_FILE};
use crate::wgstun::key;

#[derive(Args, Debug)]
pub struct RelayArgs {
    /// Address for client connections (TCP).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT)))]
    pub listen: SocketAddr,
    /// Directory holding the relay key (relay.key, mode 0600).
    #[arg(long, default_value = "/var/lib/warren")]
    pub state_dir: PathBuf,
    /// Most clients connected at once; further connections are refused.
    #[arg(long, default_value_t = 20_000)]
    pub max_clients: usize,
    /// Print the relay's public key and exit.
    #[arg(long)]
    pub show_key: bool,
}

pub fn run(args: RelayArgs) -> Result<()> {
    let private_key = key::load_or_create_file(&args.state_dir, KEY_FILE, "relay key")?;
    if args.show_key {
        return super::out::write(&format!("{}\n", private_key.public_key()));
    }
    RelayServer::bind(RelayConfig {
        listen: args.listen,
        private_key,
        limits: Limits::default(),
        max_clients: args.max_clients,
    })?
    .run()
}

//! Command-line surface: one file per subcommand family.

mod agent;
pub(crate) mod agent_routes;
mod bugreport;
mod daemon;
mod keys;
pub mod out;
#[cfg(feature = "relay-server")]
mod relay;
#[cfg(feature = "server")]
mod server;
#[cfg(feature = "server")]
mod server_routes;
pub mod wg;
#[cfg(feature = "wgstun-server")]
mod wgstun;

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
    Pubkey(keys::PubkeyArgs),
    /// Low-level WireGuard interface commands (apply a config file, show, delete).
    #[command(subcommand)]
    Wg(wg::WgCommand),
    /// Run the node agent in the foreground (what systemd or procd starts).
    Agent(agent::AgentArgs),
    /// Start the agent in the background and join the mesh (`--join TOKEN` the first time).
    Up(agent::AgentArgs),
    /// Leave: remove the interface and its routes, tell the coordinator, stop the agent.
    Down(agent::SocketArgs),
    /// This node and its peers: addresses, endpoints, paths, handshakes, traffic.
    Status(agent::SocketArgs),
    /// Round trip to a peer's agent, sealed end to end: over the direct path, else its relay.
    Ping(agent::PingArgs),
    /// This node's network as the agent sees it: public mappings, candidates, relays.
    Netcheck(agent::SocketArgs),
    /// Switch this node to a new WireGuard key, keeping its name and address.
    RotateKey(agent::SocketArgs),
    /// Write one redacted file for an issue: versions, status, netcheck, the
    /// interface's WireGuard state and routes, the last log lines.
    Bugreport(bugreport::BugreportArgs),
    #[cfg(feature = "server")]
    /// Run the coordinator, or administer it (nodes, remove, rename, invite).
    #[command(alias = "coord")]
    Server(server::ServerArgs),
    #[cfg(feature = "wgstun-server")]
    /// Run the WG-STUN server (a WireGuard peer at 100.64.0.4 answering STUN), or print its [Peer].
    Wgstun(wgstun::WgstunArgs),
    #[cfg(feature = "relay-server")]
    /// Run the relay (forwards sealed datagrams between nodes that cannot reach each other).
    Relay(relay::RelayArgs),
    #[cfg(feature = "relay-server")]
    /// Load generator for relay benchmarks.
    #[command(subcommand, hide = true)]
    RelayLoad(relay::LoadCommand),
    #[cfg(feature = "wgstun-server")]
    /// Load generator for WG-STUN tests and benchmarks.
    #[command(subcommand, hide = true)]
    WgstunLoad(wgstun::LoadCommand),
}

impl Command {
    /// Whether the command line asked for JSON (`--json` on a read command).
    fn json(&self) -> bool {
        match self {
            Command::Pubkey(a) => a.json,
            Command::Wg(wg::WgCommand::Show(a)) => a.json,
            Command::Down(a) | Command::Status(a) | Command::Netcheck(a) | Command::RotateKey(a) => a.json,
            Command::Ping(a) => a.json,
            #[cfg(feature = "server")]
            Command::Server(a) => a.json(),
            #[cfg(feature = "wgstun-server")]
            Command::Wgstun(a) => a.json(),
            #[cfg(feature = "relay-server")]
            Command::Relay(a) => a.json(),
            _ => false,
        }
    }
}

pub fn run(cli: Cli) -> Result<()> {
    let json = cli.command.json();
    out::json_errors(json, || dispatch(cli.command))
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Genkey => keys::genkey(),
        Command::Pubkey(a) => keys::pubkey(a),
        Command::Bugreport(a) => bugreport::run(a),
        Command::Wg(c) => wg::run(c),
        #[cfg(feature = "server")]
        Command::Server(args) => server::run(args),
        Command::Agent(a) => agent::agent(a),
        Command::Up(a) => agent::up(a),
        Command::Down(a) => agent::down(a),
        Command::Status(a) => agent::status(a),
        Command::RotateKey(a) => agent::rotate_key(a),
        Command::Ping(a) => agent::ping(a),
        Command::Netcheck(a) => agent::netcheck(a),
        #[cfg(feature = "wgstun-server")]
        Command::Wgstun(args) => wgstun::run(args),
        #[cfg(feature = "wgstun-server")]
        Command::WgstunLoad(cmd) => wgstun::load(cmd),
        #[cfg(feature = "relay-server")]
        Command::Relay(args) => relay::run(args),
        #[cfg(feature = "relay-server")]
        Command::RelayLoad(cmd) => relay::load(cmd),
    }
}

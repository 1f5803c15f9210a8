//! The WireGuard driver: one interface, two backends (kernel generic netlink
//! and the cross-platform UAPI socket of userspace implementations).
//!
//! The rest of warren touches WireGuard only through [`apply`]: it states the
//! device it wants, the driver reads what is there, computes the minimal
//! change and sends only that.

pub mod config;
pub mod genl;
pub mod kernel;
pub mod model;
pub mod reconcile;
pub mod select;
pub mod uapi;
pub mod userspace;

pub use model::{AllowedIp, DeviceConfig, DeviceState, DeviceUpdate, PeerConfig, PeerState, PeerUpdate};

use anyhow::Result;

/// Which WireGuard implementation configures an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Kernel,
    Userspace,
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BackendKind::Kernel => "kernel",
            BackendKind::Userspace => "userspace",
        })
    }
}

/// What one `set` cost on the wire: how many netlink messages or UAPI bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct WireCost {
    pub messages: usize,
    pub bytes: usize,
}

/// One WireGuard configuration backend. Implementations own non-blocking
/// sockets; a call completes in bounded time or fails with context.
pub trait Backend {
    fn kind(&self) -> BackendKind;
    /// Whether a WireGuard interface of this name exists.
    fn exists(&mut self, ifname: &str) -> Result<bool>;
    /// Creates the interface (the link, or the userspace process and its socket).
    fn create(&mut self, ifname: &str) -> Result<()>;
    /// Removes the interface and everything it carried.
    fn delete(&mut self, ifname: &str) -> Result<()>;
    /// Reads the device and all its peers (multi-part dumps included).
    fn get(&mut self, ifname: &str) -> Result<DeviceState>;
    /// Sends one minimal change. An empty update sends nothing.
    fn set(&mut self, ifname: &str, update: &DeviceUpdate) -> Result<WireCost>;
    /// The exit status of a WireGuard process this backend started that has
    /// died since the last call; `None` while all run (or none were started).
    fn check_alive(&mut self) -> Option<std::process::ExitStatus> {
        None
    }
}

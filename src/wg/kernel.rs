//! Kernel WireGuard over generic netlink (the `wireguard` family).
//!
//! CONTRACT (replaced by the real implementation): `KernelBackend::open()`
//! returns a backend when the `wireguard` genl family exists (after trying to
//! load the module), or an error saying why not.

use anyhow::{Result, bail};

use super::{Backend, BackendKind, DeviceState, DeviceUpdate, WireCost};

pub struct KernelBackend {}

impl KernelBackend {
    pub fn open() -> Result<KernelBackend> {
        bail!("kernel WireGuard backend is not built yet")
    }
}

impl Backend for KernelBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Kernel
    }
    fn exists(&mut self, _ifname: &str) -> Result<bool> {
        bail!("kernel WireGuard backend is not built yet")
    }
    fn create(&mut self, _ifname: &str) -> Result<()> {
        bail!("kernel WireGuard backend is not built yet")
    }
    fn delete(&mut self, _ifname: &str) -> Result<()> {
        bail!("kernel WireGuard backend is not built yet")
    }
    fn get(&mut self, _ifname: &str) -> Result<DeviceState> {
        bail!("kernel WireGuard backend is not built yet")
    }
    fn set(&mut self, _ifname: &str, _update: &DeviceUpdate) -> Result<WireCost> {
        bail!("kernel WireGuard backend is not built yet")
    }
}

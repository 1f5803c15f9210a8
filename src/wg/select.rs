//! Which backend configures an interface: the kernel module when it is
//! there, a userspace implementation otherwise, or what the operator says.

use std::sync::Once;

use anyhow::{Result, bail};

use super::Backend;
use super::kernel::KernelBackend;
use super::userspace::UserspaceBackend;

/// Overrides the default choice when no `--backend` is given (the lab sets it).
pub const BACKEND_ENV: &str = "WARREN_WG_BACKEND";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendChoice {
    Auto,
    Kernel,
    Userspace,
}

impl std::str::FromStr for BackendChoice {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<BackendChoice> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            "kernel" => Ok(BackendChoice::Kernel),
            "userspace" => Ok(BackendChoice::Userspace),
            _ => bail!("invalid backend {s:?}: expected auto, kernel or userspace"),
        }
    }
}

impl BackendChoice {
    /// The flag if given, else `WARREN_WG_BACKEND`, else auto.
    pub fn resolve(flag: Option<BackendChoice>) -> Result<BackendChoice> {
        if let Some(c) = flag {
            return Ok(c);
        }
        match std::env::var(BACKEND_ENV) {
            Ok(v) if !v.is_empty() => v.parse().map_err(|e| anyhow::anyhow!("{BACKEND_ENV}: {e}")),
            _ => Ok(BackendChoice::Auto),
        }
    }
}

static LOGGED: Once = Once::new();

/// Opens the backend to create or configure interfaces with. Auto tries the
/// kernel module (which loads it if it can) and falls back to userspace,
/// saying so once on stderr.
pub fn open_backend(
    choice: BackendChoice,
    userspace_command: Option<Vec<String>>,
) -> Result<Box<dyn Backend>> {
    match choice {
        BackendChoice::Kernel => Ok(Box::new(KernelBackend::open()?)),
        BackendChoice::Userspace => Ok(Box::new(UserspaceBackend::new(userspace_command)?)),
        BackendChoice::Auto => match KernelBackend::open() {
            Ok(k) => Ok(Box::new(k)),
            Err(e) => {
                let u = UserspaceBackend::new(userspace_command)?;
                LOGGED.call_once(|| {
                    log!(
                        "warren: using userspace WireGuard ({}): kernel module not available: {e:#}",
                        u.program()
                    )
                });
                Ok(Box::new(u))
            }
        },
    }
}

/// Opens the backend that serves an existing interface `ifname`: with auto,
/// the kernel if it has the interface, else userspace. Returns `None` when
/// no backend has it.
pub fn backend_for_existing(choice: BackendChoice, ifname: &str) -> Result<Option<Box<dyn Backend>>> {
    let mut candidates: Vec<Box<dyn Backend>> = Vec::new();
    match choice {
        BackendChoice::Kernel => candidates.push(Box::new(KernelBackend::open()?)),
        BackendChoice::Userspace => candidates.push(Box::new(UserspaceBackend::new(None)?)),
        BackendChoice::Auto => {
            if let Ok(k) = KernelBackend::open() {
                candidates.push(Box::new(k));
            }
            candidates.push(Box::new(UserspaceBackend::new(None)?));
        }
    }
    for mut b in candidates {
        if b.exists(ifname)? {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_choices() {
        assert_eq!("kernel".parse::<BackendChoice>().unwrap(), BackendChoice::Kernel);
        assert_eq!(
            "userspace".parse::<BackendChoice>().unwrap(),
            BackendChoice::Userspace
        );
        assert_eq!("auto".parse::<BackendChoice>().unwrap(), BackendChoice::Auto);
        assert!("kmod".parse::<BackendChoice>().is_err());
        assert_eq!(
            BackendChoice::resolve(Some(BackendChoice::Kernel)).unwrap(),
            BackendChoice::Kernel,
            "the flag wins"
        );
    }
}

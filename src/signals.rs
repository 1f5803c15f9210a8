//! SIGTERM and SIGINT as events of the agent's loop (a signalfd), so a stop
//! by systemd, procd or ^C is a clean one: port mappings are given back.
//!
//! The signals are blocked in every thread (block them before spawning
//! any) and delivered only through the descriptor; child processes get an
//! empty mask back, or wireguard-go would ignore its own SIGTERM.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in STOP_SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

pub struct StopSignals {
    fd: OwnedFd,
}

impl StopSignals {
    /// Blocks SIGTERM and SIGINT in this thread (and threads it spawns later)
    /// and opens a non-blocking signalfd for them.
    pub fn open() -> io::Result<StopSignals> {
        let set = stop_set();
        // SAFETY: plain syscalls on a valid set; the fd is checked before use.
        unsafe {
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(StopSignals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The name of a stop signal that arrived, if any.
    pub fn read(&self) -> Option<&'static str> {
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        // SAFETY: reads at most `size` bytes into `info`.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut info as *mut libc::signalfd_siginfo).cast(),
                size,
            )
        };
        if n != size as isize {
            return None;
        }
        Some(match info.ssi_signo as libc::c_int {
            libc::SIGTERM => "SIGTERM",
            _ => "SIGINT",
        })
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// For `pre_exec`: a child starts with no signal blocked.
/// Async-signal-safe (sigprocmask only).
pub fn clear_mask_in_child() -> io::Result<()> {
    // SAFETY: sigemptyset and sigprocmask are async-signal-safe.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

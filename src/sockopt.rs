//! Socket options the data path tunes. Best effort: a socket that keeps the
//! kernel's default still works, only less well, so failures are ignored.

use std::os::fd::AsRawFd;

fn set(socket: &impl AsRawFd, level: libc::c_int, option: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt on a descriptor the caller owns, with a pointer to a live c_int of the stated size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A socket-level buffer size (`SO_SNDBUF`, `SO_RCVBUF`, or their `FORCE`
/// variants, which lift `net.core.*mem_max` for a privileged process).
pub fn set_buffer(socket: &impl AsRawFd, option: libc::c_int, bytes: libc::c_int) {
    set(socket, libc::SOL_SOCKET, option, bytes);
}

/// `TCP_NOTSENT_LOWAT`: writes report WouldBlock once this many bytes are
/// unsent, so data waits in the caller's own bounded queue instead of the
/// kernel's; bytes in flight are not limited.
pub fn set_unsent_limit(socket: &impl AsRawFd, bytes: libc::c_int) {
    set(socket, libc::IPPROTO_TCP, libc::TCP_NOTSENT_LOWAT, bytes);
}

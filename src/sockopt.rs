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

/// The mark for the agent's own sockets while an exit node is in use (see
/// `crate::route::WG_FWMARK`); 0 = none. Set once at start, before any
/// socket is made.
static OWN_MARK: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

pub fn set_own_mark(mark: u32) {
    OWN_MARK.store(mark, std::sync::atomic::Ordering::Relaxed);
}

fn own_mark() -> u32 {
    OWN_MARK.load(std::sync::atomic::Ordering::Relaxed)
}

/// `SO_MARK` on one of the agent's own sockets (needs CAP_NET_ADMIN, which
/// the agent has), so the exit node's policy rule leaves it on the normal
/// route. Only when a mark is set; for UDP it holds from the next send.
pub fn mark_own(socket: &impl AsRawFd) {
    let mark = own_mark();
    if mark != 0 {
        set(socket, libc::SOL_SOCKET, libc::SO_MARK, mark as libc::c_int);
    }
}

/// A non-blocking TCP connect, marked as the agent's own before the SYN
/// leaves (a mark set after `connect` would come too late for its route).
pub fn connect_tcp(addr: std::net::SocketAddr) -> std::io::Result<mio::net::TcpStream> {
    use std::os::fd::FromRawFd;
    if own_mark() == 0 {
        return mio::net::TcpStream::connect(addr);
    }
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: a fresh descriptor that the TcpStream takes over (and closes)
    // at once; connect gets a pointer to a live sockaddr of the stated length.
    unsafe {
        let fd = libc::socket(
            family,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        mark_own(&stream);
        let rc = match addr {
            std::net::SocketAddr::V4(a) => {
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: a.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*a.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                libc::connect(
                    fd,
                    &sa as *const libc::sockaddr_in as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            }
            std::net::SocketAddr::V6(a) => {
                let sa = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: a.port().to_be(),
                    sin6_flowinfo: a.flowinfo(),
                    sin6_addr: libc::in6_addr {
                        s6_addr: a.ip().octets(),
                    },
                    sin6_scope_id: a.scope_id(),
                };
                libc::connect(
                    fd,
                    &sa as *const libc::sockaddr_in6 as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                )
            }
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINPROGRESS) {
                return Err(e);
            }
        }
        Ok(mio::net::TcpStream::from_std(stream))
    }
}

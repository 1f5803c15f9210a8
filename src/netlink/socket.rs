//! A non-blocking netlink socket that speaks request/answer: send one request,
//! then read its answer (ACK, error, or a multi-part dump) within a deadline.
//!
//! The kernel answers netlink requests synchronously, so a request's answer is
//! queued by the time `send` returns (dump parts are produced as we read);
//! waiting is only a guard against a wedged kernel, never the normal path.
//! The socket stays non-blocking so a `mio::Poll` can own it.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use netlink_packet_core::{NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer};
use netlink_sys::{Socket, SocketAddr};

/// How long a request may wait for its answer before we call the kernel stuck.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// Big enough for one part of any dump: the kernel sizes dump parts to at
/// most 32 KiB plus headroom.
const RECV_BUFFER: usize = 256 * 1024;

/// Socket receive buffer: large dumps arrive faster than we parse them.
const SOCKET_RCVBUF: usize = 4 * 1024 * 1024;

/// A failed netlink request: the kernel's errno, or a transport problem.
#[derive(Debug)]
pub enum NlError {
    /// The kernel refused the request with this errno (positive).
    Kernel(i32),
    Io(io::Error),
    Timeout,
    Malformed(String),
}

impl NlError {
    pub fn errno(&self) -> Option<i32> {
        match self {
            NlError::Kernel(e) => Some(*e),
            NlError::Io(e) => e.raw_os_error(),
            _ => None,
        }
    }
}

/// The text for an errno, without Rust's " (os error N)" suffix; EPERM says
/// what is actually missing.
pub fn errno_text(errno: i32) -> String {
    // Only EPERM means a missing capability; EACCES also comes from e.g. IPv6
    // being disabled on the interface, where "needs root" would mislead.
    if errno == libc::EPERM {
        return "needs root (CAP_NET_ADMIN)".to_string();
    }
    let text = io::Error::from_raw_os_error(errno).to_string();
    match text.find(" (os error") {
        Some(i) => text[..i].to_string(),
        None => text,
    }
}

impl fmt::Display for NlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NlError::Kernel(e) => f.write_str(&errno_text(*e)),
            NlError::Io(e) => match e.raw_os_error() {
                Some(errno) => f.write_str(&errno_text(errno)),
                None => write!(f, "{e}"),
            },
            NlError::Timeout => write!(
                f,
                "no answer from the kernel within {}s",
                REQUEST_DEADLINE.as_secs()
            ),
            NlError::Malformed(what) => write!(f, "malformed netlink answer: {what}"),
        }
    }
}

impl std::error::Error for NlError {}

impl From<io::Error> for NlError {
    fn from(e: io::Error) -> NlError {
        NlError::Io(e)
    }
}

/// One netlink message as received: its type, flags and payload (after the
/// 16-byte netlink header).
pub struct Message<'a> {
    pub message_type: u16,
    pub flags: u16,
    pub sequence: u32,
    pub payload: &'a [u8],
    /// The whole message including its header, for parsers that want it.
    pub bytes: &'a [u8],
}

/// Splits a datagram into netlink messages. Stops (with an error) at the
/// first message whose length does not fit: never panics on bad input.
pub fn split_messages(mut buf: &[u8]) -> Result<Vec<Message<'_>>, NlError> {
    let mut out = Vec::new();
    while !buf.is_empty() {
        let nl = NetlinkBuffer::new_checked(buf).map_err(|e| NlError::Malformed(e.to_string()))?;
        let len = nl.length() as usize;
        let bytes = &buf[..len];
        let nl = NetlinkBuffer::new(bytes);
        out.push(Message {
            message_type: nl.message_type(),
            flags: nl.flags(),
            sequence: nl.sequence_number(),
            payload: nl.payload(),
            bytes,
        });
        // Messages are 4-byte aligned within a datagram; the last may be unpadded.
        let advance = (len + 3) & !3;
        buf = if advance >= buf.len() {
            &[]
        } else {
            &buf[advance..]
        };
    }
    Ok(out)
}

/// A netlink socket for requests, of one protocol (route or generic).
pub struct NlSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NlSocket {
    pub fn open(protocol: isize) -> io::Result<NlSocket> {
        let mut socket = Socket::new(protocol)?;
        socket.bind_auto()?;
        socket.set_non_blocking(true)?;
        // Shorter ACKs (no copy of our request) and extended error text.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
        let _ = socket.set_rx_buf_sz(SOCKET_RCVBUF);
        Ok(NlSocket {
            socket,
            seq: 0,
            buf: vec![0u8; RECV_BUFFER],
        })
    }

    /// Opens a socket subscribed to multicast groups (`RTNLGRP_*` numbers).
    pub fn open_subscribed(protocol: isize, groups: &[u32]) -> io::Result<NlSocket> {
        let mut socket = Socket::new(protocol)?;
        socket.bind(&SocketAddr::new(0, 0))?;
        socket.set_non_blocking(true)?;
        let _ = socket.set_rx_buf_sz(SOCKET_RCVBUF);
        for &g in groups {
            socket.add_membership(g)?;
        }
        Ok(NlSocket {
            socket,
            seq: 0,
            buf: vec![0u8; RECV_BUFFER],
        })
    }

    /// A fresh sequence number for the next request.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends one complete netlink message (header included).
    pub fn send(&mut self, bytes: &[u8]) -> Result<(), NlError> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        loop {
            match self.socket.send(bytes, 0) {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(NlError::Malformed(format!(
                        "short send: {n} of {} bytes",
                        bytes.len()
                    )));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.wait(deadline, libc::POLLOUT)?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Reads the answer to request `seq`, handing every data message to
    /// `each`, until the ACK (for requests sent with NLM_F_ACK) or NLMSG_DONE
    /// (for dumps). A non-dump request without ACK must not use this.
    pub fn answer(
        &mut self,
        seq: u32,
        mut each: impl FnMut(&Message<'_>) -> Result<(), NlError>,
    ) -> Result<(), NlError> {
        let deadline = Instant::now() + REQUEST_DEADLINE;
        loop {
            let n = match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(0) => return Err(NlError::Malformed("empty datagram".into())),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wait(deadline, libc::POLLIN)?;
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            let datagram = &self.buf[..n.min(self.buf.len())];
            for msg in split_messages(datagram)? {
                if msg.sequence != seq {
                    // A late answer to an earlier request that timed out.
                    continue;
                }
                match msg.message_type {
                    NLMSG_ERROR => {
                        let code = msg
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .ok_or_else(|| NlError::Malformed("short NLMSG_ERROR".into()))?;
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(NlError::Kernel(-code))
                        };
                    }
                    NLMSG_DONE => {
                        // A dump may end with an error code in its DONE message.
                        let code = msg
                            .payload
                            .get(..4)
                            .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                            .unwrap_or(0);
                        return if code == 0 {
                            Ok(())
                        } else {
                            Err(NlError::Kernel(-code))
                        };
                    }
                    NLMSG_NOOP => {}
                    NLMSG_OVERRUN => return Err(NlError::Malformed("overrun".into())),
                    _ => each(&msg)?,
                }
            }
        }
    }

    /// Reads whatever is queued, without waiting. `Ok(None)` = nothing more.
    pub fn try_recv(&mut self) -> io::Result<Option<&[u8]>> {
        loop {
            match self.socket.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => return Ok(Some(&self.buf[..n.min(self.buf.len())])),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn wait(&self, deadline: Instant, events: libc::c_short) -> Result<(), NlError> {
        let now = Instant::now();
        if now >= deadline {
            return Err(NlError::Timeout);
        }
        let ms = (deadline - now).as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack, count 1.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(());
            }
            return Err(e.into());
        }
        if r == 0 {
            return Err(NlError::Timeout);
        }
        Ok(())
    }
}

impl AsRawFd for NlSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.socket.as_raw_fd()
    }
}

impl mio::event::Source for NlSocket {
    fn register(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.as_raw_fd()).register(registry, token, interests)
    }
    fn reregister(
        &mut self,
        registry: &mio::Registry,
        token: mio::Token,
        interests: mio::Interest,
    ) -> io::Result<()> {
        mio::unix::SourceFd(&self.as_raw_fd()).reregister(registry, token, interests)
    }
    fn deregister(&mut self, registry: &mio::Registry) -> io::Result<()> {
        mio::unix::SourceFd(&self.as_raw_fd()).deregister(registry)
    }
}

/// Lets a type that owns an [`NlSocket`] be polled by mio as that socket.
macro_rules! delegate_to_nl_socket {
    ($ty:ty, $field:ident) => {
        impl std::os::fd::AsRawFd for $ty {
            fn as_raw_fd(&self) -> std::os::fd::RawFd {
                std::os::fd::AsRawFd::as_raw_fd(&self.$field)
            }
        }

        impl mio::event::Source for $ty {
            fn register(
                &mut self,
                registry: &mio::Registry,
                token: mio::Token,
                interests: mio::Interest,
            ) -> std::io::Result<()> {
                mio::event::Source::register(&mut self.$field, registry, token, interests)
            }
            fn reregister(
                &mut self,
                registry: &mio::Registry,
                token: mio::Token,
                interests: mio::Interest,
            ) -> std::io::Result<()> {
                mio::event::Source::reregister(&mut self.$field, registry, token, interests)
            }
            fn deregister(&mut self, registry: &mio::Registry) -> std::io::Result<()> {
                mio::event::Source::deregister(&mut self.$field, registry)
            }
        }
    };
}
pub(crate) use delegate_to_nl_socket;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_text_names_the_missing_capability() {
        assert_eq!(errno_text(libc::EPERM), "needs root (CAP_NET_ADMIN)");
        assert_eq!(errno_text(libc::EEXIST), "File exists");
    }

    #[test]
    fn split_rejects_truncated_messages_without_panicking() {
        assert!(split_messages(&[1, 2, 3]).is_err());
        let mut msg = vec![0u8; 20];
        msg[0] = 200; // claims 200 bytes, has 20
        assert!(split_messages(&msg).is_err());
        let mut ok = vec![0u8; 16];
        ok[0] = 16;
        ok[4] = 3; // NLMSG_DONE
        let msgs = split_messages(&ok).unwrap();
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].message_type, NLMSG_DONE);
    }
}

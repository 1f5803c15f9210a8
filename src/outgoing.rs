//! Writing a sans-IO connection's queued bytes to its non-blocking socket:
//! the one loop every shell needs, for every state machine that queues output.

use std::io::{ErrorKind, Write};

/// A state machine that queues bytes for its stream.
pub trait Outgoing {
    fn outgoing(&self) -> &[u8];
    fn consume_outgoing(&mut self, n: usize);
}

/// Writes until everything queued is written or the socket is full
/// (WouldBlock: the caller waits for writability). An error means the
/// connection is broken.
pub fn write_pending(stream: &mut impl Write, conn: &mut impl Outgoing) -> std::io::Result<()> {
    loop {
        let out = conn.outgoing();
        if out.is_empty() {
            return Ok(());
        }
        match stream.write(out) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => conn.consume_outgoing(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

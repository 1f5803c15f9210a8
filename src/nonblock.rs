//! Reading what a non-blocking stream has, for the small request/answer
//! sockets on the agent's loop (the control socket, the metrics endpoint).

use std::io::{ErrorKind, Read};

/// Appends what `stream` has to `input` until it would block or `input`
/// holds more than `limit` bytes (the caller refuses such a request).
/// Returns true when the peer closed the stream or the read failed: no
/// more input will come.
pub fn read_available(stream: &mut impl Read, input: &mut Vec<u8>, limit: usize) -> bool {
    let mut buf = [0u8; 1024];
    while input.len() <= limit {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(n) => input.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::read_available;
    use std::io::{self, Read};

    /// Hands out its chunks, then would block (or ends).
    struct Chunks(Vec<io::Result<Vec<u8>>>);

    impl Read for Chunks {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let chunk = self.0.remove(0)?;
            buf[..chunk.len()].copy_from_slice(&chunk);
            Ok(chunk.len())
        }
    }

    #[test]
    fn reads_until_it_would_block_closes_or_is_over_the_limit() {
        let mut input = Vec::new();
        let mut s = Chunks(vec![
            Ok(b"GET ".to_vec()),
            Err(io::ErrorKind::Interrupted.into()),
            Ok(b"/".to_vec()),
        ]);
        assert!(!read_available(&mut s, &mut input, 64));
        assert_eq!(input, b"GET /");

        let mut s = Chunks(vec![Ok(b"x".to_vec()), Ok(Vec::new())]);
        assert!(read_available(&mut s, &mut input, 64), "end of stream");

        let mut s = Chunks(vec![Err(io::ErrorKind::ConnectionReset.into())]);
        assert!(
            read_available(&mut s, &mut Vec::new(), 64),
            "a failed read ends it"
        );

        let mut input = Vec::new();
        let mut s = Chunks((0..10).map(|_| Ok(vec![b'a'; 100])).collect());
        assert!(!read_available(&mut s, &mut input, 250));
        assert_eq!(input.len(), 300, "stops once over the limit");
        assert_eq!(s.0.len(), 7, "and reads no further");
    }
}

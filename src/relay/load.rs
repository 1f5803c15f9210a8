//! Load generator for the relay benchmark (`warren relay-load`, hidden):
//! many idle registered clients, and one pair forwarding as fast as it can.
//! Clients are blocking sockets driving the same Noise channel as real ones.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::RELAY_PROFILE;
use super::frame::RelayFrame;
use crate::control::channel::Channel;
use crate::keys::Key;

/// A registered client on a blocking socket.
pub struct LoadClient {
    stream: TcpStream,
    ch: Channel,
    pub key: Key,
}

impl LoadClient {
    pub fn connect(relay: SocketAddr, relay_key: &Key) -> Result<LoadClient> {
        let key = Key::generate_private();
        let stream = TcpStream::connect(relay).with_context(|| format!("connecting to relay {relay}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_nodelay(true)?;
        let mut ch = Channel::client_with(&RELAY_PROFILE, &key, relay_key)?;
        ch.send(&RelayFrame::KeepAlive.encode().expect("keepalive"))?;
        let mut c = LoadClient { stream, ch, key };
        c.flush()?;
        let mut buf = [0u8; 512];
        while !c.ch.is_open() {
            let n = c.stream.read(&mut buf).context("relay handshake")?;
            if n == 0 {
                bail!("relay closed the connection during the handshake");
            }
            c.ch.receive(&buf[..n])?;
        }
        c.flush()?;
        Ok(c)
    }

    fn flush(&mut self) -> Result<()> {
        self.stream
            .write_all(self.ch.outgoing())
            .context("writing to relay")?;
        let n = self.ch.outgoing().len();
        self.ch.consume_outgoing(n);
        Ok(())
    }
}

/// Connects `n` idle clients and returns them (they stay registered while held).
pub fn idle(relay: SocketAddr, relay_key: &Key, n: usize) -> Result<Vec<LoadClient>> {
    crate::coord::load::raise_fd_limit();
    (0..n)
        .map(|i| LoadClient::connect(relay, relay_key).with_context(|| format!("idle client {i}")))
        .collect()
}

#[derive(Debug)]
pub struct ForwardReport {
    pub sent: u64,
    pub received: u64,
    pub seconds: f64,
}

/// One client sends `payload_len`-byte datagrams to another for `seconds`;
/// counts what arrives. The receiver reads on its own thread.
pub fn forward(
    relay: SocketAddr,
    relay_key: &Key,
    payload_len: usize,
    seconds: f64,
) -> Result<ForwardReport> {
    let mut sender = LoadClient::connect(relay, relay_key)?;
    let mut receiver = LoadClient::connect(relay, relay_key)?;
    let to = receiver.key.public_key();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let (rx_count, rx_stop) = (received.clone(), stop.clone());
    receiver
        .stream
        .set_read_timeout(Some(Duration::from_millis(200)))?;
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 256 * 1024];
        while !rx_stop.load(Ordering::Relaxed) {
            let n = match receiver.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(_) => continue,
            };
            if receiver.ch.receive(&buf[..n]).is_err() {
                return;
            }
            while let Some(m) = receiver.ch.next_message() {
                if matches!(RelayFrame::decode(&m), Ok(RelayFrame::RecvFrom { .. })) {
                    rx_count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    let frame = RelayFrame::SendTo {
        key: to,
        payload: vec![0x5a; payload_len],
    }
    .encode()?;
    let start = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    while start.elapsed() < duration {
        // Batches of 32 per write: the sender is not what is being measured.
        for _ in 0..32 {
            sender.ch.send(&frame)?;
        }
        sender.flush()?;
        sent += 32;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let at_end = received.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    Ok(ForwardReport {
        sent,
        received: at_end,
        seconds: elapsed,
    })
}

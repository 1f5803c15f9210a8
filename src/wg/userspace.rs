//! Userspace WireGuard (wireguard-go, boringtun, ...) over its UAPI socket
//! `/var/run/wireguard/IF.sock`, and supervision of the process we start.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use super::{Backend, BackendKind, DeviceState, DeviceUpdate, WireCost, uapi};

pub const SOCKET_DIR: &str = "/var/run/wireguard";
pub const LOG_DIR: &str = "/var/log/warren";
/// Linux wireguard-go refuses to start without this when it thinks the
/// kernel module could be used instead.
const PREFER_USERSPACE_ENV: &str = "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD";
/// A get of 10,000 peers takes wireguard-go well under a second; anything
/// slower means the process is wedged.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// wireguard-go creates its socket within milliseconds; a loaded router may
/// need a few seconds.
const STARTUP_DEADLINE: Duration = Duration::from_secs(10);
/// After SIGTERM wireguard-go closes the TUN device and removes its socket.
const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(5);
const POLL_STEP: Duration = Duration::from_millis(10);

pub fn default_command() -> Vec<String> {
    vec!["wireguard-go".to_string(), "-f".to_string()]
}

pub struct UserspaceBackend {
    /// Program and arguments; the interface name is appended.
    command: Vec<String>,
    socket_dir: PathBuf,
    log_dir: PathBuf,
    request_deadline: Duration,
    /// Processes this backend started, by interface, so their death is noticed.
    children: Vec<(String, Child)>,
}

impl UserspaceBackend {
    /// A backend starting `command` (default `wireguard-go -f`) for new interfaces.
    pub fn new(command: Option<Vec<String>>) -> Result<UserspaceBackend> {
        let command = command.unwrap_or_else(default_command);
        if command.is_empty() || command[0].is_empty() {
            bail!("userspace_command is empty: name a program such as wireguard-go");
        }
        Ok(UserspaceBackend {
            command,
            socket_dir: PathBuf::from(SOCKET_DIR),
            log_dir: PathBuf::from(LOG_DIR),
            request_deadline: REQUEST_DEADLINE,
            children: Vec::new(),
        })
    }

    /// For tests: sockets and logs somewhere else, a shorter deadline.
    pub fn with_dirs(mut self, socket_dir: &Path, log_dir: &Path, deadline: Duration) -> UserspaceBackend {
        self.socket_dir = socket_dir.to_path_buf();
        self.log_dir = log_dir.to_path_buf();
        self.request_deadline = deadline;
        self
    }

    /// The program name, for messages ("wireguard-go").
    pub fn program(&self) -> &str {
        &self.command[0]
    }

    pub fn socket_path(&self, ifname: &str) -> PathBuf {
        self.socket_dir.join(format!("{ifname}.sock"))
    }

    /// Like [`Backend::check_alive`], naming the interface.
    pub fn check_alive_named(&mut self) -> Option<(String, ExitStatus)> {
        let pos = self
            .children
            .iter_mut()
            .position(|(_, c)| matches!(c.try_wait(), Ok(Some(_))))?;
        let (name, mut child) = self.children.remove(pos);
        let status = child.try_wait().ok().flatten()?;
        Some((name, status))
    }

    fn connect(&self, ifname: &str) -> Result<UnixStream> {
        let path = self.socket_path(ifname);
        let stream =
            UnixStream::connect(&path).with_context(|| format!("connecting to {}", path.display()))?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }

    /// One request, one response, within the deadline.
    fn request(&self, ifname: &str, request: &[u8]) -> Result<Vec<u8>> {
        let deadline = Instant::now() + self.request_deadline;
        let mut stream = self.connect(ifname)?;
        let mut written = 0;
        while written < request.len() {
            match stream.write(&request[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    wait_ready(&stream, libc::POLLOUT, deadline, self.request_deadline)?
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                // The implementation may reject a request half-way, answer and
                // close; its answer (the errno) is what explains why.
                Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => break,
                Err(e) => return Err(e).context("writing the request"),
            }
        }
        let mut response = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            // Every response ends with a blank line (`errno=N\n\n`); nothing before it is empty.
            if response.ends_with(b"\n\n") {
                return Ok(response);
            }
            if response.len() > uapi::MAX_RESPONSE_BYTES {
                bail!("response larger than {} bytes", uapi::MAX_RESPONSE_BYTES);
            }
            match stream.read(&mut buf) {
                Ok(0) if response.is_empty() => bail!("connection closed without an answer"),
                Ok(0) => bail!("connection closed in the middle of the answer"),
                Ok(n) => response.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    wait_ready(&stream, libc::POLLIN, deadline, self.request_deadline)?
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e).context("reading the answer"),
            }
        }
    }

    /// Finds the process serving the socket: the peer credentials of a
    /// connection are those of the process that created the listening socket.
    fn server_pid(&self, ifname: &str) -> Result<libc::pid_t> {
        let stream = self.connect(ifname)?;
        let cred = crate::peercred::peer_credentials(stream.as_raw_fd())
            .context("reading the socket's owner (SO_PEERCRED)")?;
        if cred.pid <= 0 {
            bail!(
                "the process serving {} is not visible here",
                self.socket_path(ifname).display()
            );
        }
        Ok(cred.pid)
    }

    fn wait_gone(&mut self, ifname: &str, deadline: Instant) -> bool {
        loop {
            self.reap(ifname);
            if !self.connectable(ifname) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(POLL_STEP);
        }
    }

    fn reap(&mut self, ifname: &str) {
        if let Some(pos) = self.children.iter().position(|(n, _)| n == ifname)
            && matches!(self.children[pos].1.try_wait(), Ok(Some(_)))
        {
            self.children.remove(pos);
        }
    }

    /// SIGTERM to the serving process, then wait for its socket to go.
    fn terminate(&mut self, ifname: &str) -> Result<()> {
        let pid = self.server_pid(ifname)?;
        if !process_mentions(pid, ifname) {
            bail!("process {pid} serving the socket does not look like a WireGuard implementation for it");
        }
        // SAFETY: plain syscall on a pid we just identified.
        if unsafe { libc::kill(pid, libc::SIGTERM) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("signalling process {pid}"));
        }
        if !self.wait_gone(ifname, Instant::now() + SHUTDOWN_DEADLINE) {
            bail!(
                "process {pid} still serves {} {} s after SIGTERM",
                self.socket_path(ifname).display(),
                SHUTDOWN_DEADLINE.as_secs()
            );
        }
        Ok(())
    }

    /// Deletes the TUN link in this network namespace, then waits for the socket to go.
    fn delete_link(&mut self, ifname: &str) -> Result<()> {
        let mut rtnl = crate::netlink::Rtnl::open()?;
        let index = rtnl
            .link_index(ifname)?
            .with_context(|| format!("no link {ifname} in this network namespace"))?;
        rtnl.delete_link(index)?;
        if !self.wait_gone(ifname, Instant::now() + SHUTDOWN_DEADLINE) {
            bail!(
                "{} still served {} s after deleting the link",
                self.socket_path(ifname).display(),
                SHUTDOWN_DEADLINE.as_secs()
            );
        }
        Ok(())
    }

    /// Collects our own child's exit status once it has removed its socket,
    /// so no zombie is left behind while this process lives on.
    fn reap_exiting(&mut self, ifname: &str, deadline: Instant) {
        while self.children.iter().any(|(n, _)| n == ifname) && Instant::now() < deadline {
            self.reap(ifname);
            std::thread::sleep(POLL_STEP);
        }
    }

    fn connectable(&self, ifname: &str) -> bool {
        UnixStream::connect(self.socket_path(ifname)).is_ok()
    }

    /// One log per interface, appended to: what the implementation said
    /// before it died is kept for the next start to append to; a clean
    /// stop removes it (see [`Backend::delete`]), so the logs of interfaces
    /// that come and go do not pile up.
    fn log_path(&self, ifname: &str) -> PathBuf {
        self.log_dir.join(format!("{ifname}-userspace.log"))
    }

    fn open_log(&self, ifname: &str) -> Result<(std::fs::File, PathBuf)> {
        std::fs::create_dir_all(&self.log_dir)
            .with_context(|| format!("creating {}", self.log_dir.display()))?;
        let path = self.log_path(ifname);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        Ok((file, path))
    }
}

/// Waits until the socket is ready for `events` or the deadline passes.
fn wait_ready(stream: &UnixStream, events: libc::c_short, deadline: Instant, total: Duration) -> Result<()> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer within {:.1} s", total.as_secs_f64());
        }
        let mut pfd = libc::pollfd {
            fd: stream.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            return Ok(());
        }
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                return Err(e).context("waiting for the socket");
            }
        }
    }
}

/// The last non-empty line of a log, to explain why a process died.
fn last_log_line(path: &Path) -> Option<String> {
    let text = std::fs::read(path).ok()?;
    let tail = &text[text.len().saturating_sub(4096)..];
    String::from_utf8_lossy(tail)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

impl Backend for UserspaceBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Userspace
    }

    /// The exit status of a process this backend started that has died since
    /// (it is then forgotten), `None` while all are running.
    fn check_alive(&mut self) -> Option<ExitStatus> {
        let (ifname, status) = self.check_alive_named()?;
        log!(
            "warren: {ifname}: userspace WireGuard `{}` exited ({status})",
            self.program()
        );
        Some(status)
    }

    fn exists(&mut self, ifname: &str) -> Result<bool> {
        Ok(self.connectable(ifname))
    }

    fn create(&mut self, ifname: &str) -> Result<()> {
        if self.connectable(ifname) {
            bail!("{ifname}: a userspace WireGuard interface of this name already exists");
        }
        let program = self.command[0].clone();
        let (log, log_path) = self.open_log(ifname)?;
        let mut cmd = Command::new(&program);
        cmd.args(&self.command[1..])
            .arg(ifname)
            .env(PREFER_USERSPACE_ENV, "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log file")?)
            .stderr(log);
        // Its own session: the interface outlives a short-lived `warren wg
        // apply` and the terminal's signals (^C, hangup) do not reach it.
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The agent blocks its stop signals (src/signals.rs); this one must not.
                crate::signals::clear_mask_in_child()
            });
        }
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == ErrorKind::NotFound {
                anyhow!(
                    "userspace WireGuard implementation `{program}` not found in PATH \
                     (install {program} or use the kernel backend)"
                )
            } else {
                anyhow!("{ifname}: starting `{program}`: {e}")
            }
        })?;
        self.children.push((ifname.to_string(), child));
        let deadline = Instant::now() + STARTUP_DEADLINE;
        loop {
            if self.connectable(ifname) {
                return Ok(());
            }
            let pos = self.children.len() - 1;
            if let Ok(Some(status)) = self.children[pos].1.try_wait() {
                self.children.pop();
                let why = last_log_line(&log_path)
                    .map(|l| format!(": {l}"))
                    .unwrap_or_default();
                bail!("{ifname}: `{program}` exited ({status}) before its UAPI socket appeared{why}");
            }
            if Instant::now() >= deadline {
                let (_, mut child) = self.children.pop().expect("pushed above");
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{ifname}: `{program}` did not create {} within {} s; stopped it (log: {})",
                    self.socket_path(ifname).display(),
                    STARTUP_DEADLINE.as_secs(),
                    log_path.display()
                );
            }
            std::thread::sleep(POLL_STEP);
        }
    }

    /// Sends SIGTERM to the process serving the interface's socket (found by
    /// SO_PEERCRED, so it works for processes another `warren` started and in
    /// any network namespace); wireguard-go and boringtun then close the TUN
    /// device, which removes the link, and their socket. When that does not
    /// work (process invisible here, or ignoring SIGTERM) the link is deleted
    /// over rtnetlink, which also makes wireguard-go exit.
    fn delete(&mut self, ifname: &str) -> Result<()> {
        if !self.connectable(ifname) {
            bail!("no WireGuard interface {ifname:?}");
        }
        let result = match self.terminate(ifname) {
            Ok(()) => Ok(()),
            Err(signal) => self
                .delete_link(ifname)
                .map_err(|link| anyhow!("deleting {ifname}: {signal:#}; {link:#}")),
        };
        self.reap_exiting(ifname, Instant::now() + SHUTDOWN_DEADLINE);
        if result.is_ok() {
            let _ = std::fs::remove_file(self.log_path(ifname));
        }
        result
    }

    fn get(&mut self, ifname: &str) -> Result<DeviceState> {
        let response = self
            .request(ifname, b"get=1\n\n")
            .with_context(|| format!("{ifname}: UAPI get"))?;
        uapi::parse_get(&response).with_context(|| format!("{ifname}: UAPI get"))
    }

    fn set(&mut self, ifname: &str, update: &DeviceUpdate) -> Result<WireCost> {
        if update.is_empty() {
            return Ok(WireCost::default());
        }
        let request = uapi::encode_set(update);
        let response = self
            .request(ifname, request.as_bytes())
            .with_context(|| format!("{ifname}: UAPI set"))?;
        match uapi::parse_errno(&response).with_context(|| format!("{ifname}: UAPI set"))? {
            0 => Ok(WireCost {
                messages: 1,
                bytes: request.len(),
            }),
            n => Err(uapi::errno_error(n)).with_context(|| format!("{ifname}: UAPI set")),
        }
    }
}

/// Guards against a recycled pid: the process must have the interface name
/// on its command line (wireguard-go IF, boringtun-cli IF).
fn process_mentions(pid: libc::pid_t, ifname: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).any(|arg| arg == ifname.as_bytes()))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicU32, Ordering};

    static COUNTER: AtomicU32 = AtomicU32::new(0);

    fn temp_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "warren-uapi-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A fake UAPI server answering the first connection that sends a
    /// request with `answer`; connections closed without one (`exists`) are skipped.
    fn serve(dir: &Path, ifname: &str, answer: &'static [u8]) -> std::thread::JoinHandle<Vec<u8>> {
        let listener = UnixListener::bind(dir.join(format!("{ifname}.sock"))).unwrap();
        std::thread::spawn(move || {
            loop {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while !req.ends_with(b"\n\n") {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    req.extend_from_slice(&buf[..n]);
                }
                if req.is_empty() {
                    continue;
                }
                s.write_all(answer).unwrap();
                // Keep the connection open like wireguard-go, which waits for more requests.
                std::thread::sleep(Duration::from_millis(200));
                return req;
            }
        })
    }

    fn backend(dir: &Path, deadline: Duration) -> UserspaceBackend {
        UserspaceBackend::new(None).unwrap().with_dirs(dir, dir, deadline)
    }

    #[test]
    fn get_over_a_socket() {
        let dir = temp_dir();
        let server = serve(&dir, "wgt0", b"listen_port=5\nerrno=0\n\n");
        let mut b = backend(&dir, Duration::from_secs(5));
        assert!(b.exists("wgt0").unwrap());
        let d = b.get("wgt0").unwrap();
        assert_eq!(d.listen_port, 5);
        assert_eq!(server.join().unwrap(), b"get=1\n\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn set_errno_names_interface_and_errno() {
        let dir = temp_dir();
        let server = serve(&dir, "wgt1", b"errno=-22\n\n");
        let mut b = backend(&dir, Duration::from_secs(5));
        let u = DeviceUpdate {
            listen_port: Some(1),
            ..Default::default()
        };
        let err = format!("{:#}", b.set("wgt1", &u).unwrap_err());
        assert_eq!(err, "wgt1: UAPI set: errno 22 (Invalid argument)");
        assert_eq!(server.join().unwrap(), b"set=1\nlisten_port=1\n\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn silent_server_hits_the_deadline() {
        let dir = temp_dir();
        let listener = UnixListener::bind(dir.join("wgt2.sock")).unwrap();
        let mut b = backend(&dir, Duration::from_millis(200));
        let start = Instant::now();
        let err = format!("{:#}", b.get("wgt2").unwrap_err());
        assert!(err.starts_with("wgt2: UAPI get: no answer within"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn closed_connection_is_an_error() {
        let dir = temp_dir();
        let listener = UnixListener::bind(dir.join("wgt3.sock")).unwrap();
        let t = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).unwrap();
            s.write_all(b"listen_port=5\n").unwrap();
        });
        let mut b = backend(&dir, Duration::from_secs(5));
        let err = format!("{:#}", b.get("wgt3").unwrap_err());
        assert!(err.contains("closed in the middle"), "{err}");
        t.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_interface_is_not_there() {
        let dir = temp_dir();
        let mut b = backend(&dir, Duration::from_secs(1));
        assert!(!b.exists("nope0").unwrap());
        assert_eq!(
            format!("{:#}", b.delete("nope0").unwrap_err()),
            "no WireGuard interface \"nope0\""
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn delete_never_signals_an_unrelated_process() {
        let dir = temp_dir();
        // The socket's owner is this test process, whose command line does not name the interface.
        let listener = UnixListener::bind(dir.join("wgt7.sock")).unwrap();
        let mut b = backend(&dir, Duration::from_secs(1));
        let err = format!("{:#}", b.delete("wgt7").unwrap_err());
        assert!(
            err.starts_with(&format!(
                "deleting wgt7: process {} serving the socket does not look like a WireGuard implementation",
                std::process::id()
            )),
            "{err}"
        );
        drop(listener);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_program_is_one_clear_line() {
        let dir = temp_dir();
        let mut b = UserspaceBackend::new(Some(vec!["warren-no-such-wireguard".into()]))
            .unwrap()
            .with_dirs(&dir, &dir, Duration::from_secs(1));
        let err = format!("{:#}", b.create("wgt4").unwrap_err());
        assert_eq!(
            err,
            "userspace WireGuard implementation `warren-no-such-wireguard` not found in PATH \
             (install warren-no-such-wireguard or use the kernel backend)"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn early_exit_is_reported_with_the_log() {
        let dir = temp_dir();
        let mut b = UserspaceBackend::new(Some(vec![
            "sh".into(),
            "-c".into(),
            "echo \"cannot open tun for $0\" >&2; exit 3".into(),
        ]))
        .unwrap()
        .with_dirs(&dir, &dir, Duration::from_secs(1));
        let err = format!("{:#}", b.create("wgt5").unwrap_err());
        assert_eq!(
            err,
            "wgt5: `sh` exited (exit status: 3) before its UAPI socket appeared: cannot open tun for wgt5"
        );
        assert!(b.check_alive().is_none(), "a failed start is not supervised");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_dead_child_is_noticed() {
        let dir = temp_dir();
        let sock = dir.join("wgt6.sock");
        // A stand-in implementation: serves the socket briefly, then dies.
        let script = format!(
            "python3 -c 'import socket,time; s=socket.socket(socket.AF_UNIX); s.bind(\"{}\"); s.listen(); time.sleep(0.5)'; exit 4",
            sock.display()
        );
        let mut b = UserspaceBackend::new(Some(vec!["sh".into(), "-c".into(), script]))
            .unwrap()
            .with_dirs(&dir, &dir, Duration::from_secs(1));
        if b.create("wgt6").is_err() {
            // No python3 here: nothing to supervise.
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
        assert!(b.check_alive().is_none());
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = b.check_alive() {
                break s;
            }
            assert!(Instant::now() < deadline, "child death not noticed");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(4));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! The HTTP/1.1 a UPnP gateway speaks: a GET for its description and POSTs
//! for SOAP calls, one request per connection (`Connection: close`), to an
//! IPv4 address on the LAN. Never through a proxy: the environment's
//! `http_proxy` names a way to the internet, not to the router. Every
//! request is bounded by a deadline (connect, send and the whole answer) and
//! the answer by [`MAX_ANSWER`] bytes.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpStream};
use std::time::Instant;

/// A description or SOAP answer larger than this is refused: real ones are
/// a few KiB (a big router's description about 30 KiB).
pub const MAX_ANSWER: usize = 128 * 1024;
/// Request paths and header values from a router longer than this are
/// refused before anything is sent.
pub const MAX_PATH: usize = 1024;
const DEFAULT_PORT: u16 = 80;

/// `http://a.b.c.d[:port]/path`: the only URLs a gateway may name. A host
/// name would need a resolver, and HTTPS a TLS stack, for no gateway we know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub addr: SocketAddrV4,
    /// Starts with '/'; no spaces or control characters.
    pub path: String,
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "http://{}{}", self.addr, self.path)
    }
}

impl Url {
    pub fn parse(text: &str) -> Result<Url, String> {
        let text = text.trim();
        let shown = || format!("{:?}", shorten(text));
        let rest = text
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
            .map(|_| &text[7..])
            .ok_or_else(|| format!("{} is not an http:// URL", shown()))?;
        let (authority, path) = match rest.find(['/', '?', '#']) {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().ok().filter(|p| *p != 0)),
            None => (authority, Some(DEFAULT_PORT)),
        };
        let port = port.ok_or_else(|| format!("{}: bad port", shown()))?;
        let ip: Ipv4Addr = host
            .parse()
            .map_err(|_| format!("{}: the host is not an IPv4 address", shown()))?;
        Url::at(SocketAddrV4::new(ip, port), path)
    }

    /// `path` on `addr`: an absolute path, or a relative one taken from the root.
    pub fn at(addr: SocketAddrV4, path: &str) -> Result<Url, String> {
        let path = path.trim();
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        if path.len() > MAX_PATH || path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(format!("{:?} is not a usable URL path", shorten(&path)));
        }
        Ok(Url { addr, path })
    }
}

/// The first 60 characters of `s`: a router's text in our messages.
pub fn shorten(s: &str) -> &str {
    match s.char_indices().nth(60) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
}

/// GET `url`, the answer whole, by `deadline`.
pub fn get(url: &Url, deadline: Instant) -> Result<Answer, String> {
    let head = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: {}\r\n\r\n",
        url.path,
        url.addr,
        user_agent()
    );
    exchange(url.addr, head.as_bytes(), deadline)
}

/// POST `body` to `url` with `headers` (name, value) besides Host,
/// Content-Length and Connection.
pub fn post(url: &Url, headers: &[(&str, &str)], body: &str, deadline: Instant) -> Result<Answer, String> {
    let mut request = format!("POST {} HTTP/1.1\r\nHost: {}\r\n", url.path, url.addr);
    for (name, value) in headers {
        if value.len() > MAX_PATH || value.contains(['\r', '\n']) {
            return Err(format!("header {name} would not be one line"));
        }
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\nUser-Agent: {}\r\n\r\n{body}",
        body.len(),
        user_agent()
    ));
    exchange(url.addr, request.as_bytes(), deadline)
}

fn user_agent() -> String {
    format!("Linux UPnP/1.1 warren/{}", env!("CARGO_PKG_VERSION"))
}

fn exchange(to: SocketAddrV4, request: &[u8], deadline: Instant) -> Result<Answer, String> {
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| "no answer in time".to_string())
    };
    let io_error = |what: &str, e: io::Error| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no answer in time".to_string(),
        _ => format!("{what}: {e}"),
    };
    let mut stream =
        TcpStream::connect_timeout(&to.into(), left()?).map_err(|e| io_error("connecting", e))?;
    stream
        .set_write_timeout(Some(left()?))
        .and_then(|()| stream.write_all(request))
        .map_err(|e| io_error("sending", e))?;
    let mut answer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        stream
            .set_read_timeout(Some(left()?))
            .map_err(|e| io_error("reading", e))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_error("reading", e)),
        };
        answer.extend_from_slice(&chunk[..n]);
        if let Some(done) = parse_answer(&answer, n == 0)? {
            return Ok(done);
        }
        if answer.len() > MAX_ANSWER {
            return Err(format!("answer over {} KiB", MAX_ANSWER / 1024));
        }
    }
}

/// An answer from its first bytes: None while more are needed (and
/// `eof` is false). The body is complete by Content-Length, by the last
/// chunk, or, with neither, by the end of the connection.
pub fn parse_answer(bytes: &[u8], eof: bool) -> Result<Option<Answer>, String> {
    let cut_short = || Err("answer cut short".to_string());
    let Some(head_end) = find(bytes, b"\r\n\r\n") else {
        if bytes.len() > MAX_ANSWER {
            return Err("no end of the answer's header".into());
        }
        return if eof { cut_short() } else { Ok(None) };
    };
    let head = std::str::from_utf8(&bytes[..head_end]).map_err(|_| "not HTTP: binary header".to_string())?;
    let body = &bytes[head_end + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5).filter(|_| rest.as_bytes().get(1) == Some(&b' ')))
        .and_then(|code| code.parse::<u16>().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or_else(|| format!("not HTTP: {:?}", shorten(status_line)))?;
    let mut length: Option<usize> = None;
    let mut chunked = false;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {:?}", shorten(line)))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .parse::<usize>()
                .map_err(|_| format!("bad Content-Length {:?}", shorten(value)))?;
            if length.is_some_and(|l| l != n) {
                return Err("two different Content-Lengths".into());
            }
            length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
            if !chunked {
                return Err(format!("unknown Transfer-Encoding {:?}", shorten(value)));
            }
        }
    }
    let answer = |body: Vec<u8>| Ok(Some(Answer { status, body }));
    if chunked {
        return match dechunk(body)? {
            Some(body) => answer(body),
            None if eof => cut_short(),
            None => Ok(None),
        };
    }
    match length {
        Some(n) if n > MAX_ANSWER => Err(format!("answer over {} KiB", MAX_ANSWER / 1024)),
        Some(n) if body.len() >= n => answer(body[..n].to_vec()),
        Some(_) if eof => cut_short(),
        Some(_) => Ok(None),
        None if eof => answer(body.to_vec()),
        None => Ok(None),
    }
}

/// A chunked body: None until its last (empty) chunk has arrived.
fn dechunk(mut bytes: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = find(bytes, b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&bytes[..line_end]).unwrap_or("?");
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16)
            .ok()
            .filter(|s| *s <= MAX_ANSWER)
            .ok_or_else(|| format!("bad chunk size {:?}", shorten(line)))?;
        bytes = &bytes[line_end + 2..];
        if size == 0 {
            // Trailers, if any, are not read: the body is whole.
            return Ok(Some(body));
        }
        if bytes.len() < size + 2 {
            return Ok(None);
        }
        if &bytes[size..size + 2] != b"\r\n" {
            return Err("chunk without its CRLF".into());
        }
        body.extend_from_slice(&bytes[..size]);
        if body.len() > MAX_ANSWER {
            return Err(format!("answer over {} KiB", MAX_ANSWER / 1024));
        }
        bytes = &bytes[size + 2..];
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// For the fuzz target: any bytes, as a whole answer and cut at every
/// length, never panic, and a complete answer stays the same once more
/// bytes are known to follow (a stream is read in pieces).
pub fn fuzz_parse(bytes: &[u8]) -> bool {
    let whole = parse_answer(bytes, true);
    if let Ok(Some(answer)) = parse_answer(bytes, false) {
        assert_eq!(whole.as_ref().ok().and_then(|a| a.as_ref()), Some(&answer));
    }
    whole.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::Duration;

    fn at(ip: [u8; 4], port: u16, path: &str) -> Url {
        Url {
            addr: SocketAddrV4::new(ip.into(), port),
            path: path.into(),
        }
    }

    #[test]
    fn urls_are_http_to_an_ipv4_address() {
        assert_eq!(
            Url::parse("http://10.1.0.1:5000/rootDesc.xml").unwrap(),
            at([10, 1, 0, 1], 5000, "/rootDesc.xml")
        );
        assert_eq!(
            Url::parse(" HTTP://192.168.1.1 ").unwrap(),
            at([192, 168, 1, 1], 80, "/")
        );
        assert_eq!(
            Url::parse("http://192.168.1.1:49000?x").unwrap(),
            at([192, 168, 1, 1], 49000, "/?x")
        );
        for bad in [
            "https://10.1.0.1/",
            "http://router.lan/desc.xml",
            "http://[fe80::1]:5000/",
            "http://10.1.0.1:0/",
            "http://10.1.0.1:99999/",
            "http://10.1.0.1:5000/a b",
            "ftp://10.1.0.1/",
            "http:/",
            "",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad:?}");
        }
        let a = SocketAddrV4::new([10, 0, 0, 1].into(), 80);
        assert_eq!(Url::at(a, "ctl/IPConn").unwrap().path, "/ctl/IPConn");
        assert!(Url::at(a, &"x".repeat(MAX_PATH + 1)).is_err());
    }

    #[test]
    fn answers_by_length_chunks_or_close() {
        let ok = |body: &[u8]| {
            Some(Answer {
                status: 200,
                body: body.to_vec(),
            })
        };
        let a = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhelloEXTRA";
        assert_eq!(parse_answer(a, false).unwrap(), ok(b"hello"));
        assert_eq!(parse_answer(&a[..40], false).unwrap(), None);
        assert!(parse_answer(&a[..40], true).is_err());
        let c = b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n3;x=1\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
        assert_eq!(parse_answer(c, false).unwrap(), ok(b"hello"));
        assert_eq!(parse_answer(&c[..c.len() - 5], false).unwrap(), None);
        let e = b"HTTP/1.0 500 Internal Server Error\r\nServer: x\r\n\r\nbody";
        assert_eq!(parse_answer(e, false).unwrap(), None);
        assert_eq!(
            parse_answer(e, true).unwrap(),
            Some(Answer {
                status: 500,
                body: b"body".to_vec()
            })
        );
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\n",
        ] {
            assert!(
                parse_answer(bad, true).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(fuzz_parse(a) && !fuzz_parse(b"junk"));
    }

    /// A local server that reads a request, then runs `answer` on the stream.
    fn serve(answer: impl FnOnce(TcpStream) + Send + 'static) -> (Url, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = match listener.local_addr().unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut request = vec![0u8; 8192];
            let n = s.read(&mut request).unwrap();
            answer(s);
            String::from_utf8_lossy(&request[..n]).into_owned()
        });
        (Url::at(addr, "/ctl").unwrap(), server)
    }

    #[test]
    fn posts_and_reads_the_answer() {
        let (url, server) = serve(|mut s| {
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .unwrap();
            // Keeps the connection open: the length says the answer is whole.
            std::thread::sleep(Duration::from_millis(300));
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = post(&url, &[("SOAPAction", "\"urn#X\"")], "<x/>", deadline).unwrap();
        assert_eq!(
            got,
            Answer {
                status: 200,
                body: b"ok".to_vec()
            }
        );
        let request = server.join().unwrap();
        assert!(
            request.starts_with("POST /ctl HTTP/1.1\r\nHost: 127.0.0.1:"),
            "{request}"
        );
        assert!(
            request.contains("\r\nSOAPAction: \"urn#X\"\r\nContent-Length: 4\r\n"),
            "{request}"
        );
        assert!(request.ends_with("\r\n\r\n<x/>"), "{request}");
        assert!(post(&url, &[("X", "a\r\nb")], "", deadline).is_err());
    }

    #[test]
    fn a_silent_server_costs_the_deadline_and_no_more() {
        let (url, server) = serve(|_s| std::thread::sleep(Duration::from_secs(2)));
        let started = Instant::now();
        let err = get(&url, started + Duration::from_millis(300)).unwrap_err();
        assert_eq!(err, "no answer in time");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        server.join().unwrap();
    }

    #[test]
    fn an_endless_answer_is_cut_off() {
        let (url, server) = serve(|mut s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n\r\n");
            let junk = vec![b'x'; 16 * 1024];
            for _ in 0..(MAX_ANSWER / junk.len() + 8) {
                if s.write_all(&junk).is_err() {
                    break;
                }
            }
        });
        let err = get(&url, Instant::now() + Duration::from_secs(10)).unwrap_err();
        assert!(err.starts_with("answer over"), "{err}");
        server.join().unwrap();
    }

    #[test]
    fn a_refused_connection_says_so() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let url = Url::parse(&format!("http://{addr}/")).unwrap();
        let err = get(&url, Instant::now() + Duration::from_secs(5)).unwrap_err();
        assert!(err.starts_with("connecting: "), "{err}");
    }
}

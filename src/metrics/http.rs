//! The little HTTP/1.1 a scrape needs: one request line and headers in,
//! one answer out, connection closed. Only `GET /metrics` (and `HEAD`) is
//! served; anything else is answered with its status code and no body.

/// Request line and headers together at most; Prometheus sends about 300 bytes.
pub const MAX_REQUEST_LEN: usize = 4096;
/// The path served.
pub const METRICS_PATH: &str = "/metrics";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Not all of the head yet.
    Incomplete,
    /// `GET /metrics` (`head`: without the body).
    Metrics { head: bool },
    /// Answered with this status and closed.
    Refuse(Status),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    BadRequest,
    NotFound,
    MethodNotAllowed,
    TooLarge,
}

impl Status {
    fn line(self) -> &'static str {
        match self {
            Status::BadRequest => "400 Bad Request",
            Status::NotFound => "404 Not Found",
            Status::MethodNotAllowed => "405 Method Not Allowed",
            Status::TooLarge => "431 Request Header Fields Too Large",
        }
    }
}

/// Reads what a client sent so far. Only the head matters: a request with
/// a body is not one we serve, and the connection closes after the answer.
pub fn parse(input: &[u8]) -> Request {
    let Some(end) = head_end(input) else {
        return if input.len() >= MAX_REQUEST_LEN {
            Request::Refuse(Status::TooLarge)
        } else {
            Request::Incomplete
        };
    };
    if end > MAX_REQUEST_LEN {
        return Request::Refuse(Status::TooLarge);
    }
    let head = &input[..end];
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let line = head[..line_end].strip_suffix(b"\r").unwrap_or(&head[..line_end]);
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Refuse(Status::BadRequest);
    };
    if !matches!(version, b"HTTP/1.0" | b"HTTP/1.1") || target.is_empty() {
        return Request::Refuse(Status::BadRequest);
    }
    let head_only = match method {
        b"GET" => false,
        b"HEAD" => true,
        m if m.iter().all(u8::is_ascii_uppercase) && !m.is_empty() => {
            return Request::Refuse(Status::MethodNotAllowed);
        }
        _ => return Request::Refuse(Status::BadRequest),
    };
    // A query string (`?name[]=…`) is ignored: every family is always sent.
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path != METRICS_PATH.as_bytes() {
        return Request::Refuse(Status::NotFound);
    }
    Request::Metrics { head: head_only }
}

/// Where the head ends (past the blank line), accepting bare `\n` line ends.
fn head_end(input: &[u8]) -> Option<usize> {
    let mut prev_newline = false;
    for (i, &b) in input.iter().enumerate() {
        match b {
            b'\n' if prev_newline => return Some(i + 1),
            b'\n' => prev_newline = true,
            b'\r' => {}
            _ => prev_newline = false,
        }
    }
    None
}

/// The whole answer to a scrape.
pub fn ok(body: &str, head: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        super::encode::CONTENT_TYPE,
        body.len()
    )
    .into_bytes();
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

pub fn refusal(status: Status) -> Vec<u8> {
    let allow = if status == Status::MethodNotAllowed {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    format!(
        "HTTP/1.1 {}\r\n{allow}Content-Length: 0\r\nConnection: close\r\n\r\n",
        status.line()
    )
    .into_bytes()
}

/// For the fuzz target: any bytes, any split, never a panic, and the same
/// answer whether the head came at once or byte by byte.
pub fn fuzz_parse(data: &[u8]) {
    let whole = parse(data);
    let mut seen = Request::Incomplete;
    for n in 0..=data.len() {
        seen = parse(&data[..n]);
        if seen != Request::Incomplete {
            break;
        }
    }
    assert_eq!(seen, whole);
    if let Request::Refuse(s) = whole {
        let _ = refusal(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prometheus_scrape_is_served() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9101\r\nUser-Agent: Prometheus/2.45.0\r\n\
                    Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n\r\n";
        assert_eq!(parse(req), Request::Metrics { head: false });
        assert_eq!(
            parse(b"GET /metrics?x=1 HTTP/1.0\n\n"),
            Request::Metrics { head: false }
        );
        assert_eq!(
            parse(b"HEAD /metrics HTTP/1.1\r\n\r\n"),
            Request::Metrics { head: true }
        );
    }

    #[test]
    fn a_request_in_pieces_waits_for_its_blank_line() {
        let req = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
        for n in 0..req.len() {
            assert_eq!(parse(&req[..n]), Request::Incomplete, "{n}");
        }
        assert_eq!(parse(req), Request::Metrics { head: false });
    }

    #[test]
    fn everything_else_is_refused_with_its_status() {
        assert_eq!(
            parse(b"GET / HTTP/1.1\r\n\r\n"),
            Request::Refuse(Status::NotFound)
        );
        assert_eq!(
            parse(b"GET /metricsx HTTP/1.1\r\n\r\n"),
            Request::Refuse(Status::NotFound)
        );
        assert_eq!(
            parse(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Request::Refuse(Status::MethodNotAllowed)
        );
        assert_eq!(
            parse(b"GET /metrics\r\n\r\n"),
            Request::Refuse(Status::BadRequest)
        );
        assert_eq!(
            parse(b"GET /metrics HTTP/2\r\n\r\n"),
            Request::Refuse(Status::BadRequest)
        );
        assert_eq!(
            parse(b"\x16\x03\x01\x00\n\n"),
            Request::Refuse(Status::BadRequest)
        );
        assert_eq!(parse(&[b'a'; MAX_REQUEST_LEN]), Request::Refuse(Status::TooLarge));
        let mut long = b"GET /metrics HTTP/1.1\r\n".to_vec();
        long.resize(MAX_REQUEST_LEN + 10, b'x');
        long.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse(&long), Request::Refuse(Status::TooLarge));
    }

    #[test]
    fn answers_are_complete_http() {
        let a = String::from_utf8(ok("x 1\n", false)).unwrap();
        assert!(a.starts_with("HTTP/1.1 200 OK\r\n"), "{a}");
        assert!(a.contains("Content-Length: 4\r\n"), "{a}");
        assert!(a.ends_with("\r\n\r\nx 1\n"), "{a}");
        assert!(
            String::from_utf8(ok("x 1\n", true))
                .unwrap()
                .ends_with("\r\n\r\n")
        );
        let r = String::from_utf8(refusal(Status::NotFound)).unwrap();
        assert!(r.starts_with("HTTP/1.1 404 Not Found\r\n"), "{r}");
        fuzz_parse(b"GET /metrics HTTP/1.1\r\n\r\n");
        fuzz_parse(b"\n\n\r\n");
    }
}

//! SSDP (UPnP Device Architecture 1.1, section 1.3): an M-SEARCH multicast
//! for Internet Gateway Devices, and the unicast answers that name the
//! device description's URL. An answer is believed only if that URL is on
//! the address the answer came from: another LAN host cannot point us at a
//! third one.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

use super::http::{Url, shorten};

/// SSDP's multicast group and port.
pub const GROUP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(239, 255, 255, 250), 1900);
/// Both versions of the device are asked for: an IGDv2-only gateway may
/// not answer a search for v1, and an old one knows only v1.
pub const SEARCH_TARGETS: [&str; 2] = [
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
];
/// The MX header: devices spread their answers over this many seconds, so
/// it stays below the search's own time.
const MAX_WAIT_SECS: u32 = 1;

/// The M-SEARCH datagram for `target`.
pub fn search_request(target: &str) -> String {
    format!(
        "M-SEARCH * HTTP/1.1\r\nHOST: {GROUP}\r\nMAN: \"ssdp:discover\"\r\nMX: {MAX_WAIT_SECS}\r\nST: {target}\r\n\r\n"
    )
}

/// The description URL from one answer datagram received from `from`.
pub fn parse_answer(datagram: &[u8], from: SocketAddr) -> Result<Url, String> {
    let text = std::str::from_utf8(datagram).map_err(|_| format!("answer from {from} is not text"))?;
    let mut lines = text.split("\r\n");
    let status = lines.next().unwrap_or_default();
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        return Err(format!(
            "answer from {from} is not \"200 OK\": {:?}",
            shorten(status)
        ));
    }
    let mut location = None;
    for line in lines.take_while(|l| !l.is_empty()) {
        if let Some((name, value)) = line.split_once(':')
            && name.trim().eq_ignore_ascii_case("location")
        {
            location = Some(value.trim());
        }
    }
    let location = location.ok_or_else(|| format!("answer from {from} has no LOCATION"))?;
    let url = Url::parse(location).map_err(|e| format!("answer from {from}: LOCATION {e}"))?;
    if SocketAddr::V4(url.addr).ip() != from.ip() {
        return Err(format!(
            "answer from {from} names another host's description ({url})"
        ));
    }
    Ok(url)
}

/// For the fuzz target: an answer from any bytes never panics, and what it
/// names is on the host it came from (the lab's gateway, as in the fixture).
pub fn fuzz_parse(datagram: &[u8]) -> bool {
    let from = SocketAddr::from(([10, 1, 0, 1], 1900));
    match parse_answer(datagram, from) {
        Ok(url) => {
            assert_eq!(SocketAddr::V4(url.addr).ip(), from.ip());
            true
        }
        Err(why) => {
            assert!(!why.contains('\n'));
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's miniupnpd 2.3 sent the lab's LAN host.
    const MINIUPNPD: &[u8] = include_bytes!("fixtures/ssdp-miniupnpd.txt");

    #[test]
    fn reads_miniupnpds_answer() {
        let from = SocketAddr::from(([10, 1, 0, 1], 1900));
        let url = parse_answer(MINIUPNPD, from).unwrap();
        assert_eq!(url.to_string(), "http://10.1.0.1:5000/rootDesc.xml");
        let err = parse_answer(MINIUPNPD, SocketAddr::from(([10, 1, 0, 9], 1900))).unwrap_err();
        assert!(err.contains("another host"), "{err}");
    }

    #[test]
    fn refuses_answers_it_cannot_use() {
        let from = SocketAddr::from(([10, 1, 0, 1], 1900));
        for bad in [
            &b"NOTIFY * HTTP/1.1\r\nLOCATION: http://10.1.0.1/\r\n\r\n"[..],
            b"HTTP/1.1 404 Not Found\r\nLOCATION: http://10.1.0.1/\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nST: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nLocation: https://10.1.0.1/d.xml\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nLocation: http://gw.lan/d.xml\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n\r\nLOCATION: http://10.1.0.1/\r\n",
            b"\xff\xfe",
        ] {
            assert!(
                parse_answer(bad, from).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let lower = b"HTTP/1.1 200 OK\r\nlocation:http://10.1.0.1:49152/gw.xml\r\n\r\n";
        assert_eq!(parse_answer(lower, from).unwrap().path, "/gw.xml");
        assert!(fuzz_parse(
            b"HTTP/1.1 200 OK\r\nLOCATION: http://10.1.0.1/\r\n\r\n"
        ));
    }

    #[test]
    fn search_names_the_target() {
        let r = search_request(SEARCH_TARGETS[1]);
        assert!(r.starts_with("M-SEARCH * HTTP/1.1\r\nHOST: 239.255.255.250:1900\r\n"));
        assert!(r.contains("\r\nST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"));
        assert!(r.ends_with("\r\n\r\n"));
    }
}

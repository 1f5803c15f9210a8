//! The worker's [`Gateway`] calls against a real Internet Gateway Device:
//! an SSDP search, the device description over HTTP, then SOAP actions on
//! its WAN connection service; the `upnp` feature.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::time::Instant;

use super::description::{self, Service};
use super::http::{self, Url, shorten};
use super::{CallError, DISCOVER_TIMEOUT, Entry, Gateway, SOAP_TIMEOUT, soap, ssdp};

/// Descriptions fetched per search at most: a LAN rarely has two gateways,
/// and a host answering with many URLs should not hold the search up.
const MAX_LOCATIONS: usize = 4;
/// The search is sent again this far into [`DISCOVER_TIMEOUT`] if nothing
/// usable has answered: SSDP is UDP, and one datagram may be lost.
const RESEND_AFTER_HALVES: u32 = 2;
/// Hops for the M-SEARCH multicast (UDA 1.1 recommends 2): the gateway is
/// on this link or one behind it.
const SEARCH_TTL: u32 = 2;
const PROTOCOL: &str = "UDP";

struct IgdGateway {
    service: Service,
}

pub(super) fn search_igd() -> Result<Box<dyn Gateway>, String> {
    let started = Instant::now();
    let deadline = started + DISCOVER_TIMEOUT;
    let resend_at = started + DISCOVER_TIMEOUT / RESEND_AFTER_HALVES;
    let failed = |what: &str, e: io::Error| format!("UPnP gateway search: {what}: {e}");
    let socket =
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).map_err(|e| failed("binding a UDP socket", e))?;
    socket
        .set_multicast_ttl_v4(SEARCH_TTL)
        .map_err(|e| failed("setting the multicast TTL", e))?;
    // With an exit node in use, only the LAN's own prefix stays on the main
    // table: an unmarked multicast would take the exit's default route into
    // the mesh. (The gateway's unicast HTTP and SOAP stay on its LAN route.)
    crate::sockopt::mark_own(&socket);
    let send = || {
        for target in ssdp::SEARCH_TARGETS {
            socket
                .send_to(ssdp::search_request(target).as_bytes(), ssdp::GROUP)
                .map_err(|e| failed(&format!("sending to {}", ssdp::GROUP), e))?;
        }
        Ok::<(), String>(())
    };
    send()?;
    let mut resent = false;
    let mut fetched: Vec<Url> = Vec::new();
    let mut last_error = None;
    let mut datagram = [0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        if !resent && now >= resend_at {
            resent = true;
            send()?;
        }
        let wake = if resent { deadline } else { resend_at };
        socket
            .set_read_timeout(Some(wake.saturating_duration_since(now).max(MIN_WAIT)))
            .map_err(|e| failed("setting a timeout", e))?;
        let (n, from) = match socket.recv_from(&mut datagram) {
            Ok(got) => got,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(failed("receiving answers", e)),
        };
        let url = match ssdp::parse_answer(&datagram[..n], from) {
            Ok(url) => url,
            Err(why) => {
                last_error = Some(why);
                continue;
            }
        };
        // Each device answers both searches, and twice if they were resent.
        if fetched.contains(&url) || fetched.len() == MAX_LOCATIONS {
            continue;
        }
        fetched.push(url.clone());
        match fetch_description(&url, deadline) {
            Ok(service) => return Ok(Box::new(IgdGateway { service })),
            Err(why) => last_error = Some(why),
        }
    }
    Err(match last_error {
        None => format!("no UPnP gateway answered within {} s", DISCOVER_TIMEOUT.as_secs()),
        Some(why) => format!("UPnP gateway search: {why}"),
    })
}

/// A read timeout of zero means "none" to the socket: never ask for it.
const MIN_WAIT: std::time::Duration = std::time::Duration::from_millis(1);

fn fetch_description(url: &Url, deadline: Instant) -> Result<Service, String> {
    let answer = http::get(url, deadline).map_err(|e| format!("description at {url}: {e}"))?;
    if answer.status != 200 {
        return Err(format!("description at {url}: HTTP {}", answer.status));
    }
    let text = std::str::from_utf8(&answer.body).map_err(|_| format!("description at {url} is not UTF-8"))?;
    description::parse(text, url)
}

impl IgdGateway {
    /// One SOAP action, bounded by [`SOAP_TIMEOUT`]; its out arguments.
    fn call(&self, action: &str, args: &[(&str, String)]) -> Result<Vec<(String, String)>, CallError> {
        let service = self.service.kind.urn();
        let body = soap::envelope(service, action, args);
        let headers = [
            ("Content-Type", "text/xml; charset=\"utf-8\"".to_string()),
            ("SOAPAction", soap::action_header(service, action)),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let deadline = Instant::now() + SOAP_TIMEOUT;
        let answer =
            http::post(&self.service.control, &headers, &body, deadline).map_err(CallError::Transport)?;
        soap::parse_answer(action, &answer)
    }

    fn mapping_args(
        external_port: u16,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Vec<(&'static str, String)> {
        vec![
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external_port.to_string()),
            ("NewProtocol", PROTOCOL.into()),
            ("NewInternalPort", internal.port().to_string()),
            ("NewInternalClient", internal.ip().to_string()),
            ("NewEnabled", "1".into()),
            ("NewPortMappingDescription", description.into()),
            ("NewLeaseDuration", lease_secs.to_string()),
        ]
    }
}

fn number<T: std::str::FromStr>(args: &[(String, String)], action: &str, name: &str) -> Result<T, CallError> {
    let value = soap::argument(args, action, name)?;
    value.parse().map_err(|_| {
        CallError::Other(format!(
            "{action} answer: {name} {:?} is not a number",
            shorten(value)
        ))
    })
}

impl Gateway for IgdGateway {
    fn control(&self) -> SocketAddr {
        SocketAddr::V4(self.service.control.addr)
    }

    fn external_ip(&self) -> Result<IpAddr, CallError> {
        const ACTION: &str = "GetExternalIPAddress";
        let args = self.call(ACTION, &[])?;
        let value = soap::argument(&args, ACTION, "NewExternalIPAddress")?;
        value.parse().map_err(|_| {
            CallError::Other(format!(
                "{ACTION} answer: {:?} is not an IP address",
                shorten(value)
            ))
        })
    }

    fn add_port(
        &self,
        external_port: u16,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Result<(), CallError> {
        let args = Self::mapping_args(external_port, internal, lease_secs, description);
        self.call("AddPortMapping", &args).map(drop)
    }

    fn add_any_port(
        &self,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Result<u16, CallError> {
        const ACTION: &str = "AddAnyPortMapping";
        if !self.service.kind.has_any_port() {
            return Err(CallError::Unsupported);
        }
        let args = Self::mapping_args(internal.port(), internal, lease_secs, description);
        let out = self.call(ACTION, &args)?;
        match number::<u16>(&out, ACTION, "NewReservedPort")? {
            0 => Err(CallError::Other(format!("{ACTION} answer: reserved port 0"))),
            port => Ok(port),
        }
    }

    fn entry(&self, index: u32) -> Result<Entry, CallError> {
        const ACTION: &str = "GetGenericPortMappingEntry";
        let out = self.call(ACTION, &[("NewPortMappingIndex", index.to_string())])?;
        let protocol = soap::argument(&out, ACTION, "NewProtocol")?;
        let enabled = soap::argument(&out, ACTION, "NewEnabled")?;
        Ok(Entry {
            external_port: number(&out, ACTION, "NewExternalPort")?,
            udp: protocol.eq_ignore_ascii_case(PROTOCOL),
            internal_client: soap::argument(&out, ACTION, "NewInternalClient")?.to_string(),
            internal_port: number(&out, ACTION, "NewInternalPort")?,
            enabled: enabled == "1" || enabled.eq_ignore_ascii_case("true"),
        })
    }

    fn remove_port(&self, external_port: u16) -> Result<(), CallError> {
        let args = [
            ("NewRemoteHost", String::new()),
            ("NewExternalPort", external_port.to_string()),
            ("NewProtocol", PROTOCOL.to_string()),
        ];
        self.call("DeletePortMapping", &args).map(drop)
    }
}

//! The gateway's device description (UPnP Device Architecture 1.1, section
//! 2.3): which WAN connection service it offers and that service's control
//! URL. Only a control URL on the gateway's own address is taken (another
//! port is fine: some routers serve control elsewhere).

use std::net::SocketAddrV4;

use super::http::{Url, shorten};
use super::xml::{Event, Reader, XmlError};

/// The services port mappings are made on, best first. WANIPConnection:2
/// adds AddAnyPortMapping; a PPP link offers the same calls as v1.
pub const SERVICES: [Kind; 3] = [Kind::IpV2, Kind::IpV1, Kind::Ppp];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    IpV2,
    IpV1,
    Ppp,
}

impl Kind {
    pub fn urn(self) -> &'static str {
        match self {
            Kind::IpV2 => "urn:schemas-upnp-org:service:WANIPConnection:2",
            Kind::IpV1 => "urn:schemas-upnp-org:service:WANIPConnection:1",
            Kind::Ppp => "urn:schemas-upnp-org:service:WANPPPConnection:1",
        }
    }

    /// IGDv2's AddAnyPortMapping: the router picks a free port.
    pub fn has_any_port(self) -> bool {
        self == Kind::IpV2
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub kind: Kind,
    pub control: Url,
}

/// The best service in the description fetched from `location`.
pub fn parse(xml: &str, location: &Url) -> Result<Service, String> {
    let found = services(xml).map_err(|e| format!("description at {location}: {e}"))?;
    let (base, candidates) = found;
    let base = match base {
        Some(b) => Url::parse(&b).map_err(|e| format!("description at {location}: URLBase {e}"))?,
        None => location.clone(),
    };
    for kind in SERVICES {
        let Some((_, control)) = candidates.iter().find(|(urn, _)| urn == kind.urn()) else {
            continue;
        };
        let control = resolve(control, &base).map_err(|e| format!("description at {location}: {e}"))?;
        if control.addr.ip() != location.addr.ip() {
            return Err(format!(
                "description at {location}: the control URL {control} is on another host"
            ));
        }
        return Ok(Service { kind, control });
    }
    Err(format!(
        "description at {location} offers no WANIPConnection or WANPPPConnection service"
    ))
}

/// Devices nest (IGD > WANDevice > WANConnectionDevice), so every service
/// of the document is read, wherever it is.
type Found = (Option<String>, Vec<(String, String)>);

/// URLBase (UDA 1.0; gone in 1.1 but still sent) and every service's
/// (serviceType, controlURL).
fn services(xml: &str) -> Result<Found, XmlError> {
    // A router's description lists a handful; more is not a gateway's.
    const MAX_SERVICES: usize = 64;
    let mut base = None;
    let mut found = Vec::new();
    let mut service_type = None;
    let mut control = None;
    let mut text = String::new();
    let mut reader = Reader::new(xml);
    while let Some(event) = reader.next() {
        match event? {
            Event::Start(name) => {
                text.clear();
                if name == "service" {
                    service_type = None;
                    control = None;
                }
            }
            Event::Text(t) => {
                if text.len() < super::http::MAX_PATH {
                    text.push_str(&t);
                }
            }
            Event::End(name) => {
                let parent = reader.path().last().copied();
                match (parent, name) {
                    (Some("root"), "URLBase") => base = Some(text.trim().to_string()),
                    (Some("service"), "serviceType") => service_type = Some(text.trim().to_string()),
                    (Some("service"), "controlURL") => control = Some(text.trim().to_string()),
                    (_, "service") => {
                        if let (Some(s), Some(c)) = (service_type.take(), control.take())
                            && found.len() < MAX_SERVICES
                        {
                            found.push((s, c));
                        }
                    }
                    _ => {}
                }
                text.clear();
            }
        }
    }
    Ok((base, found))
}

/// A control URL as the description gives it: absolute, or a path on the base.
fn resolve(control: &str, base: &Url) -> Result<Url, String> {
    if control.is_empty() {
        return Err("empty control URL".into());
    }
    if control.len() >= 7 && control[..7].eq_ignore_ascii_case("http://") {
        return Url::parse(control).map_err(|e| format!("control URL {e}"));
    }
    if control.contains("://") {
        return Err(format!("control URL {:?} is not http://", shorten(control)));
    }
    let path = if control.starts_with('/') {
        control.to_string()
    } else {
        // Relative to the base's directory.
        let dir = base.path.rsplit_once('/').map_or("", |(d, _)| d);
        format!("{dir}/{control}")
    };
    Url::at(SocketAddrV4::new(*base.addr.ip(), base.addr.port()), &path)
}

/// For the fuzz target: any text never panics, and a service found is on
/// the host the description came from (the lab's gateway, as in the fixture).
pub fn fuzz_parse(xml: &str) -> bool {
    let location = Url::parse("http://10.1.0.1:5000/rootDesc.xml").unwrap();
    match parse(xml, &location) {
        Ok(s) => {
            assert_eq!(s.control.addr.ip(), location.addr.ip());
            true
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Debian's miniupnpd 2.3 (IGDv2) served the lab's LAN host.
    const MINIUPNPD: &str = include_str!("fixtures/description-miniupnpd.xml");

    fn location() -> Url {
        Url::parse("http://10.1.0.1:5000/rootDesc.xml").unwrap()
    }

    #[test]
    fn finds_miniupnpds_wan_ip_connection() {
        let s = parse(MINIUPNPD, &location()).unwrap();
        assert_eq!(s.kind, Kind::IpV2);
        assert_eq!(s.control.to_string(), "http://10.1.0.1:5000/ctl/IPConn");
    }

    fn v1(base: &str, services: &str) -> String {
        format!(
            "<?xml version=\"1.0\"?><root xmlns=\"urn:schemas-upnp-org:device-1-0\">{base}<device>\
             <deviceList><device><deviceList><device><serviceList>{services}</serviceList></device>\
             </deviceList></device></deviceList></device></root>"
        )
    }

    fn service(urn: &str, control: &str) -> String {
        format!("<service><serviceType>{urn}</serviceType><controlURL>{control}</controlURL></service>")
    }

    #[test]
    fn prefers_ip_over_ppp_and_resolves_against_urlbase() {
        let xml = v1(
            "<URLBase>http://10.1.0.1:49000/</URLBase>",
            &(service(Kind::Ppp.urn(), "/ppp") + &service(Kind::IpV1.urn(), "upnp/control/WANIPConn1")),
        );
        let s = parse(&xml, &location()).unwrap();
        assert_eq!(s.kind, Kind::IpV1);
        assert_eq!(
            s.control.to_string(),
            "http://10.1.0.1:49000/upnp/control/WANIPConn1"
        );
        let ppp = v1("", &service(Kind::Ppp.urn(), "http://10.1.0.1:49000/ppp"));
        let s = parse(&ppp, &location()).unwrap();
        assert_eq!(
            (s.kind, s.control.to_string()),
            (Kind::Ppp, "http://10.1.0.1:49000/ppp".into())
        );
    }

    #[test]
    fn refuses_another_hosts_control_url() {
        for (base, control) in [
            ("", "http://10.1.0.9:5000/ctl"),
            ("<URLBase>http://10.1.0.9:5000</URLBase>", "/ctl"),
        ] {
            let xml = v1(base, &service(Kind::IpV1.urn(), control));
            let err = parse(&xml, &location()).unwrap_err();
            assert!(err.contains("another host"), "{err}");
        }
    }

    #[test]
    fn says_what_is_missing_or_broken() {
        let none = v1(
            "",
            &service("urn:schemas-upnp-org:service:Layer3Forwarding:1", "/l3f"),
        );
        assert!(
            parse(&none, &location())
                .unwrap_err()
                .contains("no WANIPConnection")
        );
        assert!(
            parse("<root><device>", &location())
                .unwrap_err()
                .contains("malformed XML")
        );
        let https = v1("", &service(Kind::IpV1.urn(), "https://10.1.0.1/ctl"));
        assert!(parse(&https, &location()).is_err());
        let empty = v1("", &service(Kind::IpV1.urn(), ""));
        assert!(parse(&empty, &location()).is_err());
        assert!(fuzz_parse(&v1("", &service(Kind::IpV2.urn(), "/c"))));
    }
}

//! The worker's [`Gateway`] calls made with igd-next's blocking client
//! (SSDP search, then SOAP over HTTP through attohttpc); the `upnp` feature.

use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use igd_next::{
    AddAnyPortError, AddPortError, GatewayIpVersion, GetExternalIpError, GetGenericPortMappingEntryError,
    PortMappingProtocol, RemovePortError, RequestError, SearchError, SearchOptions,
};

use super::{
    CONFLICT, CallError, DISCOVER_TIMEOUT, Entry, Gateway, INDEX_INVALID, NO_SUCH_ENTRY,
    ONLY_PERMANENT_LEASES, SAME_PORT_VALUES_REQUIRED, one_line, upnp,
};

// Mapped back from igd-next's typed errors, so messages show the code.
const NOT_AUTHORIZED: u16 = 606;
const ARGUMENT_TOO_LONG: u16 = 605;
const NO_PORT_MAPS_AVAILABLE: u16 = 728;
/// A router's error text (igd-next passes on whole SOAP bodies) is cut to this
/// many characters, so a reply stays a short line.
const MAX_ROUTER_TEXT: usize = 160;

/// A router's text on one line, cut to [`MAX_ROUTER_TEXT`] characters.
fn router_text(text: &str) -> String {
    let mut out = one_line(text);
    if let Some((cut, _)) = out.char_indices().nth(MAX_ROUTER_TEXT) {
        out.truncate(cut);
        out.push('…');
    }
    out
}

struct IgdGateway {
    gateway: igd_next::Gateway,
    control: SocketAddr,
}

pub(super) fn search_igd() -> Result<Box<dyn Gateway>, String> {
    let mut options = SearchOptions::default();
    options.timeout = Some(DISCOVER_TIMEOUT);
    options.single_search_timeout = Some(DISCOVER_TIMEOUT);
    // Mappings here are IPv4; an IPv6 gateway's firewall is another service.
    options.gateway_ip_version = GatewayIpVersion::V4;
    match igd_next::search_gateway(options) {
        Ok(gateway) => {
            // igd-next keeps a control URL on the description's host:port as a
            // path, one on another port of that host as an absolute URL.
            let control = gateway
                .control_url
                .strip_prefix("http://")
                .and_then(|rest| rest.split('/').next())
                .and_then(|host_port| host_port.parse().ok())
                .unwrap_or(gateway.addr);
            Ok(Box::new(IgdGateway { gateway, control }))
        }
        Err(SearchError::NoResponseWithinTimeout) => Err(format!(
            "no UPnP gateway answered within {} s",
            DISCOVER_TIMEOUT.as_secs()
        )),
        Err(e) => Err(format!("UPnP gateway search: {}", router_text(&e.to_string()))),
    }
}

fn request_error(e: RequestError) -> CallError {
    match e {
        RequestError::ErrorCode(code, description) => CallError::Upnp(code, router_text(&description)),
        RequestError::UnsupportedAction(_) => CallError::Unsupported,
        RequestError::InvalidResponse(body) => {
            CallError::Other(format!("unreadable answer: {}", router_text(&body)))
        }
        // attohttpc or the socket: the connection, not the gateway's answer.
        other => CallError::Transport(router_text(&other.to_string())),
    }
}

impl Gateway for IgdGateway {
    fn control(&self) -> SocketAddr {
        self.control
    }

    fn external_ip(&self) -> Result<IpAddr, CallError> {
        self.gateway.get_external_ip().map_err(|e| match e {
            GetExternalIpError::ActionNotAuthorized => upnp(NOT_AUTHORIZED, "Action not authorized"),
            GetExternalIpError::RequestError(e) => request_error(e),
        })
    }

    fn add_port(
        &self,
        external_port: u16,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Result<(), CallError> {
        let internal = SocketAddr::V4(internal);
        self.gateway
            .add_port(
                PortMappingProtocol::UDP,
                external_port,
                internal,
                lease_secs,
                description,
            )
            .map_err(|e| match e {
                AddPortError::PortInUse => upnp(CONFLICT, "ConflictInMappingEntry"),
                AddPortError::SamePortValuesRequired => {
                    upnp(SAME_PORT_VALUES_REQUIRED, "SamePortValuesRequired")
                }
                AddPortError::OnlyPermanentLeasesSupported => {
                    upnp(ONLY_PERMANENT_LEASES, "OnlyPermanentLeasesSupported")
                }
                AddPortError::ActionNotAuthorized => upnp(NOT_AUTHORIZED, "Action not authorized"),
                AddPortError::DescriptionTooLong => upnp(ARGUMENT_TOO_LONG, "String argument too long"),
                AddPortError::RequestError(e) => request_error(e),
                e @ (AddPortError::ExternalPortZeroInvalid | AddPortError::InternalPortZeroInvalid) => {
                    CallError::Other(e.to_string())
                }
            })
    }

    fn add_any_port(
        &self,
        internal: SocketAddrV4,
        lease_secs: u32,
        description: &str,
    ) -> Result<u16, CallError> {
        // Without the action igd-next would try 20 random AddPortMappings of
        // its own, each up to SOAP_TIMEOUT: the worker's fallback does fewer.
        if !self.gateway.control_schema.contains_key("AddAnyPortMapping") {
            return Err(CallError::Unsupported);
        }
        let internal = SocketAddr::V4(internal);
        self.gateway
            .add_any_port(PortMappingProtocol::UDP, internal, lease_secs, description)
            .map_err(|e| match e {
                AddAnyPortError::NoPortsAvailable => upnp(NO_PORT_MAPS_AVAILABLE, "NoPortMapsAvailable"),
                AddAnyPortError::ExternalPortInUse => upnp(CONFLICT, "ConflictInMappingEntry"),
                AddAnyPortError::OnlyPermanentLeasesSupported => {
                    upnp(ONLY_PERMANENT_LEASES, "OnlyPermanentLeasesSupported")
                }
                AddAnyPortError::ActionNotAuthorized => upnp(NOT_AUTHORIZED, "Action not authorized"),
                AddAnyPortError::DescriptionTooLong => upnp(ARGUMENT_TOO_LONG, "String argument too long"),
                AddAnyPortError::RequestError(e) => request_error(e),
                e @ AddAnyPortError::InternalPortZeroInvalid => CallError::Other(e.to_string()),
            })
    }

    fn entry(&self, index: u32) -> Result<Entry, CallError> {
        let e = self
            .gateway
            .get_generic_port_mapping_entry(index)
            .map_err(|e| match e {
                GetGenericPortMappingEntryError::SpecifiedArrayIndexInvalid => {
                    upnp(INDEX_INVALID, "SpecifiedArrayIndexInvalid")
                }
                GetGenericPortMappingEntryError::ActionNotAuthorized => {
                    upnp(NOT_AUTHORIZED, "Action not authorized")
                }
                GetGenericPortMappingEntryError::RequestError(e) => request_error(e),
            })?;
        Ok(Entry {
            external_port: e.external_port,
            udp: e.protocol == PortMappingProtocol::UDP,
            internal_client: e.internal_client,
            internal_port: e.internal_port,
            enabled: e.enabled,
        })
    }

    fn remove_port(&self, external_port: u16) -> Result<(), CallError> {
        self.gateway
            .remove_port(PortMappingProtocol::UDP, external_port)
            .map_err(|e| match e {
                RemovePortError::NoSuchPortMapping => upnp(NO_SUCH_ENTRY, "NoSuchEntryInArray"),
                RemovePortError::ActionNotAuthorized => upnp(NOT_AUTHORIZED, "Action not authorized"),
                RemovePortError::RequestError(e) => request_error(e),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn router_text_cuts() {
        let long = "é".repeat(MAX_ROUTER_TEXT + 1);
        assert_eq!(router_text(&long), format!("{}…", &long[..2 * MAX_ROUTER_TEXT]));
        assert_eq!(router_text(&long[2..]), &long[2..]);
    }
}

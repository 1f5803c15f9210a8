//! This machine's own addresses (getifaddrs), for join tokens and endpoint candidates.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// One address of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfAddr {
    pub ifname: String,
    pub addr: IpAddr,
    /// The interface is administratively up and has a carrier.
    pub up: bool,
}

/// Every IPv4 and IPv6 address on every interface.
pub fn addresses() -> Vec<IfAddr> {
    let mut out = Vec::new();
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we walk read-only and free once.
    unsafe {
        if libc::getifaddrs(&mut ifap) != 0 {
            return out;
        }
        let mut cur = ifap;
        while !cur.is_null() {
            let sa = (*cur).ifa_addr;
            let addr = if sa.is_null() {
                None
            } else if (*sa).sa_family as i32 == libc::AF_INET {
                let sin = &*(sa as *const libc::sockaddr_in);
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
            } else if (*sa).sa_family as i32 == libc::AF_INET6 {
                let sin6 = &*(sa as *const libc::sockaddr_in6);
                Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
            } else {
                None
            };
            if let Some(addr) = addr {
                let flags = (*cur).ifa_flags;
                let up = flags & libc::IFF_UP as u32 != 0 && flags & libc::IFF_RUNNING as u32 != 0;
                let ifname = std::ffi::CStr::from_ptr((*cur).ifa_name)
                    .to_string_lossy()
                    .into_owned();
                out.push(IfAddr { ifname, addr, up });
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(ifap);
    }
    out
}

/// Every IPv4 address on every interface, with the interface name.
pub fn ipv4_addresses() -> Vec<(String, Ipv4Addr)> {
    addresses()
        .into_iter()
        .filter_map(|a| match a.addr {
            IpAddr::V4(v4) => Some((a.ifname, v4)),
            IpAddr::V6(_) => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_loopback() {
        assert!(super::ipv4_addresses().iter().any(|(_, a)| a.is_loopback()));
        assert!(super::addresses().iter().any(|a| a.addr.is_loopback() && a.up));
    }
}

//! This host as the rendezvous sees it: the interfaces that are up, the addresses rank 0 may be
//! reached at (PARALLEL_IFNAME first), and the probe a rank reports to the root.

use crate::plan::Probe;
use parallel_engine::config::var;
use parallel_engine::{Error, ErrorKind, Result};

/// The IPv4 addresses of the interfaces that are up, with their names, in the kernel's order.
fn ipv4_interfaces() -> Result<Vec<(String, std::net::Ipv4Addr)>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(Error::os(
            "tree",
            "getifaddrs",
            std::io::Error::last_os_error(),
        ));
    }
    let mut found = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: walking the list returned by getifaddrs.
        let ifa = unsafe { &*p };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        let family = if ifa.ifa_addr.is_null() {
            -1
        } else {
            // SAFETY: a non-NULL ifa_addr points at a sockaddr of its family.
            i32::from(unsafe { (*ifa.ifa_addr).sa_family })
        };
        if family == libc::AF_INET && ifa.ifa_flags & libc::IFF_UP as u32 != 0 {
            // SAFETY: family checked above.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            found.push((n.into_owned(), ip));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: freeing the list we got.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(found)
}

/// The address of the interface named by PARALLEL_IFNAME, if set.
pub(super) fn ifname_addr() -> Result<Option<String>> {
    let Some(name) = var::PARALLEL_IFNAME.read()? else {
        return Ok(None);
    };
    ipv4_interfaces()?
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, ip)| Some(ip.to_string()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "tree",
                format!("PARALLEL_IFNAME={name:?} has no IPv4 address here"),
            )
        })
}

/// The local address the kernel would use to reach `host` (no packet is sent).
fn route_to(host: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let to = (host, 9).to_socket_addrs().ok()?.find(|a| a.is_ipv4())?;
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Every address rank 0 may be reached at, best first: PARALLEL_IFNAME's, the one routing to
/// `hint` (the store's host, MASTER_ADDR), the other interfaces', loopback last (tried only by
/// members on the same host). In a network namespace there may be no default route, so a
/// single guess is not enough.
pub(super) fn candidate_addrs(hint: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = ifname_addr()?.into_iter().collect();
    if !hint.is_empty()
        && let Some(ip) = route_to(hint)
    {
        out.push(ip.to_string());
    }
    let all = ipv4_interfaces()?;
    out.extend(
        all.iter()
            .filter(|(_, ip)| !ip.is_loopback())
            .map(|(_, ip)| ip.to_string()),
    );
    out.push("127.0.0.1".into());
    let mut seen = std::collections::HashSet::new();
    out.retain(|a| seen.insert(a.clone()));
    Ok(out)
}

pub(super) fn probe_of(rank: usize, addr: String, port: u16, host: Option<&str>) -> Probe {
    let numa = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("node"))
                .count()
        })
        .unwrap_or(1)
        .max(1);
    Probe {
        rank,
        host_id: host
            .unwrap_or(parallel_engine::topology::host_identity())
            .to_string(),
        hostname: parallel_engine::topology::hostname(),
        addr,
        port,
        cores: parallel_engine::topology::usable_cores(),
        numa_nodes: numa,
        pid: std::process::id(),
        gpus: parallel_engine::cuda::gpu_ids(),
    }
}

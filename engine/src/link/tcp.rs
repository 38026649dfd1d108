//! The TCP link kind: a stream socket, within a host or across hosts; every other kind is set up
//! over one (the handshake, and the liveness channel of a shared-memory link).
//!
//! Invariants:
//! - TCP-1: sockets are non-blocking, close-on-exec, with Nagle off (`sys::tune_tcp`); a connect
//!   waits for the deadline, never longer.

use super::kinds::{Cost, End, Kind, Policy};
use super::{LinkKind, sys};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{self, Deadline, Interest};
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// The TCP kind: viable between any two ends (KIND-1).
#[derive(Debug, Clone, Copy)]
pub struct Tcp;

impl Kind for Tcp {
    fn id(&self) -> LinkKind {
        LinkKind::Tcp
    }
    fn probe(&self, _a: &End<'_>, _b: &End<'_>, _policy: &Policy) -> Option<Cost> {
        // Loopback figures (docs/benchmarks.md: ~14 us round trip, ~4.4 GB/s); a network is slower.
        Some(Cost {
            latency: Duration::from_micros(7),
            bytes_per_sec: 4e9,
        })
    }
}

/// Connects a TCP socket to `addr` before the deadline.
pub(crate) fn connect_once(addr: &SocketAddr, deadline: Deadline) -> Result<OwnedFd> {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let fd = sys::socket(family, libc::SOCK_STREAM)?;
    let (ss, len) = sys::sockaddr(addr);
    // SAFETY: valid sockaddr of `len` bytes.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &ss as *const _ as *const libc::sockaddr,
            len,
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(Error::os("connect", &format!("connect to {addr}"), e));
        }
        runtime::wait_until(
            &[(fd.as_raw_fd(), Interest::Write)],
            deadline,
            "connect",
            &format!("the connection to {addr}"),
            || {
                let mut p = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one pollfd, zero timeout.
                Ok(unsafe { libc::poll(&mut p, 1, 0) } > 0)
            },
        )?;
        let mut err: libc::c_int = 0;
        let mut l = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid pointers of the stated size.
        unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                &mut err as *mut _ as *mut libc::c_void,
                &mut l,
            )
        };
        if err != 0 {
            return Err(Error::os(
                "connect",
                &format!("connect to {addr}"),
                std::io::Error::from_raw_os_error(err),
            ));
        }
    }
    sys::tune_tcp(fd.as_raw_fd());
    Ok(fd)
}

/// Binds and listens on `host:port` (port 0: an ephemeral port). IPv4 and IPv6.
pub fn listen(host: &str, port: u16) -> Result<(OwnedFd, SocketAddr)> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| {
            Error::new(
                ErrorKind::Config,
                "listen",
                format!("cannot resolve {host:?}: {e}"),
            )
        })?
        .collect();
    let mut last = None;
    for a in addrs {
        let family = if a.is_ipv4() {
            libc::AF_INET
        } else {
            libc::AF_INET6
        };
        let fd = sys::socket(family, libc::SOCK_STREAM)?;
        sys::setsockopt_int(fd.as_raw_fd(), libc::SOL_SOCKET, libc::SO_REUSEADDR, 1);
        if a.is_ipv6() {
            sys::setsockopt_int(fd.as_raw_fd(), libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1);
        }
        let (ss, len) = sys::sockaddr(&a);
        // SAFETY: valid sockaddr.
        if unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &ss as *const _ as *const libc::sockaddr,
                len,
            )
        } != 0
        {
            last = Some(sys::last("listen", &format!("bind {a}")));
            continue;
        }
        // SAFETY: plain syscall.
        if unsafe { libc::listen(fd.as_raw_fd(), 1024) } != 0 {
            last = Some(sys::last("listen", &format!("listen on {a}")));
            continue;
        }
        let bound = sys::local_addr(fd.as_raw_fd()).unwrap_or(a);
        return Ok((fd, bound));
    }
    Err(last.unwrap_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "listen",
            format!("{host:?} resolves to no address"),
        )
    }))
}

/// Accepts one pending connection, if any, without blocking.
pub fn try_accept(listener: RawFd) -> Result<Option<(OwnedFd, SocketAddr)>> {
    // SAFETY: zeroed storage, filled by accept4.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers; the fd is owned on success.
    let fd = unsafe {
        libc::accept4(
            listener,
            &mut ss as *mut _ as *mut libc::sockaddr,
            &mut len,
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    if fd < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN | libc::EINTR | libc::ECONNABORTED) => Ok(None),
            _ => Err(Error::os("accept", "accept4", e)),
        };
    }
    // SAFETY: fresh owned fd.
    let fd: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
    let addr = sys::from_sockaddr(&ss)
        .or_else(|| sys::peer_addr(fd.as_raw_fd()))
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    Ok(Some((fd, addr)))
}

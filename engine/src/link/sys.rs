//! Small, checked wrappers over the socket, memfd, eventfd and process_vm_readv system calls.
//! The `pub` ones are the engine API parallel-workers builds its host queues on; the rest stay
//! inside the engine.

use crate::error::{Error, ErrorKind, Result};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// An `Os` error from `errno` of the call that just failed.
pub fn last(op: &'static str, what: &str) -> Error {
    Error::os(op, what, std::io::Error::last_os_error())
}

fn check(rc: libc::c_int, op: &'static str, what: &str) -> Result<libc::c_int> {
    if rc < 0 { Err(last(op, what)) } else { Ok(rc) }
}

/// Encodes a socket address into sockaddr storage.
pub(crate) fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is a valid value; we fill the right variant below.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut ss as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// Decodes sockaddr storage.
pub(crate) fn from_sockaddr(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: family says this is a sockaddr_in.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((
                a.sin_addr.s_addr.to_ne_bytes(),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: family says this is a sockaddr_in6.
            let a = unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(std::net::SocketAddrV6::new(
                a.sin6_addr.s6_addr.into(),
                u16::from_be(a.sin6_port),
                a.sin6_flowinfo,
                a.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// A non-blocking, close-on-exec socket.
pub fn socket(family: libc::c_int, ty: libc::c_int) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned on success.
    let fd = check(
        unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK, 0) },
        "socket",
        "socket()",
    )?;
    // SAFETY: fd is a fresh, owned descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub(crate) fn setsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int, v: libc::c_int) {
    // SAFETY: valid pointer to an int of the stated size. Failures are not fatal for our options.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
}

/// Tunes a connected TCP socket: no Nagle, keepalive, large buffers.
pub(crate) fn tune_tcp(fd: RawFd) {
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY, 1);
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, 30);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, 10);
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, 6);
}

pub(crate) fn local_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: zeroed storage is valid; getsockname fills it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers.
    if unsafe { libc::getsockname(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) } != 0 {
        return None;
    }
    from_sockaddr(&ss)
}

pub(crate) fn peer_addr(fd: RawFd) -> Option<SocketAddr> {
    // SAFETY: as in local_addr.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: valid pointers.
    if unsafe { libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) } != 0 {
        return None;
    }
    from_sockaddr(&ss)
}

pub(crate) fn shutdown(fd: RawFd) {
    // SAFETY: shutting down a socket we own; errors (already shut) are irrelevant.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// True when the socket has bytes to read or reached EOF/error.
pub(crate) fn readable_now(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe { libc::poll(&mut p, 1, 0) > 0 }
}

/// `N` bytes from the operating system's generator (getrandom(2), blocking until the kernel's
/// pool is seeded). No fallback: without an OS generator it is an error, never a guessable value
/// (nonces, shared-memory and queue names depend on it).
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| {
        Error::new(
            ErrorKind::Resource,
            "random",
            format!("the operating system's random generator is unavailable ({e}); refusing to use a guessable nonce"),
        )
    })?;
    Ok(b)
}

/// `N` random bytes from the OS generator as lowercase hex (see [`random_bytes`]).
pub fn random_hex<const N: usize>() -> Result<String> {
    Ok(random_bytes::<N>()?
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A non-blocking, close-on-exec eventfd (counter 0).
pub fn eventfd() -> Result<OwnedFd> {
    // SAFETY: plain syscall.
    let fd = check(
        unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) },
        "shm",
        "eventfd()",
    )?;
    // SAFETY: fresh owned fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds one to an eventfd's counter, waking its readers.
pub fn eventfd_signal(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64; EAGAIN (counter full) is harmless.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

pub(crate) fn eventfd_drain(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reading 8 bytes into a valid u64; EAGAIN when already zero.
    unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
}

/// The seals every shared segment carries once sized: its size can never change again, and no
/// one can add or remove a seal (SEAL-1).
pub(crate) const SEALS: libc::c_int = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;

/// Creates a memfd of `size` bytes and seals its size (SEAL-1): no process that reaches the file
/// later (by the fd we pass, or through /proc/<pid>/fd) can shrink it under our mapping, which
/// would turn our next access into SIGBUS.
pub fn memfd(name: &str, size: usize) -> Result<OwnedFd> {
    let cname = std::ffi::CString::new(name).expect("no NUL");
    // SAFETY: valid C string; anonymous memory file, nothing appears in /dev/shm.
    let fd = check(
        unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) },
        "shm",
        "memfd_create()",
    )?;
    // SAFETY: fresh owned fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sizing our own memfd.
    let rc = unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) };
    check(rc, "shm", "ftruncate(memfd)")?;
    // SAFETY: plain fcntl on our own memfd.
    let rc = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, SEALS) };
    check(rc, "shm", "fcntl(F_ADD_SEALS) on the memfd")?;
    Ok(fd)
}

/// Checks a shared segment received from another process before we map it (SEAL-2): it must be
/// a memfd on tmpfs (not hugetlbfs, whose faults can fail with SIGBUS), sealed against any change
/// of size (`SEALS`), and exactly `want` bytes long (`None`: any size). Returns its size.
pub fn check_sealed(fd: RawFd, want: Option<usize>, op: &'static str) -> Result<usize> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let refuse = |why: String| {
        crate::error::protocol(
            op,
            format!(
                "refusing the peer's shared segment: {why} (is the peer a Parallel process of the same version?)"
            ),
        )
    };
    // SAFETY: a zeroed statfs is a valid value.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    let rc = unsafe { libc::fstatfs(fd, &mut sf) };
    check(rc, op, "fstatfs(shared segment)")?;
    if sf.f_type as i64 != TMPFS_MAGIC {
        return Err(refuse(format!(
            "it is not a plain memfd (file system type {:#x})",
            sf.f_type
        )));
    }
    // SAFETY: plain fcntl; fails with EINVAL for files that cannot carry seals.
    let seals = unsafe { libc::fcntl(fd, libc::F_GET_SEALS) };
    if seals < 0 || seals & SEALS != SEALS {
        return Err(refuse(format!(
            "its size is not sealed (seals {seals:#x}, need F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)"
        )));
    }
    // SAFETY: fstat into a zeroed struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    check(rc, op, "fstat(shared segment)")?;
    let size = st.st_size as usize;
    if want.is_some_and(|w| w != size) {
        return Err(refuse(format!(
            "it is {size} bytes, expected {}",
            want.unwrap_or(0)
        )));
    }
    Ok(size)
}

/// Creates a listening abstract-namespace Unix socket (no file on disk; gone when closed).
pub fn unix_listen_abstract(name: &[u8]) -> Result<OwnedFd> {
    let fd = socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
    let (addr, len) = abstract_addr(name);
    // SAFETY: valid sockaddr_un of `len` bytes.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            len,
        )
    };
    check(rc, "shm", "bind(abstract unix socket)")?;
    // SAFETY: plain syscall.
    let rc = unsafe { libc::listen(fd.as_raw_fd(), 4) };
    check(rc, "shm", "listen(abstract unix socket)")?;
    Ok(fd)
}

/// The address of an abstract-namespace Unix socket named `name`.
pub fn abstract_addr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_un is valid.
    let mut a: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    a.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let n = name.len().min(a.sun_path.len() - 1);
    for (i, b) in name[..n].iter().enumerate() {
        a.sun_path[i + 1] = *b as libc::c_char; // sun_path[0] = 0: abstract namespace
    }
    (
        (a),
        (std::mem::size_of::<libc::sa_family_t>() + 1 + n) as libc::socklen_t,
    )
}

/// Sends `data` with file descriptors attached (SCM_RIGHTS) on a connected Unix socket.
pub fn send_fds(sock: RawFd, data: &[u8], fds: &[RawFd]) -> Result<()> {
    let space = unsafe_cmsg_space(fds.len());
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain data; we point it at live buffers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: cbuf is large enough for one cmsg with fds.len() descriptors (CMSG_SPACE).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN((fds.len() * 4) as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr() as *const u8, libc::CMSG_DATA(c), fds.len() * 4);
    }
    // SAFETY: msg points at valid buffers.
    let rc = unsafe { libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL) };
    if rc != data.len() as isize {
        return Err(last("shm", "sendmsg(SCM_RIGHTS)"));
    }
    Ok(())
}

fn unsafe_cmsg_space(n: usize) -> usize {
    // SAFETY: CMSG_SPACE is a pure computation.
    unsafe { libc::CMSG_SPACE((n * 4) as u32) as usize }
}

/// Receives up to `data.len()` bytes and exactly `nfds` descriptors.
pub fn recv_fds(sock: RawFd, data: &mut [u8], nfds: usize) -> Result<(usize, Vec<OwnedFd>)> {
    let space = unsafe_cmsg_space(nfds);
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: as in send_fds.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = space as _;
    // SAFETY: valid msghdr; MSG_CMSG_CLOEXEC marks received fds close-on-exec.
    let rc = unsafe { libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if rc < 0 {
        return Err(last("shm", "recvmsg(SCM_RIGHTS)"));
    }
    let mut out = Vec::new();
    // SAFETY: walking the control messages the kernel wrote into cbuf.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let n = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / 4;
                let p = libc::CMSG_DATA(c) as *const RawFd;
                for i in 0..n {
                    out.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(p.add(i))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    if out.len() != nfds || msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(crate::error::protocol(
            "shm",
            format!("expected {nfds} descriptors, received {}", out.len()),
        ));
    }
    Ok((rc as usize, out))
}

/// The credentials (pid, uid, gid) of the process at the other end of a Unix socket.
pub fn peer_cred(sock: RawFd) -> Result<libc::ucred> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: valid pointers of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            sock,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            &mut cred as *mut _ as *mut libc::c_void,
            &mut len,
        )
    };
    check(rc, "shm", "SO_PEERCRED")?;
    Ok(cred)
}

/// The pid of the process at the other end of a Unix socket.
pub(crate) fn peer_pid(sock: RawFd) -> Result<i32> {
    peer_cred(sock).map(|c| c.pid)
}

/// Copies `dst.len()` bytes from `addr` in process `pid` (one copy, kernel to kernel).
pub(crate) fn cma_read(pid: i32, addr: u64, dst: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < dst.len() {
        let local = libc::iovec {
            iov_base: dst[done..].as_mut_ptr() as *mut libc::c_void,
            iov_len: dst.len() - done,
        };
        let remote = libc::iovec {
            iov_base: (addr as usize + done) as *mut libc::c_void,
            iov_len: dst.len() - done,
        };
        // SAFETY: local points into our buffer; the remote range is only read by the kernel, in the
        // peer's address space (a bad address fails with EFAULT, it cannot touch our memory).
        let rc = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if rc == 0 {
            return Err(std::io::Error::from_raw_os_error(libc::EFAULT));
        }
        done += rc as usize;
    }
    Ok(())
}

/// What a cross-memory copy costs on this machine against a plain memory copy: 4 MiB, the best of
/// 3 each, read from this process's own memory (`PARALLEL_SHM_CMA=auto`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CmaCost {
    pub bytes: usize,
    pub cma: std::time::Duration,
    pub memcpy: std::time::Duration,
}

impl CmaCost {
    /// Whether a segment should cross by one cross-memory copy rather than twice through the
    /// ring: when that copy costs less than one memory copy. The ring's two copies run on both
    /// ends' cores at once, so its time is about one copy's; and this probe reads memory of its
    /// own process, in cache, where a transfer reads what another core just wrote. With the
    /// bound at twice a memory copy, a VM whose probe found 1.34x (406 against 302 us) took
    /// the single copy, and 256 MiB messages went at 4.6-5.2 GB/s by it against 8.7-9.8 GB/s
    /// through the ring (32 MiB: 6.6 against 11.8 GB/s; 4 MiB: even).
    pub fn pays(&self) -> bool {
        self.cma < self.memcpy
    }
}

/// [`CmaCost`] of this process, measured at the first call (a few milliseconds); `None` where
/// the kernel refuses process_vm_readv.
pub fn cma_cost() -> Option<CmaCost> {
    static COST: std::sync::OnceLock<Option<CmaCost>> = std::sync::OnceLock::new();
    *COST.get_or_init(|| {
        const N: usize = 4 << 20;
        let src: Vec<u8> = (0..N).map(|i| i as u8).collect();
        let mut dst = vec![0u8; N];
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        let memcpy = best_of_3(|| {
            dst.copy_from_slice(std::hint::black_box(&src));
            Ok(())
        })
        .ok()?;
        let addr = src.as_ptr() as u64;
        let cma = best_of_3(|| cma_read(me, addr, &mut dst)).ok()?;
        if dst != src {
            return None;
        }
        let c = CmaCost {
            bytes: N,
            cma,
            memcpy,
        };
        tracing::info!(
            "cross-memory attach: 4 MiB in {:?} against {:?} by memcpy: {}",
            c.cma,
            c.memcpy,
            if c.pays() {
                "it pays: PARALLEL_SHM_CMA=auto uses it for large segments on shared-memory links"
            } else {
                "it does not pay: PARALLEL_SHM_CMA=auto leaves it off (1 forces it)"
            }
        );
        Some(c)
    })
}

/// The shortest of 3 runs of `f`.
fn best_of_3(mut f: impl FnMut() -> std::io::Result<()>) -> std::io::Result<std::time::Duration> {
    let mut best = std::time::Duration::MAX;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        f()?;
        best = best.min(t.elapsed());
    }
    Ok(best)
}

/// Whether this process reads large segments of its shared-memory peers by cross-memory attach
/// (`PARALLEL_SHM_CMA`; with `auto`, where [`CmaCost::pays`]).
pub fn cma_wanted() -> bool {
    match crate::config::config().shm_cma {
        crate::config::CmaChoice::On => true,
        crate::config::CmaChoice::Off => false,
        crate::config::CmaChoice::Auto => cma_cost().is_some_and(|c| c.pays()),
    }
}

/// Bytes waiting in a socket's receive queue, and the first `buf.len()` of them copied into
/// `buf` without consuming anything: (queued, copied). `None` at end of stream or on an error.
pub(crate) fn peek(fd: RawFd, buf: &mut [u8]) -> Option<(usize, usize)> {
    let queued = queued(fd)?;
    // SAFETY: writing at most buf.len() bytes into our own buffer.
    let n = unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error().raw_os_error();
        // Nothing queued yet: not an end.
        return matches!(e, Some(libc::EAGAIN) | Some(libc::EINTR)).then_some((0, 0));
    }
    if n == 0 {
        return None;
    }
    Some((queued, n as usize))
}

/// Bytes waiting in a socket's receive queue (FIONREAD); `None` on an error.
pub(crate) fn queued(fd: RawFd) -> Option<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int.
    if unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) } != 0 {
        return None;
    }
    Some(queued.max(0) as usize)
}

/// True when the peer shut its side down (or the connection broke): nothing more will arrive
/// beyond what is queued.
pub(crate) fn hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    unsafe {
        libc::poll(&mut p, 1, 0) > 0
            && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
    }
}

/// A second descriptor for the same open socket (so it can be shut down from another thread
/// without racing the owner's close and a reuse of the number).
pub(crate) fn dup(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC returns a fresh descriptor we own, or -1.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    // SAFETY: fresh owned descriptor.
    (d >= 0).then(|| unsafe { std::os::fd::FromRawFd::from_raw_fd(d) })
}

/// True when process `pid` has ended: kill(pid, 0) finds no such process, or /proc says it is a
/// zombie (killed or exited, not yet reaped by its parent) or dead. A killed peer stays a zombie
/// until its launcher waits for it, which may be much later (a launcher that waits for its
/// children in rank order): only the process's end matters here, since a zombie runs nothing
/// and reads no memory.
pub(crate) fn process_ended(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists; nothing is sent.
    if unsafe { libc::kill(pid, 0) } != 0 {
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')' (comm may hold any byte).
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| matches!(state, 'Z' | 'X' | 'x')),
        // Reaped between the two checks.
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

#[cfg(test)]
mod process_tests {
    use super::process_ended;

    /// A killed child is "ended" while it is still a zombie (not yet reaped), and after it was
    /// reaped; a running one is not.
    #[test]
    fn a_killed_unreaped_child_has_ended_and_a_running_one_has_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        assert!(!process_ended(pid), "a running child counted as ended");
        assert!(!process_ended(std::process::id() as i32));
        // SAFETY: signals our own child, which is not reaped until `wait` below.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
        let until = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !process_ended(pid) {
            assert!(
                std::time::Instant::now() < until,
                "a killed zombie never counted as ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        child.wait().expect("reap");
        assert!(process_ended(pid));
    }
}

#[cfg(test)]
mod cma_tests {
    use super::{CmaCost, cma_cost};
    use std::time::Duration;

    /// One cross-memory copy pays while it costs less than one memory copy: the ring's two run
    /// at once, on both ends' cores.
    #[test]
    fn cross_memory_pays_below_one_memory_copy() {
        let c = |cma_us: u64, memcpy_us: u64| CmaCost {
            bytes: 4 << 20,
            cma: Duration::from_micros(cma_us),
            memcpy: Duration::from_micros(memcpy_us),
        };
        assert!(c(99, 100).pays());
        assert!(!c(100, 100).pays());
        assert!(
            !c(406, 302).pays(),
            "the Xeon VM's figures: 1.34x, the ring 1.9x faster"
        );
        assert!(
            !c(314, 107).pays(),
            "the EPYC VM's figures: 2.9x a memory copy"
        );
    }

    /// The measurement reads this process's own memory and checks what it read; it is taken
    /// once and the same afterwards.
    #[test]
    fn the_measurement_is_taken_once() {
        let a = cma_cost();
        if let Some(c) = a {
            assert_eq!(c.bytes, 4 << 20);
            assert!(c.cma > Duration::ZERO && c.memcpy > Duration::ZERO, "{c:?}");
        }
        assert_eq!(cma_cost(), a);
    }
}

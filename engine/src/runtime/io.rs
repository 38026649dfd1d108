//! Non-blocking socket attempts and the blocking `recv_exact` / `send_all` built on them: the
//! caller's thread does the I/O, spinning under the wait policy (`spin.rs`) before it waits in
//! the kernel.
//!
//! Invariants:
//! - IO-1: a receive that must wait with at least 64 KiB still expected on a TCP socket sets the
//!   socket's SO_RCVLOWAT to what it expects (at most 4 MiB), so the kernel wakes it once per
//!   batch rather than once per arriving segment (on a loaded 2-core host, each wake-up is a
//!   context switch taken from the copies); the mark never exceeds the bytes still expected, is
//!   back to 1 when the receive returns (on every path), and the end of the stream still wakes
//!   the waiter at once. Both backends wait the same way (a readiness wait, then a
//!   non-blocking receive).

use super::backend::RING;
use super::{Backend, Deadline, Interest, Spin, backend, wait_once};
use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use std::os::fd::RawFd;
use std::time::Duration;

/// The result of a non-blocking attempt.
pub(crate) enum Attempt {
    Moved(usize),
    WouldBlock,
    Eof,
}

fn classify(rc: isize) -> std::io::Result<Attempt> {
    if rc > 0 {
        return Ok(Attempt::Moved(rc as usize));
    }
    if rc == 0 {
        return Ok(Attempt::Eof);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR) => Ok(Attempt::WouldBlock),
        _ => Err(e),
    }
}

/// Non-blocking receive attempt.
pub(crate) fn try_recv(fd: RawFd, buf: &mut [u8]) -> std::io::Result<Attempt> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    classify(unsafe {
        libc::recv(
            fd,
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    })
}

/// Non-blocking vectored send attempt.
pub(crate) fn try_sendv(fd: RawFd, iov: &[libc::iovec]) -> std::io::Result<Attempt> {
    // SAFETY: msghdr is plain data; zero is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iov.len().min(1024) as _;
    // SAFETY: iov entries point at live buffers owned by the caller for this call.
    let rc = unsafe { libc::sendmsg(fd, &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if rc == 0 && !iov.iter().all(|v| v.iov_len == 0) {
        return Ok(Attempt::WouldBlock);
    }
    classify(rc)
}

/// Receives exactly `buf.len()` bytes (blocking until the deadline). Returns `Ok(false)` on EOF
/// before the first byte, an error on EOF mid-buffer.
pub(crate) fn recv_exact(
    fd: RawFd,
    buf: &mut [u8],
    deadline: Deadline,
    cap: Duration,
    what: &str,
) -> Result<bool> {
    let mut got = 0usize;
    let mut spin: Option<Spin> = None;
    let uring = backend()? == Backend::Uring;
    let mut lowat = Lowat {
        fd,
        set: 1,
        tcp: None,
    };
    while got < buf.len() {
        match try_recv(fd, &mut buf[got..]).map_err(|e| Error::os("recv", what, e))? {
            Attempt::Moved(n) => got += n,
            Attempt::Eof if got == 0 => return Ok(false),
            Attempt::Eof => {
                return Err(Error::new(
                    ErrorKind::PeerLost,
                    "recv",
                    format!("connection closed in the middle of {what}"),
                ));
            }
            Attempt::WouldBlock => {
                if spin.get_or_insert_with(|| Spin::start(cap)).step() {
                    continue;
                }
                let slice = deadline.slice("recv", what)?;
                // IO-1: with the mark set, the wait ends once a batch is queued, and the next
                // attempt takes it. (Not an io_uring receive with MSG_WAITALL: what it takes
                // part way is not seen here, and the rest could then fall below the mark.)
                let batched = lowat.expect(buf.len() - got);
                if uring && !batched && buf.len() - got >= 64 << 10 {
                    let rest = &mut buf[got..];
                    match RING.with(|r| {
                        r.borrow_mut()
                            .transfer(fd, rest.as_mut_ptr(), rest.len(), false, slice)
                    }) {
                        Ok(0) => {
                            return Err(Error::new(
                                ErrorKind::PeerLost,
                                "recv",
                                format!("connection closed in the middle of {what}"),
                            ));
                        }
                        Ok(n) => got += n,
                        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
                        Err(e) => return Err(Error::os("recv", what, e)),
                    }
                } else {
                    wait_once(&[(fd, Interest::Read)], slice)?;
                }
            }
        }
    }
    Ok(true)
}

/// A large receive waits for a batch of bytes, not for each segment that arrives (IO-1).
const LOWAT_MIN: usize = 64 << 10;
/// The most a waiting receive asks the kernel to gather before it wakes the thread.
const LOWAT_MAX: usize = 4 << 20;

/// The socket's receive low-water mark (SO_RCVLOWAT) while a large receive on a TCP socket
/// waits (IO-1): the kernel wakes the waiter once `set` bytes are queued (or the stream ends,
/// or the receive window fills), instead of once per arriving segment. Never above the bytes
/// still expected, so a wait cannot outlast the data that completes the buffer; back to 1 when
/// dropped. (Other sockets keep 1: a Unix socket's poll ignores the mark.)
struct Lowat {
    fd: RawFd,
    set: usize,
    /// Whether `fd` is a TCP socket; asked on the first wait that could use the mark.
    tcp: Option<bool>,
}

impl Lowat {
    /// Before a wait with `rest` bytes still expected; true when the mark is above 1.
    fn expect(&mut self, rest: usize) -> bool {
        if rest >= LOWAT_MIN && !*self.tcp.get_or_insert_with(|| is_tcp(self.fd)) {
            return false;
        }
        let want = if rest >= LOWAT_MIN {
            rest.min(LOWAT_MAX)
        } else {
            1
        };
        // Raised only from 1 (once per receive), lowered whenever the rest falls below it.
        if ((self.set == 1 && want > 1) || want < self.set) && set_rcvlowat(self.fd, want) {
            self.set = want;
        }
        self.set > 1
    }
}

impl Drop for Lowat {
    fn drop(&mut self) {
        if self.set != 1 {
            set_rcvlowat(self.fd, 1);
        }
    }
}

fn is_tcp(fd: RawFd) -> bool {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid pointers to an int and its length.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            &mut v as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    rc == 0 && v == libc::IPPROTO_TCP
}

/// Sets SO_RCVLOWAT; false when the socket refused it (then the mark is unchanged, and each
/// arriving segment wakes the waiter, as without IO-1).
fn set_rcvlowat(fd: RawFd, v: usize) -> bool {
    let v = v.min(i32::MAX as usize) as libc::c_int;
    // SAFETY: a valid pointer to an int of the stated size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Sends every byte of `bufs` (blocking until the deadline).
pub(crate) fn send_all(fd: RawFd, bufs: &[&[u8]], deadline: Deadline, what: &str) -> Result<()> {
    let chunk = config().chunk;
    let uring = backend()? == Backend::Uring;
    let (mut idx, mut off) = (0usize, 0usize);
    while idx < bufs.len() {
        if off == bufs[idx].len() {
            idx += 1;
            off = 0;
            continue;
        }
        // On the stack: a small message costs no allocation here.
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; 64];
        let mut k = 0usize;
        let mut budget = chunk;
        for (j, b) in bufs[idx..].iter().enumerate().take(64) {
            let start = if j == 0 { off } else { 0 };
            let n = (b.len() - start).min(budget);
            if n > 0 {
                iov[k] = libc::iovec {
                    iov_base: b[start..].as_ptr() as *mut libc::c_void,
                    iov_len: n,
                };
                k += 1;
            }
            budget -= n;
            if budget == 0 {
                break;
            }
        }
        let moved = match try_sendv(fd, &iov[..k]).map_err(|e| Error::os("send", what, e))? {
            Attempt::Moved(n) => n,
            Attempt::Eof | Attempt::WouldBlock => {
                let slice = deadline.slice("send", what)?;
                let rest = &bufs[idx][off..];
                if uring && rest.len() >= 64 << 10 {
                    match RING.with(|r| {
                        r.borrow_mut().transfer(
                            fd,
                            rest.as_ptr() as *mut u8,
                            rest.len().min(chunk),
                            true,
                            slice,
                        )
                    }) {
                        Ok(n) => n,
                        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => 0,
                        Err(e) => return Err(Error::os("send", what, e)),
                    }
                } else {
                    wait_once(&[(fd, Interest::Write)], slice)?;
                    0
                }
            }
        };
        // Advance (idx, off) by `moved` bytes.
        let mut left = moved;
        while left > 0 {
            let room = bufs[idx].len() - off;
            if left >= room {
                left -= room;
                idx += 1;
                off = 0;
            } else {
                off += left;
                left = 0;
            }
        }
    }
    Ok(())
}

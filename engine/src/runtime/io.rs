//! Non-blocking socket attempts and the blocking `recv_exact` / `send_all` built on them: the
//! caller's thread does the I/O, spinning under the wait policy (`spin.rs`) before it waits in
//! the kernel.

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
                if uring && buf.len() - got >= 64 << 10 {
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

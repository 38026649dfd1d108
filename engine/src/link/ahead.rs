//! Read-ahead for TCP links: one `recv` takes a small frame whole (header, descriptor and
//! payload) where reading it piece by piece cost one system call per piece, and a waiting
//! receiver spins on that `recv` itself instead of on `poll` followed by reads.
//!
//! Invariants:
//! - AHEAD-1: only the holder of the link's receive lock reads the socket or takes bytes from
//!   the buffer ([`Link::read_tcp`], [`Link::fill_wait`] are called from a receive); others
//!   (`ready`, `peek_header`) only look, under the buffer's own lock, which is never held
//!   across a wait.
//! - AHEAD-2: bytes read ahead are consumed before any byte still in the socket, so the stream
//!   keeps its order; a read that still wants [`AHEAD_CAP`] bytes or more goes to the socket
//!   directly (a large payload lands in the caller's memory with no copy, as before).
//! - AHEAD-3: whoever parks on the socket checks the buffer first: [`Link::ready`] counts the
//!   bytes read ahead, so a frame already taken from the socket is never waited for.
//! - AHEAD-4: a socket error met while reading ahead is kept and returned by the next read, in
//!   place of the bytes it would have delivered; the end of the stream is not kept (the socket
//!   reports it again).

use super::Link;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{self, Attempt, Deadline, Interest, Spin, try_recv};
use std::os::fd::AsRawFd;
use std::sync::MutexGuard;
use std::time::Duration;

/// Size of a TCP link's read-ahead buffer (allocated at its first receive).
pub(crate) const AHEAD_CAP: usize = 16 << 10;

/// Bytes read from the socket and not yet consumed: `buf[start..end]`.
#[derive(Default)]
pub(crate) struct Ahead {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    err: Option<std::io::Error>,
}

impl Ahead {
    pub(crate) fn len(&self) -> usize {
        self.end - self.start
    }

    /// True when a read would return something without the socket: bytes or a kept error.
    pub(crate) fn has_news(&self) -> bool {
        self.len() > 0 || self.err.is_some()
    }

    /// Copies up to `dst.len()` buffered bytes without consuming them.
    pub(crate) fn peek(&self, dst: &mut [u8]) -> usize {
        let n = dst.len().min(self.len());
        dst[..n].copy_from_slice(&self.buf[self.start..self.start + n]);
        n
    }

    /// Moves up to `dst.len()` buffered bytes into `dst`.
    fn take(&mut self, dst: &mut [u8]) -> usize {
        let n = self.peek(dst);
        self.start += n;
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        }
        n
    }

    /// One non-blocking `recv` into the free room (AHEAD-4 keeps an error).
    fn fill(&mut self, fd: std::os::fd::RawFd) -> Attempt {
        if self.buf.is_empty() {
            self.buf = vec![0; AHEAD_CAP];
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            (self.start, self.end) = (0, self.end - self.start);
        }
        if self.end == self.buf.len() {
            return Attempt::Moved(0);
        }
        match try_recv(fd, &mut self.buf[self.end..]) {
            Ok(Attempt::Moved(n)) => {
                self.end += n;
                Attempt::Moved(n)
            }
            Ok(a) => a,
            Err(e) => {
                self.err = Some(e);
                Attempt::Moved(0)
            }
        }
    }
}

impl Link {
    fn ahead(&self) -> MutexGuard<'_, Ahead> {
        self.ahead.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes read ahead (or a kept error) are waiting (AHEAD-3).
    pub(super) fn ahead_has_news(&self) -> bool {
        self.ahead().has_news()
    }

    /// Copies up to `dst.len()` bytes read ahead, and how many there are in all.
    pub(super) fn ahead_peek(&self, dst: &mut [u8]) -> (usize, usize, bool) {
        let a = self.ahead();
        (a.peek(dst), a.len(), a.err.is_some())
    }

    /// Offers `f` the bytes read ahead; when it returns `(value, n)`, the first `n` of them are
    /// consumed. Nothing is offered while a kept error waits (AHEAD-4). Call with the receive
    /// lock (AHEAD-1).
    pub(super) fn ahead_take<T>(&self, f: impl FnOnce(&[u8]) -> Option<(T, usize)>) -> Option<T> {
        let mut a = self.ahead();
        if a.err.is_some() || a.len() == 0 {
            return None;
        }
        let (v, n) = f(&a.buf[a.start..a.end])?;
        a.start += n.min(a.len());
        if a.start == a.end {
            (a.start, a.end) = (0, 0);
        }
        Some(v)
    }

    /// Reads exactly `buf.len()` bytes of a TCP link, buffered bytes first (AHEAD-2); Ok(false)
    /// at the end of the stream before the first byte. Call with the receive lock (AHEAD-1).
    pub(super) fn read_tcp(
        &self,
        buf: &mut [u8],
        deadline: Deadline,
        what: &str,
        cap: Duration,
    ) -> Result<bool> {
        let fd = self.sock.as_raw_fd();
        let mut got = 0usize;
        let mut spin: Option<Spin> = None;
        loop {
            let attempt = {
                let mut a = self.ahead();
                got += a.take(&mut buf[got..]);
                if got == buf.len() {
                    return Ok(true);
                }
                if let Some(e) = a.err.take() {
                    return Err(Error::os("recv", what, e));
                }
                if buf.len() - got >= AHEAD_CAP {
                    None
                } else {
                    Some(a.fill(fd))
                }
            };
            match attempt {
                // Large: straight into the caller's memory (the buffer is empty now).
                None => {
                    return match runtime::recv_exact(fd, &mut buf[got..], deadline, cap, what)? {
                        false if got > 0 => Err(mid_eof(what)),
                        done => Ok(done),
                    };
                }
                Some(Attempt::Moved(_)) => {}
                Some(Attempt::Eof) if got == 0 => return Ok(false),
                Some(Attempt::Eof) => return Err(mid_eof(what)),
                Some(Attempt::WouldBlock) => {
                    if spin.get_or_insert_with(|| Spin::start(cap)).step() {
                        continue;
                    }
                    let slice = deadline.slice("recv", what)?;
                    runtime::wait_once(&[(fd, Interest::Read)], slice)?;
                }
            }
        }
    }

    /// Waits until the next read of a TCP link finds something (bytes, the end of the stream,
    /// an error) without consuming anything the frame needs: spins on `recv` into the buffer
    /// under the wait policy, then parks on the socket. Call with the receive lock (AHEAD-1).
    pub(super) fn fill_wait(&self, deadline: Deadline) -> Result<()> {
        let fd = self.sock.as_raw_fd();
        let mut spin: Option<Spin> = None;
        loop {
            {
                let mut a = self.ahead();
                if a.has_news() || !matches!(a.fill(fd), Attempt::WouldBlock) {
                    return Ok(());
                }
            }
            if spin.get_or_insert_with(|| Spin::start(self.spin)).step() {
                continue;
            }
            let slice = deadline.slice("recv", "a message")?;
            runtime::wait_once(&[(fd, Interest::Read)], slice)?;
        }
    }
}

fn mid_eof(what: &str) -> Error {
    Error::new(
        ErrorKind::PeerLost,
        "recv",
        format!("connection closed in the middle of {what}"),
    )
}

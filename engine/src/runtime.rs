//! The runtime: the I/O backend (io_uring, or epoll where io_uring cannot run), deadlines and
//! waits, and the pinned reactor threads that run asynchronous operations and accept loops.
//!
//! Design note (differs from DESIGN.md's "user threads submit, reactors complete"): a blocking
//! `send`/`recv` runs its I/O on the calling thread, through that thread's own ring (or epoll
//! instance). A hand-off to a reactor thread and back costs two futex wake-ups, about 16 µs on the
//! machines we measure, which is more than a whole small-message round trip should cost.
//! Asynchronous operations (`send_async`, `recv_async`), accepting and handshaking run on the
//! reactor threads, one per core, pinned, each with its own ring; a connection's async operations
//! always go to the same reactor so they stay in order.
//!
//! Invariants:
//! - RT-1: every wait has a deadline; waits are sliced (at most [`SLICE`]) so an interrupt check
//!   (Ctrl-C in Python) runs at least that often.
//! - RT-2: an io_uring operation is always reaped before the buffer it names is released: a
//!   timed-out or interrupted operation is cancelled and its completion awaited.
//! - RT-3: the backend is chosen once per process; `auto` probes io_uring and falls back to epoll
//!   on any setup error (ENOSYS, EPERM under seccomp), with one log line.
//! - RT-4: no path out of an io_uring transfer (`Ring::transfer`), error paths included, returns
//!   while its entry may still be in flight: when the ring wait fails, the entry is cancelled
//!   (IORING_OP_ASYNC_CANCEL) and its completion reaped before the error is returned, so the
//!   caller's buffer is never released while the kernel may still read or write it. A transfer
//!   entry carries its own tag ([`XFER_TAG`]), so no other completion (a stale poll, a cancel) is
//!   ever taken for it. If the kernel refuses to reap for [`REAP_LIMIT`] (io_uring_enter failing
//!   persistently, never seen in practice), the process aborts with a log line: returning would
//!   hand the kernel freed memory.

use crate::config::{IoChoice, config};
use crate::error::{Error, ErrorKind, Result};
use std::cell::RefCell;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest single kernel wait before the interrupt check runs (RT-1).
pub const SLICE: Duration = Duration::from_millis(100);

/// Which I/O backend this process uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

static BACKEND: OnceLock<std::result::Result<Backend, Error>> = OnceLock::new();

/// The process's I/O backend (RT-3).
static REASON: OnceLock<String> = OnceLock::new();

/// Why [`backend`] chose what it chose (`python -m torch_parallel info` shows it).
pub fn backend_reason() -> Result<String> {
    backend()?;
    Ok(REASON.get().cloned().unwrap_or_default())
}

pub fn backend() -> Result<Backend> {
    // CONFIG-4: Server and Client creation start here, so a malformed environment fails them.
    let io = crate::config::try_config()?.io;
    BACKEND
        .get_or_init(|| {
            let probe = io_uring::IoUring::new(8);
            let why = match (io, &probe) {
                (IoChoice::Epoll, _) => "PARALLEL_IO=epoll".to_string(),
                (IoChoice::Uring, _) => "PARALLEL_IO=uring".to_string(),
                (_, Ok(_)) => "PARALLEL_IO=auto, and io_uring can be set up here".to_string(),
                (_, Err(e)) => format!("PARALLEL_IO=auto, and io_uring cannot be set up here ({e})"),
            };
            let _ = REASON.set(why);
            match (io, probe) {
                (IoChoice::Epoll, _) => Ok(Backend::Epoll),
                (_, Ok(_)) => Ok(Backend::Uring),
                (IoChoice::Uring, Err(e)) => Err(Error::new(
                    ErrorKind::Config,
                    "io",
                    format!("PARALLEL_IO=uring but io_uring cannot be set up here ({e}); unset it to fall back to epoll"),
                )),
                (IoChoice::Auto, Err(e)) => {
                    tracing::info!("io_uring unavailable ({e}); using the epoll backend");
                    Ok(Backend::Epoll)
                }
            }
        })
        .clone()
}

static INTERRUPT: OnceLock<fn() -> bool> = OnceLock::new();

/// Installs the interrupt check run between wait slices; returning true aborts the wait with a
/// `Cancelled` error (the Python bindings check for Ctrl-C here).
pub fn set_interrupt_check(f: fn() -> bool) {
    let _ = INTERRUPT.set(f);
}

/// A deadline with the operation it belongs to, for error messages.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub at: Instant,
}

impl Deadline {
    pub fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now()
                .checked_add(timeout)
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(86400 * 365)),
        }
    }
    /// From an optional timeout, defaulting to `PARALLEL_TIMEOUT`.
    pub fn or_default(timeout: Option<Duration>) -> Deadline {
        Deadline::after(timeout.unwrap_or(config().timeout))
    }
    pub fn remaining(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
    pub fn passed(&self) -> bool {
        Instant::now() >= self.at
    }
    /// The next wait slice, or an error when the deadline passed or an interrupt is pending.
    pub fn slice(&self, op: &'static str, what: &str) -> Result<Duration> {
        if INTERRUPT.get().is_some_and(|f| f()) {
            return Err(Error::new(
                ErrorKind::Cancelled,
                op,
                format!("interrupted while waiting for {what}"),
            ));
        }
        let r = self.remaining();
        if r.is_zero() {
            return Err(crate::error::timeout(op, what));
        }
        Ok(r.min(SLICE))
    }
}

/// One step of a busy wait. Mostly a CPU pause; every 32nd step yields the core, so a spinning
/// waiter on an oversubscribed machine lets the thread it waits for run (two spinning processes
/// on two busy cores otherwise fall into a slow spin-then-park rhythm).
#[inline]
pub fn relax(step: &mut u32) {
    *step = step.wrapping_add(1);
    if *step % 32 == 0 {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// Readiness wanted on a file descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interest {
    Read,
    Write,
}

/// Waits until at least one of `fds` may be ready, for at most one slice. Spurious returns are
/// allowed: callers retry their non-blocking operation and wait again.
pub fn wait_once(fds: &[(RawFd, Interest)], slice: Duration) -> Result<()> {
    match backend()? {
        Backend::Epoll => EPOLL.with(|e| e.borrow_mut().wait(fds, slice)),
        Backend::Uring => RING.with(|r| r.borrow_mut().poll(fds, slice)),
    }
}

/// Waits (in slices) until `ready()` returns true or the deadline passes.
pub fn wait_until(
    fds: &[(RawFd, Interest)],
    deadline: Deadline,
    op: &'static str,
    what: &str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    loop {
        if ready()? {
            return Ok(());
        }
        let slice = deadline.slice(op, what)?;
        wait_once(fds, slice)?;
    }
}

// ---------------------------------------------------------------------------------------------
// epoll backend

thread_local! {
    static EPOLL: RefCell<Epoll> = const { RefCell::new(Epoll { fd: -1 }) };
}

struct Epoll {
    fd: RawFd,
}

impl Epoll {
    fn wait(&mut self, fds: &[(RawFd, Interest)], slice: Duration) -> Result<()> {
        if self.fd < 0 {
            // SAFETY: plain syscall.
            let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
            if fd < 0 {
                return Err(Error::os(
                    "io",
                    "epoll_create1",
                    std::io::Error::last_os_error(),
                ));
            }
            self.fd = fd;
        }
        for (fd, interest) in fds {
            let events = match interest {
                Interest::Read => libc::EPOLLIN | libc::EPOLLRDHUP,
                Interest::Write => libc::EPOLLOUT,
            } | libc::EPOLLONESHOT
                | libc::EPOLLERR
                | libc::EPOLLHUP;
            let mut ev = libc::epoll_event {
                events: events as u32,
                u64: *fd as u64,
            };
            // SAFETY: valid epoll fd and event pointer; MOD re-arms a one-shot registration.
            let mut rc = unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_MOD, *fd, &mut ev) };
            if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                // SAFETY: as above.
                rc = unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, *fd, &mut ev) };
            }
            if rc != 0 {
                // A closed fd (EBADF) means the link is gone: report readiness so the caller's
                // non-blocking operation surfaces the real error.
                return Ok(());
            }
        }
        let mut out = [libc::epoll_event { events: 0, u64: 0 }; 8];
        let ms = slice.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `out` has room for 8 events.
        let n = unsafe { libc::epoll_wait(self.fd, out.as_mut_ptr(), out.len() as i32, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(Error::os("io", "epoll_wait", e));
            }
        }
        Ok(())
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        if self.fd >= 0 {
            // SAFETY: we own this fd.
            unsafe { libc::close(self.fd) };
        }
    }
}

// ---------------------------------------------------------------------------------------------
// io_uring backend

thread_local! {
    static RING: RefCell<Ring> = const { RefCell::new(Ring { ring: None }) };
}

struct Ring {
    ring: Option<io_uring::IoUring>,
}

const CANCEL_TAG: u64 = 1 << 63;
/// The tag of a transfer entry (RT-4); poll entries use their small index.
const XFER_TAG: u64 = 1 << 62;
/// How long an abandoned transfer may fail to be reaped before the process aborts (RT-4).
const REAP_LIMIT: Duration = Duration::from_secs(5);

fn transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

/// Cancels the in-flight entry tagged `tag` and waits for its completion (RT-4). Never returns
/// while the entry may still be in flight.
fn reap_abandoned(ring: &mut io_uring::IoUring, tag: u64) {
    use io_uring::{opcode, types};
    let cancel = opcode::AsyncCancel::new(tag).build().user_data(CANCEL_TAG);
    let ts = types::Timespec::from(SLICE);
    let args = types::SubmitArgs::new().timespec(&ts);
    let start = Instant::now();
    let mut queued = false;
    loop {
        if !queued {
            // SAFETY: AsyncCancel references no user memory.
            queued = unsafe { ring.submission().push(&cancel) }.is_ok();
        }
        let r = ring.submitter().submit_with_args(1, &args);
        if ring.completion().any(|cqe| cqe.user_data() == tag) {
            return;
        }
        if let Err(e) = r
            && !transient(&e)
        {
            if start.elapsed() >= REAP_LIMIT {
                tracing::error!(
                    "io_uring refuses to reap a cancelled transfer ({e}) for {REAP_LIMIT:?}; \
                     aborting rather than release a buffer the kernel may still write (RT-4)"
                );
                std::process::abort();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Ring {
    fn get(&mut self) -> Result<&mut io_uring::IoUring> {
        if self.ring.is_none() {
            let r = io_uring::IoUring::new(64).map_err(|e| Error::os("io", "io_uring setup", e))?;
            self.ring = Some(r);
        }
        Ok(self.ring.as_mut().expect("just set"))
    }

    /// Polls the fds through the ring for one slice, then cancels and reaps what is left.
    fn poll(&mut self, fds: &[(RawFd, Interest)], slice: Duration) -> Result<()> {
        use io_uring::{opcode, types};
        let ring = self.get()?;
        for (i, (fd, interest)) in fds.iter().enumerate() {
            let mask = match interest {
                Interest::Read => libc::POLLIN | libc::POLLRDHUP,
                Interest::Write => libc::POLLOUT,
            } as u32;
            let sqe = opcode::PollAdd::new(types::Fd(*fd), mask)
                .build()
                .user_data(i as u64);
            // SAFETY: PollAdd references no user memory.
            while unsafe { ring.submission().push(&sqe) }.is_err() {
                ring.submit()
                    .map_err(|e| Error::os("io", "io_uring submit", e))?;
            }
        }
        let ts = types::Timespec::from(slice);
        let args = types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME | libc::EINTR | libc::EBUSY)
                ) => {}
            Err(e) => return Err(Error::os("io", "io_uring wait", e)),
        }
        let mut pending: Vec<bool> = vec![true; fds.len()];
        let mut cancels = 0usize;
        for cqe in ring.completion() {
            if cqe.user_data() & CANCEL_TAG != 0 {
                cancels = cancels.saturating_sub(1);
            } else if let Some(p) = pending.get_mut(cqe.user_data() as usize) {
                *p = false;
            }
        }
        for (i, p) in pending.iter().enumerate() {
            if *p {
                let sqe = opcode::AsyncCancel::new(i as u64)
                    .build()
                    .user_data(CANCEL_TAG | i as u64);
                // SAFETY: AsyncCancel references no user memory.
                while unsafe { ring.submission().push(&sqe) }.is_err() {
                    ring.submit()
                        .map_err(|e| Error::os("io", "io_uring submit", e))?;
                }
                cancels += 1;
            }
        }
        // Reap every outstanding completion so the ring is clean for the next wait (RT-2).
        let mut outstanding = pending.iter().filter(|p| **p).count() + cancels;
        while outstanding > 0 {
            match ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) => return Err(Error::os("io", "io_uring reap", e)),
            }
            for cqe in ring.completion() {
                if cqe.user_data() & CANCEL_TAG != 0
                    || pending.get(cqe.user_data() as usize).is_some_and(|p| *p)
                {
                    outstanding = outstanding.saturating_sub(1);
                }
            }
        }
        Ok(())
    }

    /// One socket transfer through the ring with MSG_WAITALL: returns bytes moved (possibly fewer
    /// when the slice expired or the peer closed), 0 at EOF.
    fn transfer(
        &mut self,
        fd: RawFd,
        ptr: *mut u8,
        len: usize,
        write: bool,
        slice: Duration,
    ) -> std::io::Result<usize> {
        use io_uring::{opcode, types};
        let ring = self
            .get()
            .map_err(|_| std::io::Error::from_raw_os_error(libc::ENOSYS))?;
        let len32 = len.min(u32::MAX as usize & !4095) as u32;
        let sqe = if write {
            opcode::Send::new(types::Fd(fd), ptr, len32)
                .flags(libc::MSG_WAITALL | libc::MSG_NOSIGNAL)
                .build()
        } else {
            opcode::Recv::new(types::Fd(fd), ptr, len32)
                .flags(libc::MSG_WAITALL)
                .build()
        }
        .user_data(XFER_TAG);
        // SAFETY: ptr..ptr+len32 is valid for the whole operation: we reap its completion (below,
        // cancelling when the slice expires, or on an error path) before returning (RT-2, RT-4).
        unsafe { ring.submission().push(&sqe) }
            .map_err(|_| std::io::Error::from_raw_os_error(libc::EBUSY))?;
        let ts = types::Timespec::from(slice);
        let args = types::SubmitArgs::new().timespec(&ts);
        let mut cancelled = false;
        loop {
            match ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e) if transient(&e) => {}
                Err(e) => {
                    // The entry may be in flight: cancel and reap it first (RT-4).
                    reap_abandoned(ring, XFER_TAG);
                    return Err(e);
                }
            }
            let mut result = None;
            for cqe in ring.completion() {
                if cqe.user_data() == XFER_TAG {
                    result = Some(cqe.result());
                }
            }
            if let Some(r) = result {
                return if r >= 0 {
                    Ok(r as usize)
                } else if r == -libc::ECANCELED || r == -libc::EINTR {
                    Ok(0).and_then(|_| Err(std::io::Error::from_raw_os_error(libc::EAGAIN)))
                } else {
                    Err(std::io::Error::from_raw_os_error(-r))
                };
            }
            if !cancelled {
                let c = opcode::AsyncCancel::new(XFER_TAG)
                    .build()
                    .user_data(CANCEL_TAG);
                // SAFETY: AsyncCancel references no user memory. A full queue: retried next turn.
                cancelled = unsafe { ring.submission().push(&c) }.is_ok();
            }
        }
    }
}

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
    spin: Duration,
    what: &str,
) -> Result<bool> {
    let mut got = 0usize;
    let mut spins = 0u32;
    let spin_until = Instant::now() + spin;
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
                if Instant::now() < spin_until {
                    relax(&mut spins);
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
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(8);
        let mut budget = chunk;
        for (j, b) in bufs[idx..].iter().enumerate().take(64) {
            let start = if j == 0 { off } else { 0 };
            let n = (b.len() - start).min(budget);
            if n > 0 {
                iov.push(libc::iovec {
                    iov_base: b[start..].as_ptr() as *mut libc::c_void,
                    iov_len: n,
                });
            }
            budget -= n;
            if budget == 0 {
                break;
            }
        }
        let moved = match try_sendv(fd, &iov).map_err(|e| Error::os("send", what, e))? {
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

// ---------------------------------------------------------------------------------------------
// Completions and reactor threads

/// A one-shot result slot that a waiter can block on with a deadline.
pub struct Completion<T> {
    inner: Arc<(Mutex<Option<Result<T>>>, Condvar)>,
}

impl<T> std::fmt::Debug for Completion<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Completion(done: {})", self.done())
    }
}

impl<T> Clone for Completion<T> {
    fn clone(&self) -> Self {
        Completion {
            inner: self.inner.clone(),
        }
    }
}

impl<T> Default for Completion<T> {
    fn default() -> Self {
        Completion {
            inner: Arc::new((Mutex::new(None), Condvar::new())),
        }
    }
}

impl<T> Completion<T> {
    pub fn complete(&self, r: Result<T>) {
        let mut g = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.inner.1.notify_all();
    }

    pub fn done(&self) -> bool {
        self.inner
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Waits for the result and takes it; a second call reports that it was already taken.
    pub fn wait(&self, deadline: Deadline, op: &'static str) -> Result<T> {
        let mut g = self.inner.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.take() {
                *g = Some(Err(Error::new(
                    ErrorKind::Closed,
                    op,
                    "the result of this handle was already taken by an earlier wait()",
                )));
                return r;
            }
            let slice = deadline.slice(op, "the asynchronous operation")?;
            g = self
                .inner
                .1
                .wait_timeout(g, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

type Task = Box<dyn FnOnce() + Send>;

/// The pinned reactor threads.
pub struct Runtime {
    queues: Vec<Mutex<mpsc::Sender<Task>>>,
    next: AtomicUsize,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runtime({} reactors)", self.queues.len())
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return vec![0];
    }
    // SAFETY: reading bits of an initialised set.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect()
}

/// Blocks SIGINT and SIGTERM in the calling (engine-owned) thread, so they reach user threads.
pub fn block_signals() {
    // SAFETY: building a signal set and masking it for this thread only.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

impl Runtime {
    /// The process runtime, started on first use.
    pub fn get() -> &'static Runtime {
        RUNTIME.get_or_init(|| {
            let cfg = config();
            let cpus = if cfg.cpus.is_empty() {
                allowed_cpus()
            } else {
                cfg.cpus.clone()
            };
            let n = if cfg.threads == 0 {
                cpus.len().clamp(1, 4)
            } else {
                cfg.threads
            };
            let queues = (0..n)
                .map(|i| {
                    let (tx, rx) = mpsc::channel::<Task>();
                    // Topology (PIN-1..4): this process's share of the host's cores; the count of
                    // reactors above is unchanged.
                    let pins = crate::topology::reactor_cpus();
                    let cpu = pins[i % pins.len()];
                    let spawned = std::thread::Builder::new()
                        .name(format!("parallel-reactor-{i}"))
                        .spawn(move || {
                            block_signals();
                            crate::topology::pin_current_thread(cpu);
                            // Reactor threads never panic outward: a panicking task is contained.
                            while let Ok(task) = rx.recv() {
                                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task))
                                    .is_err()
                                {
                                    tracing::error!(
                                        "a task panicked on reactor {i}; the reactor keeps running"
                                    );
                                }
                            }
                        });
                    if let Err(e) = spawned {
                        tracing::error!("cannot start reactor thread {i}: {e}");
                    }
                    Mutex::new(tx)
                })
                .collect();
            Runtime {
                queues,
                next: AtomicUsize::new(0),
            }
        })
    }

    pub fn reactors(&self) -> usize {
        self.queues.len()
    }

    /// Runs `f` on reactor `key % reactors` (the same key always lands on the same reactor).
    pub fn spawn_on(&self, key: usize, f: impl FnOnce() + Send + 'static) {
        let q = &self.queues[key % self.queues.len()];
        let sent = q
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(Box::new(f));
        if sent.is_err() {
            tracing::error!(
                "reactor {} is gone; running the task on a fresh thread",
                key % self.queues.len()
            );
        }
    }

    /// Runs `f` on the next reactor, round-robin.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        self.spawn_on(k, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket_pair() -> [RawFd; 2] {
        let mut fds = [0; 2];
        // SAFETY: creating a socket pair into a valid array.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        fds
    }

    /// RT-2/RT-4: a large receive that fails (deadline, then the peer's death) leaves no ring
    /// entry behind: the bytes the peer sends afterwards are neither written into the released
    /// buffer (whose memory is reused at once) nor consumed from the socket.
    #[test]
    fn rt_4_no_transfer_outlives_its_buffer() {
        const N: usize = 1 << 20; // above the 64 KiB where receives go through the ring
        // (Through io_uring where it can run, as here; through epoll elsewhere: both must hold.)
        let [a, b] = socket_pair();
        // 1. A receive that times out with nothing sent (cancel on the deadline path).
        let mut buf = vec![0u8; N];
        let e = recv_exact(
            a,
            &mut buf,
            Deadline::after(Duration::from_millis(300)),
            Duration::ZERO,
            "t",
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        drop(buf);
        let reused = vec![0xAAu8; N]; // most likely the same memory
        let sent: Vec<u8> = (0..256 << 10).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                send_all(b, &[&sent], Deadline::after(Duration::from_secs(10)), "t").unwrap()
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            reused.iter().all(|x| *x == 0xAA),
            "a cancelled receive wrote freed memory"
        );
        let mut got = vec![0u8; sent.len()];
        assert!(
            recv_exact(
                a,
                &mut got,
                Deadline::after(Duration::from_secs(10)),
                Duration::ZERO,
                "t"
            )
            .unwrap()
        );
        assert!(
            got == sent,
            "bytes after a cancelled receive were lost or reordered"
        );
        writer.join().unwrap();
        // 2. The peer dies in the middle of a receive (the entry completes short, then EOF).
        let part = vec![7u8; 100 << 10];
        let writer = std::thread::spawn(move || {
            send_all(b, &[&part], Deadline::after(Duration::from_secs(10)), "t").unwrap();
            // SAFETY: we own b; closing it is the peer's death.
            unsafe { libc::close(b) };
        });
        let mut buf = vec![0u8; N];
        let e = recv_exact(
            a,
            &mut buf,
            Deadline::after(Duration::from_secs(10)),
            Duration::ZERO,
            "t",
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PeerLost, "{e}");
        assert!(
            buf[..100 << 10].iter().all(|x| *x == 7),
            "the bytes that did arrive"
        );
        drop(buf);
        let reused = vec![0x55u8; N];
        writer.join().unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert!(reused.iter().all(|x| *x == 0x55));
        // SAFETY: we own a.
        unsafe { libc::close(a) };
    }

    #[test]
    fn rt_1_waits_end_at_their_deadline() {
        let mut fds = [0; 2];
        // SAFETY: creating a socket pair into a valid array.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let t = Instant::now();
        let mut buf = [0u8; 4];
        let e = recv_exact(
            fds[0],
            &mut buf,
            Deadline::after(Duration::from_millis(150)),
            Duration::ZERO,
            "a test frame",
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout);
        assert!(t.elapsed() >= Duration::from_millis(150));
        send_all(
            fds[1],
            &[b"ab", b"cd"],
            Deadline::after(Duration::from_secs(5)),
            "x",
        )
        .unwrap();
        assert!(
            recv_exact(
                fds[0],
                &mut buf,
                Deadline::after(Duration::from_secs(5)),
                Duration::ZERO,
                "x"
            )
            .unwrap()
        );
        assert_eq!(&buf, b"abcd");
        // SAFETY: closing our own fds.
        unsafe { libc::close(fds[1]) };
        assert!(
            !recv_exact(
                fds[0],
                &mut buf,
                Deadline::after(Duration::from_secs(5)),
                Duration::ZERO,
                "x"
            )
            .unwrap()
        );
        // SAFETY: closing our own fd.
        unsafe { libc::close(fds[0]) };
    }

    #[test]
    fn large_transfer_through_backend() {
        let mut fds = [0; 2];
        // SAFETY: creating a socket pair into a valid array.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0);
        let data: Vec<u8> = (0..(3 << 20)).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let w = fds[1];
        let t = std::thread::spawn(move || {
            send_all(w, &[&d2], Deadline::after(Duration::from_secs(10)), "big").unwrap()
        });
        let mut got = vec![0u8; data.len()];
        assert!(
            recv_exact(
                fds[0],
                &mut got,
                Deadline::after(Duration::from_secs(10)),
                Duration::ZERO,
                "big"
            )
            .unwrap()
        );
        t.join().unwrap();
        assert!(got == data);
        // SAFETY: closing our own fds.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1])
        };
    }

    #[test]
    fn completion_wait_times_out_and_delivers() {
        let c: Completion<u32> = Completion::default();
        assert_eq!(
            c.wait(Deadline::after(Duration::from_millis(20)), "t")
                .unwrap_err()
                .kind(),
            ErrorKind::Timeout
        );
        let c2 = c.clone();
        Runtime::get().spawn(move || c2.complete(Ok(5)));
        assert_eq!(
            c.wait(Deadline::after(Duration::from_secs(5)), "t")
                .unwrap(),
            5
        );
        assert!(c.done());
    }
}

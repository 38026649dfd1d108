//! The runtime, the one executor: the I/O backend (io_uring, or epoll where io_uring cannot
//! run), deadlines and waits, the wait policy, and the pinned reactor threads that run
//! asynchronous operations, accept loops and ordered lanes of blocking work.
//!
//! Files: `backend.rs` (the epoll and io_uring waits and transfers), `io.rs` (non-blocking
//! socket attempts, `recv_exact`, `send_all`), `spin.rs` (when a waiter may spin: SPIN-1..5),
//! `spread.rs` (a waiter off its peer's CPU, or onto it under load: SPREAD-1..4), `reactor.rs`
//! (completions, reactor threads, lanes: EXEC-1..3).
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
//!   entry carries its own tag (`XFER_TAG`), so no other completion (a stale poll, a cancel) is
//!   ever taken for it. If the kernel refuses to reap for `REAP_LIMIT` (io_uring_enter failing
//!   persistently, never seen in practice), the process aborts with a log line: returning would
//!   hand the kernel freed memory.

mod backend;
mod futex;
mod io;
mod reactor;
mod spin;
pub mod spread;
#[cfg(test)]
mod tests;

pub use futex::futex;
pub(crate) use io::{Attempt, recv_exact, send_all, try_recv};
pub use reactor::{Completion, Lane, Runtime, block_signals};
pub use spin::{
    LOAD_PERIOD, SLOTS, Spin, SpinStats, Spun, refresh_load, relax, spin_stats, spin_until,
};

use crate::config::{IoChoice, config};
use crate::error::{Error, ErrorKind, Result};
use backend::{EPOLL, RING};
use std::os::fd::RawFd;
use std::sync::OnceLock;
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
    /// `timeout` (or `PARALLEL_TIMEOUT`) after `start`, an instant the caller already read: an
    /// operation that times itself from `start` saves reading the clock twice.
    pub fn starting(start: Instant, timeout: Option<Duration>) -> Deadline {
        let t = timeout.unwrap_or(config().timeout);
        Deadline {
            at: start
                .checked_add(t)
                .unwrap_or_else(|| start + Duration::from_secs(86400 * 365)),
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

//! The two I/O backends behind [`super::wait_once`] and the large transfers of `io.rs`: a
//! thread-local epoll instance, and a thread-local io_uring (RT-2, RT-4).

use super::SLICE;
use crate::error::{Error, Result};
use std::cell::RefCell;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::Interest;

thread_local! {
    pub(super) static EPOLL: RefCell<Epoll> = const { RefCell::new(Epoll { fd: -1 }) };
}

pub(super) struct Epoll {
    fd: RawFd,
}

impl Epoll {
    pub(super) fn wait(&mut self, fds: &[(RawFd, Interest)], slice: Duration) -> Result<()> {
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
    pub(super) static RING: RefCell<Ring> = const { RefCell::new(Ring { ring: None }) };
}

pub(super) struct Ring {
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
    pub(super) fn poll(&mut self, fds: &[(RawFd, Interest)], slice: Duration) -> Result<()> {
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
    pub(super) fn transfer(
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

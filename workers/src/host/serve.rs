//! The creator's listener thread: hands the queue's memfd to every same-user process that
//! connects (HQ-1, HQ-6).

use super::*;

/// The creator's listener: hands the memfd to every same-user process that connects (HQ-1).
pub(super) fn serve(listener: OwnedFd, stop: RawFd, inner: Weak<Inner>) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds; a bounded wait so a vanished queue is noticed.
        unsafe { libc::poll(fds.as_mut_ptr(), 2, 500) };
        if fds[1].revents != 0 {
            return;
        }
        let Some(inner) = inner.upgrade() else { return };
        if inner.owner_dropped.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: accepting on our listening socket; the new fd is owned below.
        let c = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if c < 0 {
            continue;
        }
        // SAFETY: a fresh fd from accept4.
        let conn = unsafe { OwnedFd::from_raw_fd(c) };
        let cred = crate::sys::peer_cred(conn.as_raw_fd()).ok();
        if cred.map(|c| c.uid) != Some(my_uid()) {
            tracing::warn!(
                "refused a process of another user that tried to open work queue {:?}",
                inner.name
            );
            continue;
        }
        // HQ-6: it counts as a worker from now on, until it attaches and closes, or dies.
        if let Some(c) = cred
            && let Err(e) = inner
                .seg
                .reserve(c.pid as u32, Deadline::after(Duration::from_secs(5)))
        {
            tracing::warn!(
                "work queue {:?}: could not reserve an entry for process {}: {e}",
                inner.name,
                c.pid
            );
        }
        if let Err(e) = HostQueue::switch_to_shared(&inner) {
            tracing::error!(
                "work queue {:?}: moving questions to shared memory failed: {e}",
                inner.name
            );
            continue;
        }
        if let Err(e) = sys::send_fds(
            conn.as_raw_fd(),
            b"PRLWQ\x01\0\0",
            &[inner.seg.fd.as_raw_fd()],
        ) {
            tracing::warn!(
                "work queue {:?}: handing the queue to a process failed: {e}",
                inner.name
            );
        }
    }
}

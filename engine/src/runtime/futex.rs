//! The futex system call on a shared word: the kernel wait of shared-memory structures that live
//! in mappings several processes share (the WorkQueue's lock, the Tree's flat region).

use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// A futex operation (`FUTEX_WAIT`, `FUTEX_WAKE`; not the private variants, so the word may be
/// shared between processes) on `w`, waiting at most `timeout`; `Some(errno)` when it failed.
pub fn futex(w: &AtomicU32, op: libc::c_int, val: u32, timeout: Option<Duration>) -> Option<i32> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `w` is a live, aligned u32 for the duration of the call and `tp` is null or points
    // to a live timespec; the kernel only compares, sleeps and wakes.
    let rc = unsafe { libc::syscall(libc::SYS_futex, w.as_ptr(), op, val, tp) };
    (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
}

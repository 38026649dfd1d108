//! The queue's lock: one futex word in the mapping holding the holder's pid (SHQ-2, SHQ-7).

use super::*;

/// Set in the lock word while a process waits for the lock (SHQ-7); pids stay below 2^22.
pub(super) const CONTENDED: u32 = 1 << 31;

pub(super) use parallel_engine::runtime::futex;

pub(super) struct Guard<'a> {
    seg: &'a Segment,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let w = &self.seg.hdr().lock;
        if w.swap(0, Ordering::Release) & CONTENDED != 0 {
            futex(w, libc::FUTEX_WAKE, 1, None);
        }
    }
}

impl Segment {
    /// Takes the queue's lock, taking it over (and repairing) from a dead holder (SHQ-2, SHQ-7).
    pub(super) fn lock(&self, deadline: Deadline) -> Result<Guard<'_>> {
        let w = &self.hdr().lock;
        let mut want = self.pid;
        for _ in 0..64 {
            if w.compare_exchange(0, want, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Guard { seg: self });
            }
            std::hint::spin_loop();
        }
        // From now on we may sleep: whoever holds the lock must wake a sleeper when it unlocks,
        // and we keep the mark when we get the lock (other sleepers may remain).
        want |= CONTENDED;
        loop {
            let cur = w.load(Ordering::Relaxed);
            if cur == 0 {
                if w.compare_exchange(0, want, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(Guard { seg: self });
                }
                continue;
            }
            if cur & CONTENDED == 0
                && w.compare_exchange(cur, cur | CONTENDED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let slice = deadline
                .slice("workqueue", "the queue's lock (another process holds it)")?
                .min(Duration::from_millis(10));
            if futex(w, libc::FUTEX_WAIT, cur | CONTENDED, Some(slice)) == Some(libc::ETIMEDOUT) {
                let holder = cur & !CONTENDED;
                if holder != self.pid
                    && !alive(holder, 0)
                    && w.compare_exchange(
                        cur | CONTENDED,
                        want,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    let g = Guard { seg: self };
                    tracing::warn!(
                        "process {holder} died holding a work queue's lock (or its lock word was overwritten); repairing the queue"
                    );
                    self.repair(&g);
                    return Ok(g);
                }
            }
        }
    }
}

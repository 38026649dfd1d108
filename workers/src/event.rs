//! Parking for the queues: an event count over a 32-bit futex word.
//!
//! A waiter reads the epoch, announces itself in `waiters`, re-checks its condition and sleeps
//! on the futex only if the epoch is still the one it read. A notifier makes its change visible,
//! bumps the epoch and issues the (costly) wake system call only when someone announced itself.
//! The words may live in process memory or in a shared mapping (the futex is not private then),
//! so one [`Event`] can wake threads of several processes.
//!
//! Invariants:
//! - EVENT-1 (no lost wake-up): the waiter's order is `e = epoch; waiters += 1; check; wait(epoch
//!   == e)`, the notifier's `change; epoch += 1; if waiters > 0 { wake }`, all SeqCst. Either the
//!   waiter's check sees the change, or the notifier sees the waiter (and wakes it), or the epoch
//!   moved before the wait (which then returns at once). The notifier reads `waiters` with an RMW
//!   and the futex compares the word's latest value, so the outcome "both read stale values" of
//!   the store-buffer pattern cannot occur. Loom checks this with the futex modelled
//!   by a mutex and condition variable (`loom_event_no_lost_wakeup`).
//! - EVENT-2: every wait has a deadline and runs in slices ([`parallel_engine::runtime::SLICE`]) with the
//!   interrupt check between them (RT-1); a waiter always takes itself out of `waiters`.

use crate::sync::{AtomicU32, Ordering};
use parallel_engine::error::Result;
use parallel_engine::runtime::Deadline;
use std::time::Duration;

/// The two words of an event, in process or shared memory.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct EventWords {
    pub epoch: AtomicU32,
    pub waiters: AtomicU32,
}

impl Default for EventWords {
    fn default() -> Self {
        EventWords {
            epoch: AtomicU32::new(0),
            waiters: AtomicU32::new(0),
        }
    }
}

/// Where an event's words live.
pub(crate) enum EventRef {
    /// Owned by this process.
    Own(Box<EventWords>),
    /// Inside a shared mapping that the holder keeps alive.
    #[cfg_attr(loom, allow(dead_code))]
    Shared(*const EventWords),
}

impl std::fmt::Debug for EventRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EventRef::Own(_) => write!(f, "Event(own)"),
            EventRef::Shared(p) => write!(f, "Event(shared at {p:?})"),
        }
    }
}

// SAFETY: the words are atomics; a Shared pointer targets a mapping its holder keeps alive for
// the event's lifetime (see `Event::shared`).
unsafe impl Send for EventRef {}
// SAFETY: as above.
unsafe impl Sync for EventRef {}

/// An event waiters park on.
#[derive(Debug)]
pub(crate) struct Event {
    words: EventRef,
    #[cfg(loom)]
    model: (crate::sync::Mutex<()>, crate::sync::Condvar),
}

impl Default for Event {
    fn default() -> Self {
        Event::own()
    }
}

impl Event {
    pub(crate) fn own() -> Event {
        Event {
            words: EventRef::Own(Box::default()),
            #[cfg(loom)]
            model: (crate::sync::Mutex::new(()), crate::sync::Condvar::new()),
        }
    }

    /// An event whose words are at `p` inside a shared mapping.
    ///
    /// # Safety
    /// `p` must point at an `EventWords` inside a mapping that stays mapped while this event
    /// lives (the owner of the event also holds the mapping).
    #[cfg(not(loom))]
    pub(crate) unsafe fn shared(p: *const EventWords) -> Event {
        Event {
            words: EventRef::Shared(p),
        }
    }

    fn w(&self) -> &EventWords {
        match &self.words {
            EventRef::Own(b) => b,
            // SAFETY: `Event::shared`'s contract keeps the mapping alive while we exist.
            EventRef::Shared(p) => unsafe { &**p },
        }
    }

    /// Wakes every waiter (after the caller made its change visible; EVENT-1).
    pub(crate) fn notify(&self) {
        let w = self.w();
        w.epoch.fetch_add(1, Ordering::SeqCst);
        // An RMW, not a load: it reads the latest `waiters` even where SeqCst loads are modelled
        // weaker (loom), closing the store-buffer window of EVENT-1.
        if w.waiters.fetch_add(0, Ordering::SeqCst) > 0 {
            self.wake_all();
        }
    }

    /// Waits until `ready()` returns true, the deadline passes, or an interrupt is pending
    /// (EVENT-2). Spins for `spin` first, which saves the wake-up system calls on busy queues.
    pub(crate) fn wait_until(
        &self,
        deadline: Deadline,
        spin: Duration,
        op: &'static str,
        what: &str,
        mut ready: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        if ready()? {
            return Ok(());
        }
        // The runtime's wait policy decides whether to spin at all (SPIN-1..5).
        let mut spinning = parallel_engine::runtime::Spin::start(spin);
        while spinning.step() {
            if ready()? {
                return Ok(());
            }
        }
        let w = self.w();
        loop {
            let e = w.epoch.load(Ordering::SeqCst);
            w.waiters.fetch_add(1, Ordering::SeqCst);
            let r = match ready() {
                Ok(true) => Ok(true),
                Ok(false) => match deadline.slice(op, what) {
                    Ok(slice) => {
                        self.sleep(e, slice);
                        Ok(false)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            w.waiters.fetch_sub(1, Ordering::SeqCst);
            if r? {
                return Ok(());
            }
            if ready()? {
                return Ok(());
            }
        }
    }

    #[cfg(not(loom))]
    fn sleep(&self, e: u32, slice: Duration) {
        let w = self.w();
        let ts = libc::timespec {
            tv_sec: slice.as_secs() as libc::time_t,
            tv_nsec: slice.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on a live, aligned u32 (our own box or a word in a mapping kept
        // alive, per `Event::shared`); the kernel returns at once if it no longer holds `e`.
        // Not FUTEX_PRIVATE: the word may be shared between processes.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                w.epoch.as_ptr(),
                libc::FUTEX_WAIT,
                e,
                &ts as *const libc::timespec,
            )
        };
    }

    #[cfg(not(loom))]
    fn wake_all(&self) {
        // SAFETY: FUTEX_WAKE on a live, aligned u32; it only wakes sleepers of this address.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.w().epoch.as_ptr(),
                libc::FUTEX_WAKE,
                i32::MAX,
            )
        };
    }

    // Loom model of the futex: compare-and-sleep is atomic under the model's mutex.
    #[cfg(loom)]
    fn sleep(&self, e: u32, _slice: Duration) {
        let g = self.model.0.lock().unwrap();
        // The kernel compares the futex word's current value: an RMW reads the latest one.
        if self.w().epoch.fetch_add(0, Ordering::SeqCst) == e {
            drop(self.model.1.wait(g).unwrap());
        }
    }

    #[cfg(loom)]
    fn wake_all(&self) {
        let _g = self.model.0.lock().unwrap();
        self.model.1.notify_all();
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use crate::sync::{Arc, AtomicBool};
    use loom::thread;

    /// EVENT-1: a waiter parked on the event always sees a change made and notified by another
    /// thread (loom reports a deadlock if a wake-up could be lost).
    #[test]
    fn loom_event_no_lost_wakeup() {
        loom::model(|| {
            let ev = Arc::new(Event::own());
            let flag = Arc::new(AtomicBool::new(false));
            let (ev2, flag2) = (ev.clone(), flag.clone());
            let t = thread::spawn(move || {
                flag2.store(true, Ordering::SeqCst);
                ev2.notify();
            });
            ev.wait_until(
                Deadline::after(Duration::from_secs(3600)),
                Duration::ZERO,
                "test",
                "the flag",
                || Ok(flag.load(Ordering::SeqCst)),
            )
            .unwrap();
            t.join().unwrap();
        });
    }
}

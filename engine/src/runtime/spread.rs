//! Keeping a waiter off the CPU of the thread it waits for.
//!
//! Two processes that hand small messages to each other through shared memory alternate: one
//! works while the other waits. When both end up on one CPU, the pair never looks like more than
//! one CPU's load (only one of them is runnable at a time), so the load balancer leaves them
//! there, and a wake-up keeps placing the woken thread next to its waker. The waiter's spin
//! then holds the very CPU its peer needs: the spin runs out its budget, later waits are skipped
//! to the kernel (SPIN-3), and every hand-off costs two context switches on one CPU while the
//! other idles. Measured with 2 ranks on this 2-CPU VM, both forced onto one CPU at the start of
//! a loop of 20 all-reduces of 4 KiB: in 4 launches of 8 they stayed there, at 12-141 us per
//! all-reduce (median of the launch) against 4-5 us; launched plainly, 2 of 30 launches ended
//! like that by themselves.
//!
//! Invariants:
//! - SPREAD-1: a writer of a shared-memory structure that a peer process waits on publishes,
//!   with what it wrote, the CPU it ran on ([`cpu_word`]: CPU + 1, 0 for unknown).
//! - SPREAD-2: a waiter whose spin ran out its budget, or was skipped after spins that did
//!   ([`super::Spin::unpaid`]; not one declined for busy cores, where another CPU is no better),
//!   while a peer it waits for last ran on the waiter's own CPU moves itself to another CPU it
//!   may run on
//!   ([`after_failed_spin`]): its affinity excludes this CPU for an instant (the kernel migrates
//!   it at once), then the thread's own mask is set back exactly as it was. A thread that may run
//!   on one CPU only (a pinned reactor, a pinned application thread) never moves.
//! - SPREAD-3: a thread moves at most once per [`PERIOD`], so a machine that keeps placing the
//!   pair together (more ranks than CPUs) costs at most two system calls per period; none at all
//!   with `PARALLEL_SPREAD=0`. Moves are counted (`wait_stats()["spread_moves"]`).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest time between two moves of one thread (SPREAD-3).
pub const PERIOD: Duration = Duration::from_millis(10);

static MOVES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// When this thread last moved (SPREAD-3).
    static LAST_MOVE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The CPU the calling thread runs on, as published (SPREAD-1): CPU + 1, or 0 when unknown.
pub fn cpu_word() -> u32 {
    // SAFETY: no arguments, no memory effects (the vDSO or rseq answers it).
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).map_or(0, |c| c.saturating_add(1))
}

/// Moves this process has made (SPREAD-3).
pub fn moves() -> u64 {
    MOVES.load(Ordering::Relaxed)
}

/// The decision of SPREAD-2 and SPREAD-3, a pure function of what was observed: move when
/// enabled, this thread's CPU is known and is one a peer last ran on, and the last move is at
/// least [`PERIOD`] old.
pub(crate) fn should_move(
    enabled: bool,
    mine: u32,
    mut peers: impl Iterator<Item = u32>,
    last: Option<Instant>,
    now: Instant,
) -> bool {
    enabled
        && mine != 0
        && peers.any(|p| p == mine)
        && last.is_none_or(|t| now.saturating_duration_since(t) >= PERIOD)
}

/// SPREAD-2: called by a waiter whose spin did not pay ([`super::Spin::unpaid`]), with the CPU
/// words
/// ([`cpu_word`]) its awaited peers published. Moves the calling thread to another CPU when a
/// peer last ran on this one; returns whether it moved.
pub fn after_failed_spin(peers: impl IntoIterator<Item = u32>) -> bool {
    let now = Instant::now();
    let last = LAST_MOVE.with(Cell::get);
    let enabled = crate::config::config().spread;
    let mine = cpu_word();
    if !should_move(enabled, mine, peers.into_iter(), last, now) {
        return false;
    }
    // Counted as an attempt even when the mask forbids it: a pinned thread asks once a period.
    LAST_MOVE.with(|l| l.set(Some(now)));
    let moved = step_off(mine as usize - 1);
    if moved {
        MOVES.fetch_add(1, Ordering::Relaxed);
    }
    moved
}

/// Moves the calling thread off `cpu` and gives it back its own affinity mask (SPREAD-2).
fn step_off(cpu: usize) -> bool {
    let size = std::mem::size_of::<libc::cpu_set_t>();
    // SAFETY: cpu_set_t is plain bits; all zero is the empty set.
    let mut own: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; `own` is a live cpu_set_t of `size` bytes.
    if unsafe { libc::sched_getaffinity(0, size, &mut own) } != 0 {
        return false;
    }
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: bit reads of a live cpu_set_t; `cpu` is within its size.
    let (here, count) = unsafe { (libc::CPU_ISSET(cpu, &own), libc::CPU_COUNT(&own)) };
    if !here || count < 2 {
        return false;
    }
    let mut away = own;
    // SAFETY: as above, a bit write.
    unsafe { libc::CPU_CLR(cpu, &mut away) };
    // SAFETY: as above; the kernel migrates the thread before this call returns.
    if unsafe { libc::sched_setaffinity(0, size, &away) } != 0 {
        return false;
    }
    // SAFETY: as above. Restoring can only fail if the allowed CPUs changed in between (a cpuset
    // change); then one more try, and a warning if the thread stays restricted.
    let restore = || unsafe { libc::sched_setaffinity(0, size, &own) } == 0;
    if !restore() && !restore() {
        tracing::warn!(
            "could not give this thread its CPU affinity back after moving it off CPU {cpu} ({}); \
             set PARALLEL_SPREAD=0 to stop these moves",
            std::io::Error::last_os_error()
        );
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask() -> Vec<usize> {
        crate::runtime::reactor::allowed_cpus()
    }

    #[test]
    fn spread_2_3_decision() {
        let now = Instant::now();
        let old = now.checked_sub(PERIOD);
        let recent = now.checked_sub(PERIOD / 2);
        assert!(should_move(true, 2, [5, 2].into_iter(), None, now));
        assert!(should_move(true, 2, [2].into_iter(), old, now));
        // Not on a peer's CPU, or unknown: stay.
        assert!(!should_move(true, 2, [1, 3].into_iter(), None, now));
        assert!(!should_move(true, 0, [0].into_iter(), None, now));
        assert!(!should_move(true, 2, std::iter::empty(), None, now));
        // SPREAD-3: once per period; never when turned off.
        assert!(!should_move(true, 2, [2].into_iter(), recent, now));
        assert!(!should_move(false, 2, [2].into_iter(), None, now));
    }

    #[test]
    fn spread_2_a_move_leaves_the_cpu_and_restores_the_mask() {
        std::thread::spawn(|| {
            let before = mask();
            let cpu = cpu_word();
            assert!(cpu > 0, "sched_getcpu works on Linux");
            let moved = after_failed_spin([cpu]);
            assert_eq!(mask(), before, "the thread's own mask is back");
            if before.len() < 2 {
                assert!(!moved, "one allowed CPU: nowhere to go");
                return;
            }
            assert!(moved);
            // The kernel migrated the thread before setaffinity returned; nothing runs it back
            // this soon (the mask allows it, but only a wake-up or the balancer would).
            let now = cpu_word();
            assert_ne!(now, cpu, "still on CPU {}", cpu - 1);
            // SPREAD-3: not again within the period, even on a peer's CPU.
            assert!(!after_failed_spin([now]));
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn spread_2_a_thread_pinned_to_one_cpu_never_moves() {
        std::thread::spawn(|| {
            let cpu = cpu_word();
            assert!(cpu > 0);
            let one = core_affinity::set_for_current(core_affinity::CoreId {
                id: cpu as usize - 1,
            });
            assert!(one, "pinning to the CPU it runs on");
            assert!(!after_failed_spin([cpu]));
            assert_eq!(mask(), vec![cpu as usize - 1], "still pinned there");
            assert_eq!(cpu_word(), cpu);
        })
        .join()
        .expect("the test thread");
    }
}

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
//!   with what it wrote, the CPU it ran on ([`cpu_word`]: CPU + 1, 0 for unknown), on the line it
//!   writes anyway. The word is the peer's (untrusted): it is compared, and SPREAD-4 takes it as
//!   a CPU to move onto only when it lies in the thread's own mask (bounds-checked); never an
//!   index into memory. A waiter that moved publishes where it went in its place (the Tree's fast
//!   path), so that its peer does not chase the CPU it left; a ring's word says where its writer
//!   ran until the next publish (only SPREAD-2 reads it, and only compares it).
//! - SPREAD-2: a waiter whose spin did not pay ([`super::Spin::unpaid`]: it ran out its budget,
//!   or was skipped after spins that did) while a peer it waits for last ran on the waiter's own
//!   CPU, and while the cores are not all busy (SPIN-2's load sample: where every CPU is taken,
//!   another is no better), moves itself to another CPU it may run on ([`after_unpaid_spin`]):
//!   its affinity leaves out this CPU for an instant, preferring the CPUs of its NUMA node (the
//!   kernel migrates it before the call returns), then the mask it had is set back. A thread that
//!   may run on one CPU only (a pinned reactor, a pinned application thread) never moves. After a
//!   move the thread's SPIN-3 skip is cleared: what made its spins fail is gone.
//! - SPREAD-3: a thread tries at most once per [`PERIOD`] (at most four system calls each), so a
//!   machine that keeps placing the pair together (more ranks than CPUs) costs little; nothing
//!   with `PARALLEL_SPREAD=0` or `PARALLEL_SPIN_US=0` (no spin, so none that did not pay). Moves
//!   are counted (`wait_stats()["spread_moves"]`).
//! - SPREAD-4 (pairing under load): where every core is busy (SPIN-2 declined the spin for
//!   busy cores), the opposite holds: on the Tree's shared-memory fast path between two ranks,
//!   a waiter moves itself onto the CPU the other rank last published from
//!   ([`pair_under_load`]), within its own mask, which is set back at once, under SPREAD-3's
//!   period and switch (`PARALLEL_SPREAD=0`, `PARALLEL_SPIN_US=0`: no moves). Counted apart
//!   (`wait_stats()["spread_pairs"]`). Measured with 2 ranks on this 2-CPU VM, each with one
//!   busy compute thread, 4 KiB all-reduces, the threads pinned by hand: the two ranks' main
//!   threads on one CPU and the compute threads on the other, a median of 10 us and a p99 of
//!   17-25 us; each main thread beside its own compute thread (as ranks bound to a CPU each
//!   are, which this cannot help), 31-34 us and a p99 of 4 ms (a woken thread that did not
//!   preempt the compute thread waits for the next tick). Only two ranks pair: with more,
//!   several waiters would join one straggler and take turns on its CPU (not measured). The
//!   rings do not pair (measured at 1 MiB: no clear gain). Near the load threshold SPREAD-2 and
//!   SPREAD-4 may part and join a pair in turn, each at most once per period and thread.
//!
//! Side effects, as of any `sched_setaffinity`: on Linux 6.2 and later the kernel records the
//! mask set back as the thread's requested one, so a later widening of the container's cpuset
//! does not reach a thread that moved; a CPU offline at the moment of the move is not in the
//! mask set back. Not covered: more than 1024 CPUs (`cpu_set_t`'s size: no moves there), the
//! server's `recv_any` and the work queues' waits (no writer CPU published yet).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest time between two tries of one thread (SPREAD-3).
pub const PERIOD: Duration = Duration::from_millis(10);

static MOVES: AtomicU64 = AtomicU64::new(0);
static PAIRS: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// When this thread last tried to move (SPREAD-3).
    static LAST_TRY: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The CPU the calling thread runs on, as published (SPREAD-1): CPU + 1, or 0 when unknown.
pub fn cpu_word() -> u32 {
    // SAFETY: no arguments, no memory effects (on x86_64 the vDSO or rseq answers it without a
    // system call; elsewhere it may be one).
    let c = unsafe { libc::sched_getcpu() };
    u32::try_from(c).map_or(0, |c| c.saturating_add(1))
}

/// Moves off a peer's CPU this process has made (SPREAD-2, SPREAD-3).
pub fn moves() -> u64 {
    MOVES.load(Ordering::Relaxed)
}

/// Moves onto a peer's CPU this process has made (SPREAD-4).
pub fn pairs() -> u64 {
    PAIRS.load(Ordering::Relaxed)
}

/// The decision of SPREAD-2 and SPREAD-3 (but for the load, asked last), a pure function of
/// what was observed: move when enabled, this thread's CPU is known and is one a peer last ran
/// on, and the last try is at least [`PERIOD`] old.
pub(crate) fn should_move(
    enabled: bool,
    mine: u32,
    mut peers: impl Iterator<Item = u32>,
    last: Option<Instant>,
    now: Instant,
) -> bool {
    enabled && mine != 0 && peers.any(|p| p == mine) && period_over(last, now)
}

/// SPREAD-3: whether a try at `now` is at least [`PERIOD`] after the last one (`last`).
fn period_over(last: Option<Instant>, now: Instant) -> bool {
    last.is_none_or(|t| now.saturating_duration_since(t) >= PERIOD)
}

/// The decision of SPREAD-4 but for the load (asked last): pair when enabled, both CPUs are
/// known and differ, and the last try is at least [`PERIOD`] old.
pub(crate) fn should_pair(
    enabled: bool,
    mine: u32,
    peer: u32,
    last: Option<Instant>,
    now: Instant,
) -> bool {
    enabled && mine != 0 && peer != 0 && peer != mine && period_over(last, now)
}

/// SPREAD-4: called by a waiter whose spin was declined for busy cores, with the CPU word
/// ([`cpu_word`]) the one peer it waits for published (untrusted). Moves the calling thread
/// onto that CPU when every core is busy and its mask holds it, and sets the mask back; the
/// CPU word it moved to, None when it did not move.
pub fn pair_under_load(peer: u32) -> Option<u32> {
    let enabled = crate::config::config().spread;
    pair_if(enabled, peer, cpu_word(), Instant::now(), || {
        !super::spin::cores_free()
    })
}

/// [`pair_under_load`] for a thread on CPU word `mine` at `now`, `busy` asked last (it takes
/// a load sample): SPREAD-4's decision and move, with what it observes passed in.
fn pair_if(
    enabled: bool,
    peer: u32,
    mine: u32,
    now: Instant,
    busy: impl FnOnce() -> bool,
) -> Option<u32> {
    let last = LAST_TRY.with(Cell::get);
    if !should_pair(enabled, mine, peer, last, now) || !busy() {
        return None;
    }
    // A try counts even when the mask forbids the move (SPREAD-3).
    LAST_TRY.with(|l| l.set(Some(now)));
    let there = step_onto(peer as usize - 1)?;
    PAIRS.fetch_add(1, Ordering::Relaxed);
    Some(there)
}

/// SPREAD-2: called by a waiter whose spin did not pay ([`super::Spin::unpaid`]), with the
/// CPU words ([`cpu_word`]) its awaited peers published. Moves the calling thread to another CPU
/// when a peer last ran on this one; the CPU word it moved to, None when it did not move.
pub fn after_unpaid_spin(peers: impl IntoIterator<Item = u32>) -> Option<u32> {
    let now = Instant::now();
    let mine = cpu_word();
    let enabled = crate::config::config().spread;
    let last = LAST_TRY.with(Cell::get);
    if !should_move(enabled, mine, peers.into_iter(), last, now) || !super::spin::cores_free() {
        return None;
    }
    // A try counts even when the mask forbids the move: a pinned thread asks once a period.
    LAST_TRY.with(|l| l.set(Some(now)));
    let cpu = mine as usize - 1;
    let nodes = &crate::topology::topology().numa_nodes;
    let node = nodes.iter().find(|n| n.cpus.contains(&cpu));
    let there = step_off(cpu, node.map_or(&[], |n| &n.cpus))?;
    MOVES.fetch_add(1, Ordering::Relaxed);
    super::spin::note_moved();
    Some(there)
}

/// Bit operations on a `cpu_set_t`, each bounded by its size.
mod bits {
    pub(super) const SIZE: usize = libc::CPU_SETSIZE as usize;

    pub(super) fn empty() -> libc::cpu_set_t {
        // SAFETY: cpu_set_t is plain bits; all zero is the empty set.
        unsafe { std::mem::zeroed() }
    }

    pub(super) fn has(s: &libc::cpu_set_t, c: usize) -> bool {
        // SAFETY: a bit read of a live set, `c` within its size.
        c < SIZE && unsafe { libc::CPU_ISSET(c, s) }
    }

    pub(super) fn set(s: &mut libc::cpu_set_t, c: usize) {
        if c < SIZE {
            // SAFETY: a bit write of a live set, `c` within its size.
            unsafe { libc::CPU_SET(c, s) };
        }
    }

    pub(super) fn clear(s: &mut libc::cpu_set_t, c: usize) {
        if c < SIZE {
            // SAFETY: as in `set`.
            unsafe { libc::CPU_CLR(c, s) };
        }
    }

    pub(super) fn count(s: &libc::cpu_set_t) -> usize {
        // SAFETY: reads the bits of a live set.
        usize::try_from(unsafe { libc::CPU_COUNT(s) }).unwrap_or(0)
    }
}

/// The mask that leaves out `cpu`: `own` without it, kept to `near` where that leaves a CPU;
/// None when `own` does not hold `cpu` or holds nothing else (SPREAD-2).
pub(crate) fn away_mask(
    own: &libc::cpu_set_t,
    cpu: usize,
    near: &[usize],
) -> Option<libc::cpu_set_t> {
    if !bits::has(own, cpu) {
        return None;
    }
    let mut away = *own;
    bits::clear(&mut away, cpu);
    if bits::count(&away) == 0 {
        return None;
    }
    let mut close = bits::empty();
    for &c in near.iter().filter(|&&c| bits::has(&away, c)) {
        bits::set(&mut close, c);
    }
    Some(if bits::count(&close) > 0 { close } else { away })
}

/// The calling thread's affinity mask; None when the kernel does not say.
fn own_mask() -> Option<libc::cpu_set_t> {
    let mut own = bits::empty();
    // SAFETY: pid 0 is the calling thread; `own` is a live cpu_set_t of the size given.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut own) };
    (rc == 0).then_some(own)
}

/// Sets the calling thread's affinity mask; whether the kernel took it.
fn set_affinity(mask: &libc::cpu_set_t) -> bool {
    // SAFETY: pid 0 is the calling thread; `mask` is a live cpu_set_t of the size given. The
    // kernel migrates the thread before returning when its CPU left the mask.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), mask) == 0 }
}

/// Moves the calling thread off `cpu` (to a CPU of `near` where it may) and sets its mask back
/// (SPREAD-2); the CPU word it ran on while moved away, None when it did not move.
fn step_off(cpu: usize, near: &[usize]) -> Option<u32> {
    if cpu >= bits::SIZE {
        return None;
    }
    let own = own_mask()?;
    let away = away_mask(&own, cpu, near)?;
    if !set_affinity(&away) {
        return None;
    }
    let there = cpu_word();
    set_back(&own, cpu, "off");
    Some(there)
}

/// Moves the calling thread onto `cpu` when its mask holds it, and sets its mask back
/// (SPREAD-4); the CPU word it ran on there, None when it did not move.
fn step_onto(cpu: usize) -> Option<u32> {
    if cpu >= bits::SIZE {
        return None;
    }
    let own = own_mask().filter(|own| bits::has(own, cpu))?;
    let mut onto = bits::empty();
    bits::set(&mut onto, cpu);
    if !set_affinity(&onto) {
        return None;
    }
    let there = cpu_word();
    set_back(&own, cpu, "onto");
    Some(there)
}

/// Sets the calling thread's mask back to `own` after a move `dir` ("off" or "onto") CPU
/// `cpu`. That fails only if the allowed CPUs changed in between (a cpuset change that took
/// all of them); then every CPU is asked for, which the kernel narrows to the cpuset, so the
/// thread keeps the mask of the move only if that fails too (logged).
fn set_back(own: &libc::cpu_set_t, cpu: usize, dir: &str) {
    if set_affinity(own) {
        return;
    }
    let why = std::io::Error::last_os_error();
    let mut all = bits::empty();
    (0..bits::SIZE).for_each(|c| bits::set(&mut all, c));
    let widened = set_affinity(&all);
    tracing::warn!(
        "could not set this thread's CPU affinity back after moving it {dir} CPU {cpu} ({why}); \
         {}; PARALLEL_SPREAD=0 stops these moves",
        if widened {
            "it may now run on every CPU of its cpuset"
        } else {
            "it keeps the mask of the move"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_of(cpus: &[usize]) -> libc::cpu_set_t {
        let mut s = bits::empty();
        cpus.iter().for_each(|&c| bits::set(&mut s, c));
        s
    }

    fn cpus_in(s: &libc::cpu_set_t) -> Vec<usize> {
        (0..bits::SIZE).filter(|&c| bits::has(s, c)).collect()
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
    fn spread_4_decision() {
        let now = Instant::now();
        let old = now.checked_sub(PERIOD);
        let recent = now.checked_sub(PERIOD / 2);
        assert!(should_pair(true, 2, 1, None, now));
        assert!(should_pair(true, 2, 5, old, now));
        // Already there, or a CPU unknown on either side: stay.
        assert!(!should_pair(true, 2, 2, None, now));
        assert!(!should_pair(true, 0, 1, None, now));
        assert!(!should_pair(true, 2, 0, None, now));
        // SPREAD-3's period and switch hold for pairing too.
        assert!(!should_pair(true, 2, 1, recent, now));
        assert!(!should_pair(false, 2, 1, None, now));
    }

    #[test]
    fn spread_4_a_move_reaches_the_peer_cpu_and_sets_the_mask_back() {
        std::thread::spawn(|| {
            let before = crate::runtime::reactor::allowed_cpus();
            let cpu = cpu_word();
            assert!(cpu > 0, "sched_getcpu works on Linux");
            let other = before.iter().copied().find(|&c| c + 1 != cpu as usize);
            match other {
                // The kernel migrated the thread onto the asked CPU before setaffinity returned.
                Some(c) => assert_eq!(step_onto(c), Some(c as u32 + 1)),
                None => assert_eq!(before, vec![cpu as usize - 1], "one allowed CPU"),
            }
            assert_eq!(
                crate::runtime::reactor::allowed_cpus(),
                before,
                "the mask is back"
            );
            // A CPU outside the mask, or beyond any mask: no move, the mask untouched.
            let outside = (0..bits::SIZE)
                .find(|c| !before.contains(c))
                .expect("a CPU outside");
            assert_eq!(step_onto(outside), None);
            assert_eq!(step_onto(bits::SIZE), None);
            assert_eq!(crate::runtime::reactor::allowed_cpus(), before);
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn spread_4_pairs_only_onto_a_cpu_of_its_mask_when_every_core_is_busy() {
        std::thread::spawn(|| {
            let before = crate::runtime::reactor::allowed_cpus();
            let mask_kept = || assert_eq!(crate::runtime::reactor::allowed_cpus(), before);
            let tried = || LAST_TRY.with(Cell::get).is_some();
            // A CPU word this thread never runs on, so that no migration can make it "there".
            let mine = bits::SIZE as u32 + 5;
            let t0 = Instant::now();
            // The peer's word is untrusted: beyond any mask, or a CPU this thread may not run
            // on, is tried (SPREAD-3 counts it) and moves nothing.
            let outside = (0..bits::SIZE)
                .find(|c| !before.contains(c))
                .expect("a CPU outside");
            for word in [u32::MAX, bits::SIZE as u32 + 1, outside as u32 + 1] {
                LAST_TRY.with(|l| l.set(None));
                assert_eq!(pair_if(true, word, mine, t0, || true), None, "word {word}");
                assert!(tried(), "word {word} refused before the mask check");
                mask_kept();
            }
            // Unknown, switched off, or a core free: not even tried.
            let any = before[0] as u32 + 1;
            for (enabled, word, busy) in [(true, 0, true), (false, any, true), (true, any, false)] {
                LAST_TRY.with(|l| l.set(None));
                assert_eq!(pair_if(enabled, word, mine, t0, || busy), None);
                assert!(!tried(), "{enabled} {word} {busy}");
            }
            // A CPU of its mask: the thread is moved there (seen while the mask held only it),
            // counted, and its mask set back.
            LAST_TRY.with(|l| l.set(None));
            let paired = pairs();
            assert_eq!(pair_if(true, any, mine, t0, || true), Some(any));
            assert_eq!(pairs(), paired + 1);
            mask_kept();
            // SPREAD-3: the next try waits a period.
            let later = |d: Duration| t0.checked_add(d).expect("a later instant");
            assert_eq!(pair_if(true, any, mine, later(PERIOD / 2), || true), None);
            assert_eq!(pair_if(true, any, mine, later(PERIOD), || true), Some(any));
            mask_kept();
        })
        .join()
        .expect("the test thread");
    }

    #[test]
    fn spread_2_the_mask_away_leaves_out_the_cpu_and_prefers_its_node() {
        let own = set_of(&[0, 1, 2, 3]);
        assert_eq!(
            cpus_in(&away_mask(&own, 1, &[]).expect("3 left")),
            [0, 2, 3]
        );
        // The CPUs of its NUMA node where the mask allows one; else anywhere else.
        assert_eq!(cpus_in(&away_mask(&own, 1, &[0, 1]).expect("0 left")), [0]);
        assert_eq!(
            cpus_in(&away_mask(&own, 1, &[1, 9]).expect("none near")),
            [0, 2, 3]
        );
        // A one-CPU mask, or a CPU the mask does not hold: nowhere to go.
        assert!(away_mask(&set_of(&[5]), 5, &[]).is_none());
        assert!(away_mask(&own, 7, &[]).is_none());
        assert!(away_mask(&own, libc::CPU_SETSIZE as usize, &[]).is_none());
    }

    #[test]
    fn spread_2_a_move_leaves_the_cpu_and_sets_the_mask_back() {
        std::thread::spawn(|| {
            let before = crate::runtime::reactor::allowed_cpus();
            let cpu = cpu_word();
            assert!(cpu > 0, "sched_getcpu works on Linux");
            let there = step_off(cpu as usize - 1, &[]);
            assert_eq!(
                crate::runtime::reactor::allowed_cpus(),
                before,
                "the mask is back"
            );
            match before.len() {
                // One allowed CPU: nowhere to go.
                1 => assert_eq!(there, None),
                // The kernel migrated the thread before setaffinity returned.
                _ => assert!(there.is_some_and(|t| t != cpu), "{there:?} from {cpu}"),
            }
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
            assert_eq!(step_off(cpu as usize - 1, &[]), None);
            assert_eq!(after_unpaid_spin([cpu]), None);
            assert_eq!(
                crate::runtime::reactor::allowed_cpus(),
                vec![cpu as usize - 1]
            );
            assert_eq!(cpu_word(), cpu);
        })
        .join()
        .expect("the test thread");
    }
}

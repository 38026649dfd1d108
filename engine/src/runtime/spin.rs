//! The wait policy: whether a waiting thread may spin before it sleeps in the kernel, and for how
//! long. It is the one policy for every wait in the engine: [`Spin`] (a bounded spin with
//! feedback) and [`relax`] (one step of a caller's own spin loop) both ask it.
//!
//! Spinning saves the wake-up (a futex or eventfd wake, 5-20 µs) only while the spinner has a
//! core to itself. When our threads, or the application's, outnumber the cores, a spinner takes
//! the core the awaited thread needs, and the hand-off waits for the scheduler tick (4 ms at
//! HZ=250). So a waiter spins only while a core is free, and otherwise goes straight to its
//! kernel wait (eventfd doorbell, epoll or io_uring poll).
//!
//! Invariants:
//! - SPIN-1: a spin lasts at most its cap (`PARALLEL_SPIN_US`); then the waiter sleeps in the
//!   kernel until woken or until its deadline slice ends. A cap of zero never spins.
//! - SPIN-2: no spin starts while the machine's runnable threads (the `running` field of
//!   `/proc/loadavg`, counting the sampler itself) exceed its online cores. A spin pauses the
//!   CPU between checks only while this process's other spinners leave two of the cores it may
//!   run on (`sched_getaffinity` of its main thread) free: one for the spinner, one for the
//!   thread it waits for; otherwise it yields (SPIN-5). While
//!   the last sample or the one before found the cores busy, the next is read after
//!   [`BUSY_PERIOD`], not [`LOAD_PERIOD`]: one busy moment (in the demo's launches: another
//!   process's start-up, a rank's own setup threads) declined the whole of a short loop's waits
//!   (a 4 KiB loop at 30.5 us per all-reduce instead of 2.3, 67 of its 86 waits declined), and
//!   on a busy machine a sample taken in a lull (compute threads waiting for the GIL) allows
//!   spins until the next short look only, not for a whole period.
//! - SPIN-3: a [`Spin`] that ran out its budget without its condition turning true makes the
//!   thread skip its next 1, 3, 7, ..., 63 spins (a kernel wait each time); a spin that paid
//!   resets the skip. A skipped wait that went to the kernel and ended within the cap (the
//!   `Spin` is held until the kernel wait ends: a spin would have paid) halves the skip left,
//!   once per streak: when the spin that halving lets through runs out its budget too, the
//!   thread skips its full count again, with no halving, until a spin pays. A wait that cannot
//!   be won by spinning stops costing a core (at most one failed spin per 64 waits, after the
//!   first wear-down), and a burst of quick hand-offs after a long wait (a trainer's small
//!   collectives after its compute) spins again after at most 6 kernel waits, not after 63.
//! - SPIN-4: the idle fast path makes no system call: the load sample is refreshed at most once
//!   per [`LOAD_PERIOD`] per process (per [`BUSY_PERIOD`] after one found the cores busy), by one
//!   `pread` of a descriptor opened once and one `sched_getaffinity` (the process's CPUs, which a
//!   binding made after the first wait changes), and the spinner count is a scan of the atomics
//!   of the slots taken so far (at most [`SLOTS`]).
//! - SPIN-5: a waiter whose process has no CPU to spare beside it (a rank bound to one CPU, as
//!   `taskset -c N`, `mpirun --bind-to core` without SMT or `srun --cpu-bind=threads` leave it,
//!   or this process's other spinners holding the spare ones; a yielding spinner counts as one)
//!   still spins while the machine has a core free, but gives its CPU away at every step
//!   (`sched_yield`) and reads the clock at every step: the thread it waits for is elsewhere
//!   (another rank on its own CPU) or runnable on this CPU, and then runs at the next step
//!   instead of after the spin. A yield that kept the waiter off its CPU for [`YIELD_LOST`] or
//!   more (another thread on that CPU used a time slice: a data loader, OpenMP threads on the
//!   same mask) ends the spin as one that did not pay: from then on a kernel wait's wake-up,
//!   which preempts such a thread, is the faster hand-off (SPIN-3 skips the next spins).
//!   Declining instead cost every hand-off a kernel wake-up: 2 ranks on 2 cores, each bound to
//!   one, 4 KiB all-reduces at 19-32 us against 3 us unbound. A machine of one core, or busy
//!   cores, still decline (SPIN-2).

use std::cell::Cell;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How old a load sample may be before the next spin decision refreshes it (SPIN-4).
pub const LOAD_PERIOD: Duration = Duration::from_millis(2);
/// How old a sample may be, while the last two include one that found the cores busy, before
/// the next decision reads a fresh one (SPIN-2): a busy moment (another process starting, this
/// one's own setup threads) then sends at most this long of waits to the kernel, not a whole
/// [`LOAD_PERIOD`].
pub const BUSY_PERIOD: Duration = Duration::from_micros(200);
/// A yield that kept a yielding spinner off its CPU this long ends its spin (SPIN-5): another
/// thread on that CPU ran a time slice, and a kernel wait's wake-up preempts it where the
/// spinner's next turn would wait for it.
pub const YIELD_LOST: Duration = Duration::from_micros(50);
/// Threads of this process that can be counted as spinners at once; a thread beyond them
/// never spins (the conservative answer).
pub const SLOTS: usize = 64;
/// The longest skip after spins that did not pay (SPIN-3): 2^6 - 1 kernel waits.
const MAX_MISSES: u32 = 6;

/// What the machine offers, read once.
struct Machine {
    online: usize,
    loadavg: Option<File>,
    epoch: Instant,
}

fn machine() -> &'static Machine {
    static M: OnceLock<Machine> = OnceLock::new();
    M.get_or_init(|| {
        let online = machine_online();
        OURS.store(process_cpu_count(), Ordering::Relaxed);
        Machine {
            online,
            loadavg: File::open("/proc/loadavg").ok(),
            epoch: Instant::now(),
        }
    })
}

/// Nanoseconds since the policy's epoch of an instant already read (offset so that 0 means
/// "never").
fn ns_at(m: &Machine, t: Instant) -> u64 {
    t.saturating_duration_since(m.epoch).as_nanos() as u64 + LOAD_PERIOD.as_nanos() as u64 + 1
}

static SAMPLED_AT: AtomicU64 = AtomicU64::new(0);
/// The CPUs this process may run on, read with each load sample: a mask set after the first
/// decision (OpenMP's binding at its first parallel region, a launcher's, the application's)
/// is seen within a sample period.
static OURS: AtomicUsize = AtomicUsize::new(1);
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// The sample before [`RUNNING`] (0: none).
static BEFORE: AtomicUsize = AtomicUsize::new(0);

/// How many CPUs the process may run on: the mask of its main thread (the process's, not the
/// asking thread's: a pinned reactor's is one CPU); the online count where it cannot be read.
fn process_cpu_count() -> usize {
    super::reactor::process_cpu_count()
        .unwrap_or_else(machine_online)
        .max(1)
}

/// The online CPUs (`sysconf`).
fn machine_online() -> usize {
    // SAFETY: sysconf has no memory effects.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize
}

/// Parses the `running/total` field of `/proc/loadavg`.
fn parse_running(text: &[u8]) -> Option<usize> {
    let s = std::str::from_utf8(text).ok()?;
    let field = s.split_ascii_whitespace().nth(3)?;
    field.split('/').next()?.parse().ok()
}

/// How old the last sample may be before the next decision reads a fresh one (SPIN-2, SPIN-4):
/// [`BUSY_PERIOD`] while the last or the one before found more runnable threads than cores
/// (`last`, `before`; 0: none), so that a busy moment ends soon, and so that on a busy machine
/// one sample taken in a lull lets spins start for that short while only.
fn sample_period(last: usize, before: usize, online: usize) -> Duration {
    if last > online || before > online {
        BUSY_PERIOD
    } else {
        LOAD_PERIOD
    }
}

/// The machine's runnable threads, sampled at most every [`LOAD_PERIOD`] (every
/// [`BUSY_PERIOD`] after a sample that found more than the cores); `None` where
/// `/proc/loadavg` cannot be read (then only the spinner count limits spinning). Refreshes
/// the process's CPU count ([`OURS`]) with each sample.
fn running(m: &Machine, now: u64) -> Option<usize> {
    let at = SAMPLED_AT.load(Ordering::Relaxed);
    let period = sample_period(
        RUNNING.load(Ordering::Relaxed),
        BEFORE.load(Ordering::Relaxed),
        m.online,
    );
    let stale = now.saturating_sub(at) >= period.as_nanos() as u64;
    if stale
        && SAMPLED_AT
            .compare_exchange(at, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let mut buf = [0u8; 128];
        if let Some(r) = m
            .loadavg
            .as_ref()
            .and_then(|f| f.read_at(&mut buf, 0).ok())
            .and_then(|n| parse_running(&buf[..n]))
        {
            BEFORE.store(RUNNING.swap(r, Ordering::Relaxed), Ordering::Relaxed);
        }
        OURS.store(process_cpu_count(), Ordering::Relaxed);
    }
    match RUNNING.load(Ordering::Relaxed) {
        0 => None, // never sampled successfully
        r => Some(r),
    }
}

/// Whether the machine's runnable threads, by the current load sample (refreshed as SPIN-4
/// allows), leave a core free: SPIN-2's load condition alone (SPREAD-2 asks it).
pub(crate) fn cores_free() -> bool {
    let m = machine();
    running(m, ns_at(m, Instant::now())).is_none_or(|r| r <= m.online)
}

/// After the thread moved off its peer's CPU (SPREAD-2): what made its spins fail is gone, so
/// its SPIN-3 skip is cleared.
pub(crate) fn note_moved() {
    let _ = ME.try_with(ThreadState::clear_streak);
}

/// Forces a fresh load sample on the next decision (tests, and callers that just changed the
/// load themselves).
pub fn refresh_load() {
    SAMPLED_AT.store(0, Ordering::Relaxed);
}

#[repr(align(64))]
struct Slot {
    owner: AtomicBool,
    /// Until when (in [`now_ns`] units) the owning thread counts as spinning; 0 when not.
    until: AtomicU64,
}

static SPINNING: [Slot; SLOTS] = [const {
    Slot {
        owner: AtomicBool::new(false),
        until: AtomicU64::new(0),
    }
}; SLOTS];

/// This thread's slot (released when the thread ends) and its miss streak (SPIN-3).
struct ThreadState {
    slot: Option<usize>,
    misses: Cell<u32>,
    skip: Cell<u32>,
    /// Halving brought the skip to zero since the last spin that paid (SPIN-3).
    worn: Cell<bool>,
    /// A spin let through by halving ran out too: no halving until a spin pays (SPIN-3).
    no_halving: Cell<bool>,
}

impl ThreadState {
    /// Ends the thread's miss streak (SPIN-3): a spin paid, or SPREAD-2 moved the thread.
    fn clear_streak(&self) {
        self.misses.set(0);
        self.skip.set(0);
        self.worn.set(false);
        self.no_halving.set(false);
    }
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            SPINNING[i].until.store(0, Ordering::Relaxed);
            SPINNING[i].owner.store(false, Ordering::Release);
        }
    }
}

/// One past the highest slot ever taken: the spinner count scans only the slots below it
/// (a process has a handful of waiting threads, not [`SLOTS`]).
static SLOTS_USED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ME: ThreadState = ThreadState {
        slot: SPINNING.iter().position(|s| {
            s.owner
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        }).inspect(|i| {
            SLOTS_USED.fetch_max(i + 1, Ordering::Relaxed);
        }),
        misses: Cell::new(0),
        skip: Cell::new(0),
        worn: Cell::new(false),
        no_halving: Cell::new(false),
    };
}

/// Other threads of this process spinning now.
fn other_spinners(mine: usize, now: u64) -> usize {
    let used = SLOTS_USED.load(Ordering::Relaxed).min(SLOTS);
    SPINNING[..used]
        .iter()
        .enumerate()
        .filter(|(i, s)| *i != mine && s.until.load(Ordering::Relaxed) > now)
        .count()
}

/// What the policy lets a waiter do (SPIN-1, SPIN-2, SPIN-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Spin, pausing the CPU between checks.
    Spin,
    /// Spin, giving the CPU to any runnable thread on it between checks (SPIN-5).
    Yield,
    /// Go to the kernel wait at once.
    Decline,
}

/// The policy itself (SPIN-1, SPIN-2, SPIN-5), a pure function of what was observed.
pub(crate) fn decide(
    cap: Duration,
    running: Option<usize>,
    online: usize,
    other_spinners: usize,
    ours: usize,
) -> Decision {
    if cap.is_zero() || running.is_some_and(|r| r > online) {
        Decision::Decline
    } else if other_spinners + 2 <= ours {
        Decision::Spin
    } else if online >= 2 {
        // The machine has a core free, but this process's CPUs do not leave one beside the
        // spinner: the thread it waits for may be elsewhere (a rank bound to its own CPU), or
        // on this CPU, which a yield hands over at once.
        Decision::Yield
    } else {
        Decision::Decline
    }
}

/// Decides for the calling thread and, when it may spin, counts it as a spinner until
/// `now + cap`. Returns the slot it holds and whether it spins yielding (SPIN-5).
fn claim(cap: Duration, at: Instant) -> Option<(usize, bool)> {
    if cap.is_zero() {
        return None;
    }
    let m = machine();
    let now = ns_at(m, at);
    let slot = ME.try_with(|me| me.slot).ok().flatten()?;
    let others = other_spinners(slot, now);
    let running = running(m, now);
    let yielding = match decide(cap, running, m.online, others, OURS.load(Ordering::Relaxed)) {
        Decision::Spin => false,
        Decision::Yield => true,
        Decision::Decline => return None,
    };
    let until = now.saturating_add(cap.as_nanos().min(u64::MAX as u128) as u64);
    SPINNING[slot].until.store(until, Ordering::Relaxed);
    Some((slot, yielding))
}

fn release(slot: usize) {
    SPINNING[slot].until.store(0, Ordering::Relaxed);
}

static STARTED: AtomicU64 = AtomicU64::new(0);
static PAID: AtomicU64 = AtomicU64::new(0);
static DECLINED: AtomicU64 = AtomicU64::new(0);
static SHORT: AtomicU64 = AtomicU64::new(0);
static BUSY: AtomicU64 = AtomicU64::new(0);
static YIELDING: AtomicU64 = AtomicU64::new(0);

/// How this process's [`Spin`]s went: started, paid (the condition came while spinning),
/// declined (the policy sent the waiter straight to the kernel), of which declined_busy for the
/// cores (SPIN-2: more runnable threads than cores, a machine of one core, or no spinner slot
/// left) and the rest skipped after spins that did not pay
/// (SPIN-3), and declined_short (skipped waits that went to the kernel and ended within the
/// cap: a spin would have paid; SPIN-3 halves the skip on them); yielding: the started spins
/// that gave the CPU away between checks (SPIN-5).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpinStats {
    pub started: u64,
    pub paid: u64,
    pub declined: u64,
    pub declined_busy: u64,
    pub declined_short: u64,
    pub yielding: u64,
}

pub fn spin_stats() -> SpinStats {
    SpinStats {
        started: STARTED.load(Ordering::Relaxed),
        paid: PAID.load(Ordering::Relaxed),
        declined: DECLINED.load(Ordering::Relaxed),
        declined_busy: BUSY.load(Ordering::Relaxed),
        declined_short: SHORT.load(Ordering::Relaxed),
        yielding: YIELDING.load(Ordering::Relaxed),
    }
}

/// A bounded spin under the policy. Use it as
/// `let mut spin = Spin::start(cap); while !ready() { if !spin.step() { kernel_wait() } }`:
/// `step` relaxes the CPU and says whether to keep spinning; dropping the `Spin` while it is
/// still spinning records that it paid, and dropping a skipped one that went to the kernel
/// (`step` returned false) within the cap of its start records that a spin would have paid
/// (SPIN-3: the skip left halves). So keep it until the kernel wait has ended: what is measured
/// is from the start to the drop.
#[derive(Debug)]
pub struct Spin {
    slot: Option<usize>,
    until: Instant,
    steps: u32,
    /// Gives the CPU away at every step (SPIN-5).
    yielding: bool,
    /// The spin ran out its budget without its condition turning true.
    ran_out: bool,
    /// Declined (not run out): when, why, and whether the waiter went to the kernel.
    declined: Option<Declined>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Declined {
    at: Instant,
    cap: Duration,
    /// SPIN-3's skip (else SPIN-2: busy cores).
    skipped: bool,
    /// `step` was asked after the decline: the waiter went to its kernel wait.
    waited: bool,
}

impl Spin {
    /// Starts a spin of at most `cap`, or a spin that is already over when the policy says the
    /// waiter must sleep in the kernel instead.
    pub fn start(cap: Duration) -> Spin {
        let skipped = ME
            .try_with(|me| {
                let s = me.skip.get();
                me.skip.set(s.saturating_sub(1));
                s > 0
            })
            .unwrap_or(true);
        // One clock read serves the decision and the spin's end.
        let now = Instant::now();
        let claimed = if skipped { None } else { claim(cap, now) };
        Spin::claimed(cap, now, claimed, skipped)
    }

    /// The spin the policy's answer (`claimed`: the slot held and whether it yields; `skipped`:
    /// SPIN-3's skip) makes, counted in [`spin_stats`].
    fn claimed(cap: Duration, now: Instant, claimed: Option<(usize, bool)>, skipped: bool) -> Spin {
        let (slot, yielding) = (claimed.map(|c| c.0), claimed.is_some_and(|c| c.1));
        if slot.is_some() {
            STARTED.fetch_add(1, Ordering::Relaxed);
            if yielding {
                YIELDING.fetch_add(1, Ordering::Relaxed);
            }
        } else if !cap.is_zero() {
            DECLINED.fetch_add(1, Ordering::Relaxed);
            if !skipped {
                BUSY.fetch_add(1, Ordering::Relaxed);
            }
        }
        Spin {
            slot,
            until: now + if slot.is_some() { cap } else { Duration::ZERO },
            steps: 0,
            yielding,
            ran_out: false,
            declined: (slot.is_none() && !cap.is_zero()).then_some(Declined {
                at: now,
                cap,
                skipped,
                waited: false,
            }),
        }
    }

    /// Whether this spin is still running.
    pub fn spinning(&self) -> bool {
        self.slot.is_some()
    }

    /// Whether this spin gives the CPU away at every step (SPIN-5).
    pub fn yielding(&self) -> bool {
        self.yielding
    }

    /// Whether this spin was declined by SPIN-2 (busy cores, a machine of one core, or no
    /// spinner slot left), not skipped after spins that did not pay: what SPREAD-4 acts on,
    /// where its own load sample finds every core busy.
    pub fn declined_busy(&self) -> bool {
        self.declined.is_some_and(|d| !d.skipped)
    }

    /// Whether this wait goes to the kernel because spinning has not been paying: this spin ran
    /// out its budget, or it was skipped after spins that did (SPIN-3), not declined for busy
    /// cores. What SPREAD-2 acts on.
    pub fn unpaid(&self) -> bool {
        self.ran_out || self.declined.is_some_and(|d| d.skipped)
    }

    /// One step: relaxes the CPU and returns true while the spin may go on; false once the
    /// budget is spent (recorded as a spin that did not pay) or the spin was declined.
    pub fn step(&mut self) -> bool {
        let Some(slot) = self.slot else {
            if let Some(d) = &mut self.declined {
                d.waited = true;
            }
            return false;
        };
        self.steps = self.steps.wrapping_add(1);
        if self.yielding {
            // SPIN-5: any thread runnable on this CPU (ours, the application's) runs now; the
            // clock is read at every step (a yield costs more than the read).
            let before = Instant::now();
            if before >= self.until {
                return self.run_out(slot);
            }
            std::thread::yield_now();
            if before.elapsed() >= YIELD_LOST {
                return self.run_out(slot);
            }
            return true;
        }
        if self.steps % 64 == 0 && Instant::now() >= self.until {
            return self.run_out(slot);
        }
        std::hint::spin_loop();
        true
    }

    /// Ends the spin as one that did not pay (SPIN-3); returns false (go to the kernel).
    fn run_out(&mut self, slot: usize) -> bool {
        release(slot);
        self.slot = None;
        self.ran_out = true;
        let _ = ME.try_with(|me| {
            let m = (me.misses.get() + 1).min(MAX_MISSES);
            me.misses.set(m);
            me.skip.set((1 << m) - 1);
            // The spin that halving let through failed too: contention, not a burst.
            if me.worn.get() {
                me.no_halving.set(true);
            }
        });
        false
    }
}

impl Drop for Spin {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            release(slot);
            PAID.fetch_add(1, Ordering::Relaxed);
            let _ = ME.try_with(ThreadState::clear_streak);
        } else if let Some(d) = self.declined
            && d.skipped
            && d.waited
        {
            // One clock read, on a path that has just been through the kernel.
            if d.at.elapsed() < d.cap {
                SHORT.fetch_add(1, Ordering::Relaxed);
                let _ = ME.try_with(|me| {
                    if !me.no_halving.get() {
                        let left = me.skip.get() / 2;
                        me.skip.set(left);
                        if left == 0 {
                            me.worn.set(true);
                        }
                    }
                });
            }
        }
    }
}

/// How [`spin_until`] ended.
#[must_use = "hold the Spin until the kernel wait has ended (SPIN-3 learns from its length)"]
#[derive(Debug)]
pub enum Spun {
    /// The condition came (before or while spinning).
    Ready,
    /// Go to the kernel wait, holding this until it ends.
    Sleep(Spin),
}

/// Spins under the policy (at most `cap`) until `ready()` returns true. On [`Spun::Sleep`] the
/// caller goes to its kernel wait and drops the `Spin` it got when that wait ends. This is the
/// one-line form of [`Spin`] for a loop of the shape
/// `while now < spin_until { if ready() { return } relax() }`.
pub fn spin_until(cap: Duration, mut ready: impl FnMut() -> bool) -> Spun {
    // Already ready: no spin decision to pay for (nor to count).
    if ready() {
        return Spun::Ready;
    }
    let mut spin = Spin::start(cap);
    loop {
        if ready() {
            return Spun::Ready;
        }
        if !spin.step() {
            return Spun::Sleep(spin);
        }
    }
}

/// One step of a caller's own busy-wait loop (bounded by the caller, by `PARALLEL_SPIN_US` at
/// most). The first step (`*step == 0`) asks the policy: when it allows a spin the thread
/// counts as a spinner for `cap` and the steps pause the CPU (yielding every 32nd); when it
/// does not, or allows a yielding spin only (SPIN-5), every step yields the core to the
/// threads that need it. Prefer [`Spin`], which
/// ends the spin at once when the policy declines and learns from spins that did not pay.
#[inline]
pub fn relax(step: &mut u32) {
    const DECLINED_BIT: u32 = 1 << 31;
    if *step == 0 {
        let cap = crate::config::config().spin;
        *step = match claim(cap, Instant::now()) {
            Some((_, false)) => 1,
            // A yielding spin (SPIN-5) would yield at every step, as a declined one does here:
            // it does not hold a spinner slot for it.
            Some((slot, true)) => {
                release(slot);
                DECLINED_BIT | 1
            }
            None => DECLINED_BIT | 1,
        };
    }
    *step = (*step & DECLINED_BIT) | (step.wrapping_add(1) & !DECLINED_BIT);
    if *step & DECLINED_BIT != 0 || *step % 32 == 0 {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    /// Busy threads that keep every online core and one more runnable until dropped.
    pub(crate) struct Saturate {
        stop: Arc<AtomicBool>,
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Saturate {
        pub(crate) fn new() -> Saturate {
            let stop = Arc::new(AtomicBool::new(false));
            let threads = (0..machine().online + 1)
                .map(|_| {
                    let stop = stop.clone();
                    std::thread::spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                    })
                })
                .collect();
            // Let the busy threads get scheduled before anyone samples the load.
            std::thread::sleep(Duration::from_millis(50));
            refresh_load();
            Saturate { stop, threads }
        }
    }

    impl Drop for Saturate {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads.drain(..) {
                let _ = t.join();
            }
        }
    }

    /// One case of the policy: (cap, running, online, other spinners, ours, answer, why).
    type Case<'a> = (
        Duration,
        Option<usize>,
        usize,
        usize,
        usize,
        Decision,
        &'a str,
    );

    /// Asserts `decide` for each case.
    fn decisions(rows: &[Case<'_>]) {
        for &(cap, running, online, others, ours, want, why) in rows {
            assert_eq!(decide(cap, running, online, others, ours), want, "{why}");
        }
    }

    #[test]
    fn spin_2_policy_spins_only_while_a_core_is_free() {
        use Decision::*;
        let (cap, zero) = (Duration::from_micros(50), Duration::ZERO);
        decisions(&[
            (cap, Some(2), 2, 0, 2, Spin, "two runnable on two cores"),
            (cap, None, 2, 0, 2, Spin, "load unknown, no other spinner"),
            (cap, Some(3), 2, 0, 2, Decline, "more runnable than cores"),
            (cap, Some(1), 8, 2, 8, Spin, "cores to spare"),
            (
                cap,
                Some(1),
                1,
                0,
                1,
                Decline,
                "one core: the awaited thread needs it",
            ),
            (zero, Some(1), 8, 0, 8, Decline, "PARALLEL_SPIN_US=0"),
            (zero, Some(1), 8, 0, 1, Decline, "PARALLEL_SPIN_US=0, bound"),
        ]);
    }

    #[test]
    fn spin_5_a_waiter_without_a_spare_cpu_of_its_own_spins_yielding() {
        use Decision::*;
        let cap = Duration::from_micros(50);
        decisions(&[
            // A rank bound to one CPU (taskset, srun --cpu-bind=threads) on a machine with a
            // core free: its peer runs elsewhere.
            (cap, Some(2), 2, 0, 1, Yield, "bound to one CPU"),
            (cap, None, 4, 0, 1, Yield, "bound, load unknown"),
            (
                cap,
                Some(1),
                2,
                1,
                2,
                Yield,
                "another spinner holds the spare core",
            ),
            // Busy cores still decline: a yield would hand the CPU to the busy threads for a
            // whole slice, where a kernel wait is woken at once.
            (cap, Some(3), 2, 0, 1, Decline, "bound, busy"),
            (cap, Some(3), 2, 1, 2, Decline, "another spinner, busy"),
        ]);
    }

    #[test]
    fn spin_5_a_yielding_spin_is_counted_and_yields_until_its_cap() {
        std::thread::spawn(|| {
            let before = spin_stats().yielding;
            let slot = ME.with(|me| me.slot).expect("a slot");
            let cap = Duration::from_millis(2);
            let mut s = Spin::claimed(cap, Instant::now(), Some((slot, true)), false);
            assert!(s.spinning() && s.yielding());
            assert!(
                spin_stats().yielding > before,
                "the yielding spin was not counted"
            );
            let t0 = Instant::now();
            let mut steps = 0u64;
            while s.step() {
                steps += 1;
            }
            // Alone on its CPU or not, it ends by its cap (read at every step) or by a lost
            // yield, never later than the cap plus one lost slice.
            assert!(s.unpaid(), "a spin that ended without its condition paid");
            assert!(
                t0.elapsed() < cap + Duration::from_millis(100),
                "{:?}",
                t0.elapsed()
            );
            assert!(steps > 0 || t0.elapsed() >= YIELD_LOST);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn spin_5_a_yield_that_lost_the_cpu_to_a_busy_thread_ends_the_spin() {
        let cpu = super::super::reactor::allowed_cpus()[0];
        let stop = Arc::new(AtomicBool::new(false));
        // A busy thread and the waiter on one CPU (a data loader on the rank's only CPU).
        let busy = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                assert!(core_affinity::set_for_current(core_affinity::CoreId {
                    id: cpu
                }));
                while !stop.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
            })
        };
        let waited = std::thread::spawn(move || {
            assert!(core_affinity::set_for_current(core_affinity::CoreId {
                id: cpu
            }));
            std::thread::sleep(Duration::from_millis(20)); // the busy thread runs by now
            let slot = ME.with(|me| me.slot).expect("a slot");
            let cap = Duration::from_secs(5);
            let mut s = Spin::claimed(cap, Instant::now(), Some((slot, true)), false);
            let t0 = Instant::now();
            while s.step() {}
            (t0.elapsed(), s.unpaid())
        })
        .join()
        .unwrap();
        stop.store(true, Ordering::Relaxed);
        busy.join().unwrap();
        let (took, unpaid) = waited;
        // Ended by the lost yield long before its cap, as a spin that did not pay.
        assert!(took < Duration::from_secs(1), "yielded for {took:?}");
        assert!(unpaid);
    }

    #[test]
    fn spin_2_saturated_cores_decline_spinning() {
        let busy = Saturate::new();
        let s = Spin::start(Duration::from_secs(1));
        assert_eq!(
            s.declined.map(|d| d.skipped),
            Some(false),
            "a spin declined for busy cores is not marked as such"
        );
        assert!(
            !s.unpaid(),
            "busy cores: another CPU is no better (SPREAD-2 ignores it)"
        );
        assert!(s.declined_busy(), "SPREAD-4 acts on this decline");
        assert!(
            !s.spinning(),
            "spin allowed with {} runnable threads on {} cores",
            RUNNING.load(Ordering::Relaxed),
            machine().online
        );
        drop(s);
        let mut step = 0u32;
        relax(&mut step);
        assert!(step & (1 << 31) != 0, "relax spun on saturated cores");
        drop(busy);
    }

    #[test]
    fn spin_3_spins_that_did_not_pay_are_skipped_then_paid_ones_reset() {
        std::thread::spawn(|| {
            ME.with(|me| {
                me.misses.set(2);
                me.skip.set(3);
            });
            for left in (0..3).rev() {
                // Dropped without asking `step` (the condition came at once): no kernel wait,
                // nothing learnt.
                let s = Spin::start(Duration::from_secs(1));
                assert!(!s.spinning(), "spun while skipping");
                assert!(!s.declined_busy(), "a skip is not a decline for busy cores");
                assert_eq!(ME.with(|me| me.skip.get()), left);
            }
            // A spin that runs out its budget doubles the skip.
            failed_spin();
            assert_eq!(ME.with(|me| (me.misses.get(), me.skip.get())), (3, 7));
            // One that ends while spinning (its condition came) resets it.
            paid_spin();
            assert_eq!(ME.with(|me| (me.misses.get(), me.skip.get())), (0, 0));
        })
        .join()
        .unwrap();
    }

    /// A skipped wait that goes to the kernel: start, ask `step` (false), wait `wait`, drop.
    fn skipped_wait(cap: Duration, wait: Duration) {
        let mut s = Spin::start(cap);
        assert!(!s.spinning(), "spun while skipping");
        assert!(!s.step());
        assert!(
            s.unpaid(),
            "skipped after spins that ran out (SPREAD-2 acts on it)"
        );
        std::thread::sleep(wait);
        drop(s);
    }

    /// A spin of this thread's slot with `budget` left.
    fn spin_with(budget: Duration) -> Spin {
        Spin {
            slot: ME.with(|me| me.slot),
            until: Instant::now() + budget,
            steps: 0,
            yielding: false,
            ran_out: false,
            declined: None,
        }
    }

    /// A spin that runs out its budget.
    fn failed_spin() {
        let mut s = spin_with(Duration::ZERO);
        while s.step() {}
        assert!(s.unpaid(), "a spin that spent its budget did not pay");
    }

    /// A spin that ends while spinning: its condition came.
    fn paid_spin() {
        drop(spin_with(Duration::from_secs(1)));
    }

    #[test]
    fn spin_3_short_kernel_waits_wear_the_skip_down_once_per_streak() {
        std::thread::spawn(|| {
            let long = Duration::from_millis(20);
            let short = Duration::from_millis(500);
            let state = || ME.with(|me| (me.misses.get(), me.skip.get()));
            // Long waits (a trainer's compute between collectives): skipped waits whose kernel
            // sleep outlasts the cap keep the streak.
            ME.with(|me| {
                me.misses.set(6);
                me.skip.set(63);
            });
            let counted = spin_stats().declined_short;
            for _ in 0..2 {
                skipped_wait(long, long + Duration::from_millis(5));
            }
            assert_eq!(state(), (6, 61));
            // Quick hand-offs: each kernel wait ended well within the cap (a spin would have
            // paid), so each halves the skip left; five bring it to zero.
            let mut seen = vec![];
            for _ in 0..5 {
                skipped_wait(short, Duration::ZERO);
                seen.push(state().1);
            }
            assert_eq!(seen, [30, 14, 6, 2, 0]);
            assert!(spin_stats().declined_short >= counted + 5);
            // A skipped wait that never went to the kernel teaches nothing.
            ME.with(|me| me.skip.set(10));
            drop(Spin::start(short));
            assert_eq!(state().1, 9);
            // Nor does a short wait declined for busy cores (SPIN-2), not skipped.
            drop(Spin {
                slot: None,
                until: Instant::now(),
                steps: 0,
                yielding: false,
                ran_out: false,
                declined: Some(Declined {
                    at: Instant::now(),
                    cap: short,
                    skipped: false,
                    waited: true,
                }),
            });
            assert_eq!(state().1, 9);
            // The skip was worn down to zero, and the spin it let through failed too: the
            // waits are contended, not a burst. The full skip again, with no halving.
            ME.with(|me| me.skip.set(0));
            failed_spin();
            assert_eq!(state(), (6, 63));
            for _ in 0..3 {
                skipped_wait(short, Duration::ZERO);
            }
            assert_eq!(state(), (6, 60), "halved after a worn-down spin failed");
            // A spin that pays ends the streak and allows halving again.
            paid_spin();
            assert_eq!(state(), (0, 0));
            failed_spin();
            assert_eq!(state(), (1, 1), "a spin that ran out its budget is a miss");
            skipped_wait(short, Duration::ZERO);
            assert_eq!(state(), (1, 0));
            // The same through spin_until, held across the kernel wait.
            ME.with(|me| me.skip.set(63));
            let Spun::Sleep(s) = spin_until(short, || false) else {
                panic!("never ready, yet Ready");
            };
            assert!(!s.spinning());
            drop(s);
            assert_eq!(state().1, 31);
            let Spun::Sleep(s) = spin_until(long, || false) else {
                panic!("never ready, yet Ready");
            };
            std::thread::sleep(long + Duration::from_millis(5));
            drop(s);
            assert_eq!(state().1, 30);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn spin_1_spin_until_reports_readiness_and_gives_up() {
        assert!(
            matches!(spin_until(Duration::ZERO, || true), Spun::Ready),
            "ready at once"
        );
        assert!(
            matches!(spin_until(Duration::ZERO, || false), Spun::Sleep(_)),
            "cap 0 never spins"
        );
        let t = Instant::now();
        assert!(matches!(
            spin_until(Duration::from_millis(1), || false),
            Spun::Sleep(_)
        ));
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the spin is bounded by its cap"
        );
    }

    #[test]
    fn spin_2_4_a_busy_sample_is_read_again_sooner() {
        assert_eq!(sample_period(0, 0, 2), LOAD_PERIOD, "never sampled");
        assert_eq!(sample_period(2, 1, 2), LOAD_PERIOD, "a core each, twice");
        assert_eq!(
            sample_period(3, 2, 2),
            BUSY_PERIOD,
            "busy: a fresh look soon"
        );
        // A lull on a busy machine allows spins until the next short look only.
        assert_eq!(
            sample_period(2, 3, 2),
            BUSY_PERIOD,
            "the sample before was busy"
        );
        assert!(BUSY_PERIOD < LOAD_PERIOD);
    }

    #[test]
    fn spin_4_load_is_parsed_from_proc_loadavg() {
        assert_eq!(parse_running(b"0.50 0.40 0.30 3/250 12345\n"), Some(3));
        assert_eq!(parse_running(b"garbage"), None);
        refresh_load();
        let m = machine();
        if m.loadavg.is_some() {
            assert!(
                running(m, ns_at(m, Instant::now())).is_some_and(|r| r >= 1),
                "the sampler runs"
            );
        }
    }
}

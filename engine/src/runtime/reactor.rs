//! Completions, the pinned reactor threads, and lanes: the executor every asynchronous
//! operation runs on (connections' `send_async`/`recv_async`, accept loops, a Tree's
//! asynchronous collectives and its overlapped sends).
//!
//! Two kinds of executor thread, both started on demand and owned by the process's [`Runtime`]:
//! - reactors (`parallel-reactor-N`), one per core we may use (at most 4 unless
//!   `PARALLEL_THREADS` says otherwise), pinned, each with its own ring: short I/O tasks; the same
//!   key always lands on the same reactor, so a connection's tasks stay in order;
//! - lane workers (`parallel-lane-N`), unpinned: they run [`Lane`] jobs, which block for a whole
//!   collective. Those never run on a reactor: a collective that waited there for a send queued on
//!   the same reactor would wait for its own deadline.
//!
//! Invariants:
//! - EXEC-1: an executor thread never panics outward: a panicking task is contained, logged, and
//!   (for a lane job) completes its handle with an error.
//! - EXEC-2: a lane runs its jobs one at a time, in submission order (every rank must issue its
//!   collectives in the same order).
//! - EXEC-3: idle executor threads sleep in the kernel (channel receive, condition variable),
//!   never spin; the lane workers grow only while every worker is busy, and a worker idle for
//!   [`WORKER_IDLE_EXIT`] leaves.
//! - EXEC-4: a completion's callbacks run once, after its result is visible to waiters, on the
//!   completing thread (or on the registering one if it had already completed); a panicking
//!   callback is contained.

use super::Deadline;
use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

/// How long a lane worker waits for work before it leaves (EXEC-3).
pub const WORKER_IDLE_EXIT: Duration = Duration::from_secs(10);

/// A one-shot result slot that a waiter can block on with a deadline, and that runs callbacks
/// registered with [`Completion::on_done`] once it completes (EXEC-4).
pub struct Completion<T> {
    inner: Arc<(Mutex<Slot<T>>, Condvar)>,
}

struct Slot<T> {
    result: Option<Result<T>>,
    /// Set once `complete` ran: `result` may since have been taken by a wait.
    done: bool,
    callbacks: Vec<Task>,
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
        let slot = Slot {
            result: None,
            done: false,
            callbacks: Vec::new(),
        };
        Completion {
            inner: Arc::new((Mutex::new(slot), Condvar::new())),
        }
    }
}

impl<T> Completion<T> {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot<T>> {
        self.inner.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the result (the first one set stands), wakes the waiters, then runs the callbacks
    /// on this thread, outside the lock.
    pub fn complete(&self, r: Result<T>) {
        let callbacks = {
            let mut g = self.slot();
            if g.done {
                return;
            }
            g.result = Some(r);
            g.done = true;
            std::mem::take(&mut g.callbacks)
        };
        self.inner.1.notify_all();
        for f in callbacks {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
                tracing::error!("a completion callback panicked; the others still run");
            }
        }
    }

    pub fn done(&self) -> bool {
        self.slot().done
    }

    /// Runs `f` once the operation completes, on the thread that completes it (EXEC-4: keep it
    /// short, or hand the work to a [`Lane`]); at once on the caller if it already has. It does
    /// not take the result: a wait still gets it.
    pub fn on_done(&self, f: impl FnOnce() + Send + 'static) {
        {
            let mut g = self.slot();
            if !g.done {
                g.callbacks.push(Box::new(f));
                return;
            }
        }
        f();
    }

    /// Waits for the result and takes it; a second call reports that it was already taken.
    pub fn wait(&self, deadline: Deadline, op: &'static str) -> Result<T> {
        let mut g = self.slot();
        loop {
            if g.done {
                return g.result.take().unwrap_or_else(|| {
                    Err(Error::new(
                        ErrorKind::Closed,
                        op,
                        "the result of this handle was already taken by an earlier wait()",
                    ))
                });
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
    pool: Pool,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Runtime({} reactors)", self.queues.len())
    }
}

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

pub(crate) fn allowed_cpus() -> Vec<usize> {
    cpus_of(0)
}

/// How many CPUs the process's main thread may run on (the process's mask, whichever thread
/// asks: a pinned reactor's own mask is one CPU); `None` if it cannot be read (a mask larger
/// than a `cpu_set_t`). No allocation: the wait policy asks at every load sample.
pub(crate) fn process_cpu_count() -> Option<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it for the main thread (pid).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        (libc::sched_getaffinity(libc::getpid(), size, &mut set) == 0)
            .then(|| libc::CPU_COUNT(&set) as usize)
    }
}

/// The affinity mask of thread `tid` (0: the calling thread); `[0]` if it cannot be read.
fn cpus_of(tid: libc::pid_t) -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size.
    if unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) }
        != 0
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
                    let share = crate::topology::reactor_share();
                    let (cpu, pin) = (share.cpus[i % share.cpus.len()], share.pin);
                    let spawned = std::thread::Builder::new()
                        .name(format!("parallel-reactor-{i}"))
                        .spawn(move || {
                            block_signals();
                            if pin {
                                crate::topology::pin_current_thread(cpu);
                            }
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
                pool: Pool::default(),
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
        if let Err(mpsc::SendError(task)) = sent {
            tracing::error!(
                "reactor {} is gone; running the task on a lane worker",
                key % self.queues.len()
            );
            self.pool.run(task);
        }
    }

    /// Runs `f` on the next reactor, round-robin.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        self.spawn_on(k, f);
    }
}

/// The lane workers: unpinned threads that run blocking jobs, started while every worker is
/// busy, leaving after [`WORKER_IDLE_EXIT`] without work (EXEC-3).
#[derive(Default)]
struct Pool {
    state: Arc<(Mutex<PoolState>, Condvar)>,
}

#[derive(Default)]
struct PoolState {
    jobs: VecDeque<Task>,
    idle: usize,
    started: usize,
}

impl Pool {
    fn run(&self, task: Task) {
        let (lock, cv) = &*self.state;
        let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
        g.jobs.push_back(task);
        if g.idle >= g.jobs.len() {
            cv.notify_one();
            return;
        }
        g.started += 1;
        let n = g.started;
        drop(g);
        let state = self.state.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("parallel-lane-{n}"))
            .spawn(move || {
                block_signals();
                worker(&state)
            });
        if let Err(e) = spawned {
            let mut g = self.state.0.lock().unwrap_or_else(|e| e.into_inner());
            g.started -= 1;
            if g.started > 0 {
                // A busy worker takes the job when it finishes its own.
                tracing::error!("cannot start a lane worker ({e}); its job waits for a busy one");
                return;
            }
            // No worker at all would ever take it: run it here rather than leave it (and every
            // job queued behind it on its lane) waiting forever.
            tracing::error!("cannot start a lane worker ({e}); running its job on the caller");
            let job = g.jobs.pop_back();
            drop(g);
            if let Some(job) = job
                && std::panic::catch_unwind(std::panic::AssertUnwindSafe(job)).is_err()
            {
                tracing::error!("a lane job panicked; the caller keeps running");
            }
        }
    }
}

fn worker(state: &(Mutex<PoolState>, Condvar)) {
    let (lock, cv) = state;
    let mut g = lock.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        if let Some(task) = g.jobs.pop_front() {
            drop(g);
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(task)).is_err() {
                tracing::error!("a lane job panicked; the worker keeps running");
            }
            g = lock.lock().unwrap_or_else(|e| e.into_inner());
            continue;
        }
        g.idle += 1;
        let (next, timeout) = cv
            .wait_timeout(g, WORKER_IDLE_EXIT)
            .unwrap_or_else(|e| e.into_inner());
        g = next;
        g.idle -= 1;
        if timeout.timed_out() && g.jobs.is_empty() {
            g.started -= 1;
            return;
        }
    }
}

/// An ordered lane of blocking jobs on the executor (EXEC-2): a Tree's asynchronous collectives,
/// or its overlapped sends. Jobs run one at a time in submission order on a lane worker; no
/// thread is held while the lane is empty.
#[derive(Clone, Default)]
pub struct Lane {
    inner: Arc<Mutex<LaneState>>,
}

#[derive(Default)]
struct LaneState {
    jobs: VecDeque<Task>,
    /// Jobs submitted and not yet finished (queued or running).
    pending: usize,
    draining: bool,
}

impl std::fmt::Debug for Lane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lane(pending: {})", self.pending())
    }
}

impl Lane {
    pub fn new() -> Lane {
        Lane::default()
    }

    /// Jobs submitted and not yet finished; 0 means a blocking call may run inline on the caller
    /// without overtaking one of them.
    pub fn pending(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).pending
    }

    /// Queues `f` behind the lane's earlier jobs; the handle completes with its result, or with
    /// an error if it panicked (EXEC-1).
    pub fn submit<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Completion<T> {
        let c = Completion::default();
        let done = c.clone();
        let lane = self.inner.clone();
        let job: Task = Box::new(move || {
            let r =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|_| {
                    Err(Error::new(
                        ErrorKind::Resource,
                        "lane",
                        "the job panicked (a bug: please report it); the lane keeps running",
                    ))
                });
            // Finished before its handle completes, so a caller woken by it sees the lane idle.
            lane.lock().unwrap_or_else(|e| e.into_inner()).pending -= 1;
            done.complete(r);
        });
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.jobs.push_back(job);
        g.pending += 1;
        if !g.draining {
            g.draining = true;
            let lane = self.inner.clone();
            Runtime::get().pool.run(Box::new(move || drain(&lane)));
        }
        c
    }
}

impl Lane {
    /// Runs `f` on the calling thread when the lane is idle (nothing queued or running), and
    /// holds the lane meanwhile so jobs submitted during `f` run after it (EXEC-2). When the lane
    /// is busy, `f` is handed back unrun: the caller then submits it behind the others.
    pub fn try_inline<T, F: FnOnce() -> T>(&self, f: F) -> std::result::Result<T, F> {
        {
            let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
            if g.draining || g.pending > 0 {
                return Err(f);
            }
            g.draining = true;
            g.pending += 1;
        }
        /// Gives the lane back, even when `f` panics.
        struct Hold<'a>(&'a Arc<Mutex<LaneState>>);
        impl Drop for Hold<'_> {
            fn drop(&mut self) {
                let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
                g.pending -= 1;
                if g.jobs.is_empty() {
                    g.draining = false;
                } else {
                    let lane = self.0.clone();
                    Runtime::get().pool.run(Box::new(move || drain(&lane)));
                }
            }
        }
        let _hold = Hold(&self.inner);
        Ok(f())
    }
}

/// Runs a lane's jobs until it is empty (one drain per lane at a time: EXEC-2).
fn drain(lane: &Mutex<LaneState>) {
    loop {
        let job = {
            let mut g = lane.lock().unwrap_or_else(|e| e.into_inner());
            match g.jobs.pop_front() {
                Some(j) => j,
                None => {
                    g.draining = false;
                    return;
                }
            }
        };
        job();
    }
}

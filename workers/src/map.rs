//! `map`: n worker threads running `f(worker_index)`, joined in worker order; and [`Pool`], a
//! fixed set of threads for many small jobs.
//!
//! Invariants:
//! - MAP-1: `join` returns the n results in worker order (index 0 first), whatever order the
//!   workers finished in.
//! - MAP-2: a panicking worker never takes the process or the other workers down: its panic is
//!   caught and `join` reports it as a `Worker` error naming the worker and the panic message,
//!   after every worker finished (the lowest failing index wins; the others are counted).
//! - MAP-3: `join` has a deadline; a timed-out join keeps the results gathered so far and can be
//!   called again. After a successful join the handle is spent (`Closed`).
//! - MAP-4: a pool's job runs exactly once, on one pool thread; a dropped pool finishes the queued
//!   jobs, then its threads exit.

use super::queue::Channel;
use parallel_engine::error::{Error, ErrorKind, Result};
use parallel_engine::runtime::{Completion, Deadline};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

/// The handle of a running map.
pub struct MapHandle<T> {
    slots: Vec<Completion<T>>,
    results: Vec<Option<Result<T>>>,
    threads: Vec<JoinHandle<()>>,
    joined: bool,
}

impl<T> std::fmt::Debug for MapHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MapHandle({} workers, done: {})",
            self.slots.len(),
            self.done()
        )
    }
}

/// Starts `n` threads running `f(i)` for i in 0..n (MAP-1, MAP-2).
pub fn map<T, F>(n: usize, f: F) -> Result<MapHandle<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> T + Send + Sync + 'static,
{
    parallel_engine::config::try_config()?; // CONFIG-4
    let f = Arc::new(f);
    let slots: Vec<Completion<T>> = (0..n).map(|_| Completion::default()).collect();
    let mut threads = Vec::with_capacity(n);
    for (i, slot) in slots.iter().enumerate() {
        let (f, slot) = (f.clone(), slot.clone());
        let t = std::thread::Builder::new()
            .name(format!("parallel-map-{i}"))
            .spawn(move || {
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i)));
                slot.complete(r.map_err(|p| {
                    Error::new(
                        ErrorKind::Worker,
                        "map",
                        format!("worker {i} of {n} panicked: {}", panic_message(&*p)),
                    )
                }));
            })
            .map_err(|e| Error::os("map", &format!("starting worker thread {i}"), e))?;
        threads.push(t);
    }
    Ok(MapHandle {
        results: (0..n).map(|_| None).collect(),
        slots,
        threads,
        joined: false,
    })
}

impl<T> MapHandle<T> {
    /// Number of workers.
    pub fn len(&self) -> usize {
        self.slots.len()
    }
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// True when every worker finished (successfully or not).
    pub fn done(&self) -> bool {
        self.results
            .iter()
            .zip(&self.slots)
            .all(|(r, s)| r.is_some() || s.done())
    }

    /// Waits for every worker (up to `timeout`, default `PARALLEL_TIMEOUT`) and returns their
    /// results in worker order (MAP-1..3).
    pub fn join(&mut self, timeout: Option<Duration>) -> Result<Vec<T>> {
        if self.joined {
            return Err(Error::new(
                ErrorKind::Closed,
                "join",
                "this map was already joined",
            ));
        }
        let deadline = Deadline::or_default(timeout);
        for (i, slot) in self.slots.iter().enumerate() {
            if self.results[i].is_none() {
                match slot.wait(deadline, "join") {
                    Err(e) if matches!(e.kind(), ErrorKind::Timeout | ErrorKind::Cancelled) => {
                        let left = self.results.iter().filter(|r| r.is_none()).count();
                        return Err(Error::new(
                            e.kind(),
                            "join",
                            format!(
                                "{left} of {} map workers still running (worker {i} first): {}",
                                self.slots.len(),
                                e.message()
                            ),
                        ));
                    }
                    r => self.results[i] = Some(r),
                }
            }
        }
        self.joined = true;
        for t in self.threads.drain(..) {
            let _ = t.join(); // MAP-2: the worker's panic was caught; its thread has finished
        }
        let results = std::mem::take(&mut self.results);
        let failed = results.iter().filter(|r| matches!(r, Some(Err(_)))).count();
        let mut out = Vec::with_capacity(results.len());
        for r in results {
            match r.expect("every slot was filled") {
                Ok(v) => out.push(v),
                Err(e) if failed > 1 => {
                    return Err(Error::new(
                        e.kind(),
                        "join",
                        format!("{} ({} workers failed in all)", e.message(), failed),
                    ));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// A fixed set of threads running submitted jobs (MAP-4).
pub struct Pool {
    jobs: Arc<Channel<Job>>,
    threads: Vec<JoinHandle<()>>,
    pending: Arc<AtomicUsize>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Pool({} threads, {} jobs pending)",
            self.threads.len(),
            self.pending.load(Ordering::SeqCst)
        )
    }
}

/// The result of a job submitted to a [`Pool`].
#[derive(Debug)]
pub struct Task<T> {
    slot: Completion<T>,
}

impl<T> Task<T> {
    pub fn done(&self) -> bool {
        self.slot.done()
    }
    /// Waits for the job's value (a panic in the job is a `Worker` error).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<T> {
        self.slot.wait(Deadline::or_default(timeout), "task")
    }
}

impl Pool {
    /// A pool of `n` threads (0: one per usable core). Jobs queue up to
    /// `PARALLEL_WORKQUEUE_CAPACITY`; `submit` waits for room beyond that.
    pub fn new(n: usize) -> Result<Pool> {
        parallel_engine::config::try_config()?; // CONFIG-4
        let n = if n == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            n
        };
        let jobs: Arc<Channel<Job>> = Arc::new(Channel::new(0));
        let pending = Arc::new(AtomicUsize::new(0));
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let (jobs, pending) = (jobs.clone(), pending.clone());
            let t = std::thread::Builder::new()
                .name(format!("parallel-pool-{i}"))
                .spawn(move || {
                    loop {
                        // Idle threads re-arm their wait every hour; only close ends them.
                        match jobs.pop(Deadline::after(Duration::from_secs(3600))) {
                            Ok(job) => {
                                job();
                                pending.fetch_sub(1, Ordering::SeqCst);
                            }
                            Err(e) if e.kind() == ErrorKind::Closed => return,
                            Err(_) => continue,
                        }
                    }
                })
                .map_err(|e| Error::os("pool", &format!("starting pool thread {i}"), e))?;
            threads.push(t);
        }
        Ok(Pool {
            jobs,
            threads,
            pending,
        })
    }

    pub fn threads(&self) -> usize {
        self.threads.len()
    }

    /// Jobs submitted and not finished yet.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }

    /// Queues `f`; its value (or panic) comes back through the returned task.
    pub fn submit<T, F>(&self, f: F) -> Result<Task<T>>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let slot: Completion<T> = Completion::default();
        let s = slot.clone();
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            s.complete(r.map_err(|p| {
                Error::new(
                    ErrorKind::Worker,
                    "task",
                    format!("a pool job panicked: {}", panic_message(&*p)),
                )
            }));
        });
        self.pending.fetch_add(1, Ordering::SeqCst);
        if let Err(r) = self.jobs.push(job, Deadline::or_default(None)) {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            return Err(r.error.with_op("submit"));
        }
        Ok(Task { slot })
    }

    /// Runs `f` over every item and returns the results in item order; `progress(done, total)`
    /// is called as results come in.
    pub fn map<I, T, R, F>(
        &self,
        items: I,
        f: F,
        timeout: Option<Duration>,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<R>>
    where
        I: IntoIterator<Item = T>,
        T: Send + 'static,
        R: Send + 'static,
        F: Fn(T) -> R + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let tasks = items
            .into_iter()
            .map(|x| {
                let f = f.clone();
                self.submit(move || f(x))
            })
            .collect::<Result<Vec<_>>>()?;
        let deadline = Deadline::or_default(timeout);
        let total = tasks.len();
        let mut out = Vec::with_capacity(total);
        for (i, t) in tasks.iter().enumerate() {
            out.push(t.slot.wait(deadline, "map")?);
            progress(i + 1, total);
        }
        Ok(out)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.jobs.close();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

//! In-process queues: [`Channel`] (a bounded, closable FIFO over the lock-free ring) and
//! [`WorkQueue`] (the original's owner <-> workers command queue, typed, for threads).
//!
//! A work queue has two directions. The owner (the handle that created the queue) writes
//! *questions* and reads *answers*; every other handle (a worker) reads questions and writes
//! answers. Roles belong to handles, not threads: `WorkQueue::open(name)` returns the owner's
//! handle to whoever created the name and a worker's handle to everyone after; `q.worker()` makes
//! a worker handle from any handle.
//!
//! Invariants:
//! - WQ-1 (end of queue): a worker's read returns `Closed` only when the owner closed the queue
//!   (or dropped its handle) and every question was taken. The owner's read returns `Closed` only
//!   when, in addition, no worker handle is open and every answer was taken: nothing more can
//!   arrive. End of queue is never a guess from a sentinel value.
//! - WQ-2 (back-pressure): each direction holds at most `capacity` items
//!   (`PARALLEL_WORKQUEUE_CAPACITY`); a writer waits, with a deadline, for room. A `write_all`
//!   of more items than the capacity is placed in order, in pieces of at most half the
//!   capacity, as readers make room; the deadline bounds the whole call.
//! - WQ-3: one `write_all` of at most `capacity` items lands as adjacent items in order
//!   (RING-3); items of one writer are read in the order written (RING-4).
//! - WQ-4: a failed write gives the item back ([`Rejected`]).
//! - WQ-5: every wait has a deadline (default `PARALLEL_TIMEOUT`) and parks without a lost
//!   wake-up (EVENT-1); closing wakes every waiter of both directions.
//! - WQ-6: a name maps to at most one live queue per process; a queue whose owner handle was
//!   dropped no longer answers to its name, so the next `open` creates a fresh one.
//! - WQ-7 (drain): each worker handle counts the questions it took and has not answered; an
//!   answer settles one of them, closing the handle settles all of them (they will never be
//!   answered). `drain()` waits until the settled questions reach the number written before
//!   the call, so a sentinel nobody answers does not hold up this drain or any later one.

mod channel;

use channel::closed_for_writing;
pub(crate) use channel::end_of_queue;
pub use channel::{Channel, Rejected};

use crate::sync::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use parallel_engine::error::{Error, ErrorKind, Result};
use parallel_engine::runtime::Deadline;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// The role of a work-queue handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Writes questions, reads answers.
    Owner,
    /// Reads questions, writes answers.
    Worker,
}

pub(crate) struct Inner<T> {
    name: Option<String>,
    pub(crate) questions: Channel<T>,
    pub(crate) answers: Channel<T>,
    /// Open worker handles (WQ-1).
    workers: AtomicUsize,
    owner_dropped: AtomicBool,
    asked: AtomicU64,
    answered: AtomicU64,
    /// Questions answered, or abandoned by a closed worker handle (WQ-7).
    settled: AtomicU64,
    /// Questions held unanswered by open worker handles (for timeout messages).
    held: AtomicU64,
}

/// A handle on an owner <-> workers queue of `T` items, shared by the threads of one process.
pub struct WorkQueue<T> {
    inner: Arc<Inner<T>>,
    role: Role,
    closed: AtomicBool,
    /// Questions this worker handle took and has not answered (WQ-7).
    held: AtomicU64,
}

impl<T> std::fmt::Debug for WorkQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "WorkQueue({:?}, {:?}, {} questions, {} answers)",
            self.inner.name,
            self.role,
            self.inner.questions.len(),
            self.inner.answers.len()
        )
    }
}

type Registry = HashMap<String, Box<dyn Any + Send>>;
static NAMED: Mutex<Option<Registry>> = Mutex::new(None);

impl<T: Send + 'static> WorkQueue<T> {
    /// An anonymous queue; the returned handle is its owner. Share it with [`WorkQueue::worker`].
    /// `capacity` 0 means `PARALLEL_WORKQUEUE_CAPACITY`.
    pub fn new(capacity: usize) -> WorkQueue<T> {
        WorkQueue::fresh(None, capacity)
    }

    fn fresh(name: Option<String>, capacity: usize) -> WorkQueue<T> {
        let inner = Arc::new(Inner {
            name,
            questions: Channel::new(capacity),
            answers: Channel::new(capacity),
            workers: AtomicUsize::new(0),
            owner_dropped: AtomicBool::new(false),
            asked: AtomicU64::new(0),
            answered: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            held: AtomicU64::new(0),
        });
        WorkQueue {
            inner,
            role: Role::Owner,
            closed: AtomicBool::new(false),
            held: AtomicU64::new(0),
        }
    }

    /// Creates the queue called `name` (this handle is its owner) or opens it (a worker handle)
    /// (WQ-6). Fails with `Mismatch` when the name is in use for items of another type.
    pub fn open(name: &str) -> Result<WorkQueue<T>> {
        let mut g = NAMED.lock().unwrap_or_else(|e| e.into_inner());
        let reg = g.get_or_insert_with(HashMap::new);
        if let Some(entry) = reg.get(name) {
            let weak = entry.downcast_ref::<Weak<Inner<T>>>().ok_or_else(|| {
                Error::new(
                    ErrorKind::Mismatch,
                    "workqueue",
                    format!("the queue {name:?} exists with items of another type"),
                )
            })?;
            if let Some(inner) = weak.upgrade()
                && !inner.owner_dropped.load(Ordering::SeqCst)
            {
                inner.workers.fetch_add(1, Ordering::SeqCst);
                return Ok(WorkQueue {
                    inner,
                    role: Role::Worker,
                    closed: AtomicBool::new(false),
                    held: AtomicU64::new(0),
                });
            }
        }
        reg.retain(|_, v| {
            v.downcast_ref::<Weak<Inner<T>>>()
                .is_none_or(|w| w.strong_count() > 0)
        });
        let q = WorkQueue::fresh(Some(name.to_string()), 0);
        reg.insert(name.to_string(), Box::new(Arc::downgrade(&q.inner)));
        Ok(q)
    }

    /// A new worker handle on the same queue.
    pub fn worker(&self) -> WorkQueue<T> {
        self.inner.workers.fetch_add(1, Ordering::SeqCst);
        WorkQueue {
            inner: self.inner.clone(),
            role: Role::Worker,
            closed: AtomicBool::new(false),
            held: AtomicU64::new(0),
        }
    }
}

impl<T> WorkQueue<T> {
    pub fn role(&self) -> Role {
        self.role
    }
    pub fn is_owner(&self) -> bool {
        self.role == Role::Owner
    }
    pub fn name(&self) -> Option<&str> {
        self.inner.name.as_deref()
    }
    pub fn capacity(&self) -> usize {
        self.inner.questions.capacity()
    }
    /// Items waiting in the direction this handle reads.
    pub fn len(&self) -> usize {
        self.incoming().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Open worker handles.
    pub fn workers(&self) -> usize {
        self.inner.workers.load(Ordering::SeqCst)
    }

    fn outgoing(&self) -> &Channel<T> {
        match self.role {
            Role::Owner => &self.inner.questions,
            Role::Worker => &self.inner.answers,
        }
    }
    fn incoming(&self) -> &Channel<T> {
        match self.role {
            Role::Owner => &self.inner.answers,
            Role::Worker => &self.inner.questions,
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(closed_for_writing("write"));
        }
        Ok(())
    }

    fn count_written(&self, n: u64) {
        match self.role {
            Role::Owner => {
                self.inner.asked.fetch_add(n, Ordering::SeqCst);
            }
            Role::Worker => {
                self.inner.answered.fetch_add(n, Ordering::SeqCst);
                self.settle(n);
            }
        }
    }

    /// Settles up to `n` of the questions this worker handle holds (WQ-7).
    fn settle(&self, n: u64) {
        let mut credit = 0;
        let _ = self
            .held
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |h| {
                credit = h.min(n);
                Some(h - credit)
            });
        if credit > 0 {
            self.inner.held.fetch_sub(credit, Ordering::SeqCst);
            self.inner.settled.fetch_add(credit, Ordering::SeqCst);
            self.inner.answers.readable.notify();
        }
    }

    /// The queue's state, for timeout messages.
    fn state(&self) -> String {
        format!(
            "capacity {}: {} questions queued, {} answers queued, {} questions held unanswered by {} worker handle(s), questions {}",
            self.capacity(),
            self.inner.questions.len(),
            self.inner.answers.len(),
            self.inner.held.load(Ordering::SeqCst),
            self.workers(),
            if self.inner.questions.is_closed() {
                "closed"
            } else {
                "open"
            }
        )
    }

    fn explain(&self, e: Error, extra: &str) -> Error {
        if e.kind() != ErrorKind::Timeout {
            return e;
        }
        Error::new(
            e.kind(),
            e.op(),
            format!("{} [{}{extra}]", e.message(), self.state()),
        )
    }

    /// Writes one item (owner: a question; worker: an answer), waiting for room up to `timeout`
    /// (default `PARALLEL_TIMEOUT`).
    pub fn write(&self, item: T, timeout: Option<Duration>) -> Result<(), Rejected<T>> {
        if let Err(error) = self.check_open() {
            return Err(Rejected { error, item });
        }
        if let Err(Rejected { error, item }) =
            self.outgoing().push(item, Deadline::or_default(timeout))
        {
            let error = self.explain(error, "");
            return Err(Rejected { error, item });
        }
        self.count_written(1);
        Ok(())
    }

    /// Writes now or gives the item back (full or closed).
    pub fn try_write(&self, item: T) -> Result<(), Rejected<T>> {
        if let Err(error) = self.check_open() {
            return Err(Rejected { error, item });
        }
        self.outgoing().try_push(item)?;
        self.count_written(1);
        Ok(())
    }

    /// Writes all items in order: up to `capacity` of them as adjacent entries (WQ-3), more in
    /// pieces of at most half the capacity as readers make room (WQ-2). On failure the items
    /// not written are given back and the error says how many went in.
    pub fn write_all(
        &self,
        items: Vec<T>,
        timeout: Option<Duration>,
    ) -> Result<(), Rejected<Vec<T>>> {
        if let Err(error) = self.check_open() {
            return Err(Rejected { error, item: items });
        }
        let deadline = Deadline::or_default(timeout);
        let (total, piece) = (items.len(), self.capacity().div_ceil(2));
        let piece = if total <= self.capacity() {
            total
        } else {
            piece
        };
        let (mut rest, mut done) = (items, 0);
        while !rest.is_empty() {
            let tail = rest.split_off(piece.min(rest.len()));
            let n = rest.len();
            if let Err(Rejected { error, mut item }) = self.outgoing().push_all(rest, deadline) {
                item.extend(tail);
                let error = Error::new(
                    error.kind(),
                    error.op(),
                    format!(
                        "{done} of the {total} items were written (in order); the other {} were not: {}",
                        item.len(),
                        error.message()
                    ),
                );
                return Err(Rejected {
                    error: self.explain(error, ""),
                    item,
                });
            }
            self.count_written(n as u64);
            done += n;
            rest = tail;
        }
        Ok(())
    }

    /// True when nothing more can arrive for this handle's reads (WQ-1).
    pub fn ended(&self) -> bool {
        let q = &self.inner.questions;
        let questions_done = q.is_closed() && q.is_empty();
        match self.role {
            Role::Worker => questions_done,
            Role::Owner => {
                questions_done
                    && self.inner.workers.load(Ordering::SeqCst) == 0
                    && self.inner.answers.is_empty()
            }
        }
    }

    /// Reads the next item, waiting up to `timeout` (default `PARALLEL_TIMEOUT`). `Closed` means
    /// end of queue (WQ-1).
    pub fn read(&self, timeout: Option<Duration>) -> Result<T> {
        let ch = self.incoming();
        let mut got = None;
        ch.readable
            .wait_until(
                Deadline::or_default(timeout),
                ch.spin,
                "read",
                match self.role {
                    Role::Owner => "an answer in the work queue",
                    Role::Worker => "a question in the work queue",
                },
                || {
                    got = self.try_read()?;
                    Ok(got.is_some())
                },
            )
            .map_err(|e| self.explain(e, ""))?;
        Ok(got.expect("ready means an item"))
    }

    /// Reads the next item if one is queued: `Ok(None)` when empty, `Closed` at end of queue.
    pub fn try_read(&self) -> Result<Option<T>> {
        let v = self.try_read_inner()?;
        if v.is_some() && self.role == Role::Worker {
            self.held.fetch_add(1, Ordering::SeqCst);
            self.inner.held.fetch_add(1, Ordering::SeqCst);
        }
        Ok(v)
    }

    fn try_read_inner(&self) -> Result<Option<T>> {
        if let Some(v) = self.incoming().try_pop() {
            return Ok(Some(v));
        }
        if self.ended() {
            // An item may have landed between the pop and the end check.
            return match self.incoming().try_pop() {
                Some(v) => Ok(Some(v)),
                None => Err(end_of_queue("read", self.end_reason())),
            };
        }
        Ok(None)
    }

    fn end_reason(&self) -> &'static str {
        match self.role {
            Role::Worker => "the owner closed the queue and every question was read",
            Role::Owner => {
                "the queue was closed, every question was taken, no worker is left and every answer was read"
            }
        }
    }

    /// Owner: waits until every question written before the call is settled (WQ-7): answered,
    /// or taken by a worker handle that closed without answering it; or until no answer can
    /// come any more (WQ-1).
    pub fn drain(&self, timeout: Option<Duration>) -> Result<()> {
        if self.role != Role::Owner {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "drain",
                "drain() is for the owner's handle (workers read questions; the owner waits for answers)",
            ));
        }
        let want = self.inner.asked.load(Ordering::SeqCst);
        let ch = &self.inner.answers;
        ch.readable
            .wait_until(
                Deadline::or_default(timeout),
                ch.spin,
                "drain",
                "an answer to every question written before drain() (answers beyond the capacity wait for reads)",
                || Ok(self.inner.settled.load(Ordering::SeqCst) >= want || self.ended()),
            )
            .map_err(|e| {
                let left = want.saturating_sub(self.inner.settled.load(Ordering::SeqCst));
                self.explain(
                    e,
                    &format!(
                        "; {left} of the {want} questions written before drain() are still unanswered"
                    ),
                )
            })
    }

    /// Closes this handle for writing. The owner's close ends the questions: workers read what is
    /// queued, then end of queue; the owner can still read answers. A worker's close tells the
    /// owner it will send nothing more.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        match self.role {
            Role::Owner => self.inner.questions.close(),
            Role::Worker => {
                self.settle(u64::MAX); // what it holds will never be answered (WQ-7)
                self.inner.workers.fetch_sub(1, Ordering::SeqCst);
                self.inner.answers.readable.notify();
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// Reads until end of queue; each item is a `Result` (a timeout ends iteration with an error).
    pub fn iter(&self) -> Iter<'_, T> {
        Iter {
            q: self,
            done: false,
        }
    }
}

impl<T> Drop for WorkQueue<T> {
    fn drop(&mut self) {
        if self.role == Role::Owner {
            self.inner.owner_dropped.store(true, Ordering::SeqCst);
        }
        self.close();
    }
}

/// Iterator over a work queue's incoming items until end of queue.
#[derive(Debug)]
pub struct Iter<'a, T> {
    q: &'a WorkQueue<T>,
    done: bool,
}

impl<T> Iterator for Iter<'_, T> {
    type Item = Result<T>;
    fn next(&mut self) -> Option<Result<T>> {
        if self.done {
            return None;
        }
        match self.q.read(None) {
            Ok(v) => Some(Ok(v)),
            Err(e) if e.kind() == ErrorKind::Closed => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

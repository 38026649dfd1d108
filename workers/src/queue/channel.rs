//! [`Channel`]: a bounded, closable FIFO over the lock-free ring, with parked waits (WQ-2..WQ-5
//! for one direction), and [`Rejected`], a write given back.

use crate::event::Event;
use crate::ring::Ring;
use crate::sync::{AtomicBool, Ordering};
use parallel_engine::config::config;
use parallel_engine::error::{Error, ErrorKind, Result};
use parallel_engine::runtime::Deadline;
use std::sync::Arc;
use std::time::Duration;

/// An item a write could not place, given back with the reason (WQ-4).
pub struct Rejected<T> {
    pub error: Error,
    pub item: T,
}

impl<T> std::fmt::Debug for Rejected<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rejected({})", self.error)
    }
}

impl<T> From<Rejected<T>> for Error {
    fn from(r: Rejected<T>) -> Error {
        r.error
    }
}

pub(crate) fn end_of_queue(op: &'static str, what: &str) -> Error {
    Error::new(ErrorKind::Closed, op, format!("end of queue: {what}"))
}

pub(super) fn closed_for_writing(op: &'static str) -> Error {
    Error::new(
        ErrorKind::Closed,
        op,
        "the queue is closed for writing (close() was called on this handle or by the owner)",
    )
}

/// A bounded, closable multi-producer multi-consumer FIFO.
#[derive(Debug)]
pub struct Channel<T> {
    pub(super) ring: Ring<T>,
    pub(super) closed: AtomicBool,
    /// Rung after a push or a close (readers wait on it).
    pub(crate) readable: Arc<Event>,
    /// Rung after a pop or a close (writers wait on it).
    pub(crate) writable: Arc<Event>,
    pub(super) spin: Duration,
}

impl<T> Channel<T> {
    /// A channel of `capacity` items (0: `PARALLEL_WORKQUEUE_CAPACITY`).
    pub fn new(capacity: usize) -> Channel<T> {
        Channel::with_events(capacity, Arc::default(), Arc::default())
    }

    pub(crate) fn with_events(capacity: usize, readable: Arc<Event>, writable: Arc<Event>) -> Self {
        let cap = if capacity == 0 {
            config().workqueue_capacity
        } else {
            capacity
        };
        Channel {
            ring: Ring::new(cap),
            closed: AtomicBool::new(false),
            readable,
            writable,
            spin: config().spin.min(Duration::from_micros(20)),
        }
    }

    pub fn capacity(&self) -> usize {
        self.ring.capacity()
    }
    pub fn len(&self) -> usize {
        self.ring.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// No more writes; readers get every queued item, then end of queue. Wakes all waiters.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.readable.notify();
        self.writable.notify();
    }

    /// Places `item` now or gives it back (full or closed).
    pub fn try_push(&self, item: T) -> Result<(), Rejected<T>> {
        if self.is_closed() {
            return Err(Rejected {
                error: closed_for_writing("write"),
                item,
            });
        }
        match self.ring.try_push(item) {
            Ok(()) => {
                self.readable.notify();
                Ok(())
            }
            Err(item) => Err(Rejected {
                error: Error::new(ErrorKind::Timeout, "write", "the queue is full"),
                item,
            }),
        }
    }

    /// Places `item`, waiting for room until the deadline (WQ-2).
    pub fn push(&self, item: T, deadline: Deadline) -> Result<(), Rejected<T>> {
        self.place(
            item,
            deadline,
            "room in the queue (readers are slower than writers; raise PARALLEL_WORKQUEUE_CAPACITY or read faster)",
            |x| self.ring.try_push(x),
        )
    }

    /// Waits until `try_place` accepts `value` (handing it back while the queue is full), the
    /// queue closes, or the deadline passes; a failed write gives the value back.
    fn place<U>(
        &self,
        value: U,
        deadline: Deadline,
        what: &str,
        try_place: impl Fn(U) -> Result<(), U>,
    ) -> Result<(), Rejected<U>> {
        let mut slot = Some(value);
        let r = self
            .writable
            .wait_until(deadline, self.spin, "write", what, || {
                if self.is_closed() {
                    return Err(closed_for_writing("write"));
                }
                match try_place(slot.take().expect("value present until placed")) {
                    Ok(()) => Ok(true),
                    Err(back) => {
                        slot = Some(back);
                        Ok(false)
                    }
                }
            });
        match r {
            Ok(()) => {
                self.readable.notify();
                Ok(())
            }
            Err(error) => Err(Rejected {
                error,
                item: slot.expect("a failed write still holds its value"),
            }),
        }
    }

    /// Places all `items` as adjacent entries (WQ-3), waiting for room for all of them.
    pub fn push_all(&self, items: Vec<T>, deadline: Deadline) -> Result<(), Rejected<Vec<T>>> {
        if items.len() > self.capacity() {
            let error = Error::new(
                ErrorKind::Unsupported,
                "write",
                format!(
                    "{} items cannot be written at once into a queue of capacity {} (raise PARALLEL_WORKQUEUE_CAPACITY or write fewer at a time)",
                    items.len(),
                    self.capacity()
                ),
            );
            return Err(Rejected { error, item: items });
        }
        self.place(
            items,
            deadline,
            "room in the queue for the whole batch",
            |x| self.ring.try_push_batch(x),
        )
    }

    /// Places all `items` as adjacent entries now, or gives them back (full or closed).
    pub fn try_push_all(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        if self.is_closed() {
            return Err(items);
        }
        self.ring.try_push_batch(items)?;
        self.readable.notify();
        Ok(())
    }

    /// Takes the oldest item now, if any.
    pub fn try_pop(&self) -> Option<T> {
        let v = self.ring.try_pop();
        if v.is_some() {
            self.writable.notify();
        }
        v
    }

    /// Takes the oldest item, waiting until the deadline; `Closed` once closed and empty.
    pub fn pop(&self, deadline: Deadline) -> Result<T> {
        let mut got = None;
        self.readable
            .wait_until(deadline, self.spin, "read", "an item in the queue", || {
                got = self.try_pop();
                if got.is_some() {
                    return Ok(true);
                }
                if self.is_closed() {
                    got = self.try_pop();
                    return match got {
                        Some(_) => Ok(true),
                        None => Err(end_of_queue(
                            "read",
                            "the queue was closed and every item was read",
                        )),
                    };
                }
                Ok(false)
            })?;
        Ok(got.expect("ready means an item"))
    }
}

//! Scoped asynchronous sends: a send started from borrowed memory never outlives the borrow.
//!
//! The ring sends a chunk of the caller's buffer on the [`Sender`]'s lane while this thread
//! receives the next one; the send reads the buffer after `send` returned. If this thread then
//! returned early (`?` on a failed receive), the caller could free or reuse the buffer while the
//! sender lane still reads it.
//!
//! Invariants:
//! - SEND-1: every asynchronous send of borrowed bytes goes through a [`SendScope`], made only by
//!   [`SendScope::run`] (as `std::thread::scope`). The scope's lifetime `'a` is the borrow of the
//!   bytes (`send` takes `&'a [u8]`), so the borrow checker refuses to free, move or write the
//!   memory while the scope lives; and `run` does not return until every send it started has
//!   finished reading, on every path (`?`, panic). The scope never leaves `run`'s frame, so safe
//!   code cannot `mem::forget` it to skip that wait.
//! - SEND-2: dropping a scope with sends still pending (an error path) first gives them a short
//!   grace to finish, then closes the links they use so they fail promptly, then waits for each to
//!   complete: the error is reported within about a second, not at the operation's deadline.
//! - SEND-3: a send whose whole frame fits in the room of a shared-memory ring or in half a TCP
//!   socket's send buffer (and reads no memory in place) is written synchronously by the caller, never overtaking a send of the
//!   same scope to the same link still queued on the lane; it is complete when `send` returns,
//!   so SEND-1 holds for it trivially, and its error is reported by `wait_all`.

use super::Communicator;
use parallel_engine::endpoint::Conn;
use parallel_engine::link::Carry;
use parallel_engine::runtime::{Completion, Deadline, Lane};
use parallel_engine::value::Value;
use parallel_engine::{Error, Result};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

/// The tree's sends: a lane of the engine's executor (`runtime::Lane`), so the ring's sends
/// overlap its receives in submission order without a thread of the tree's own, and without
/// borrowing the engine's reactors (whose I/O other trees of this process may be waiting on).
pub(crate) struct Sender(Lane);

impl Sender {
    pub(crate) fn new() -> Sender {
        Sender(Lane::new())
    }

    /// Sends `v` to `conn` on the lane; the completion reports the outcome.
    fn send_async(
        &self,
        conn: &Arc<Conn>,
        v: Value,
        deadline: Deadline,
        carry: Carry,
    ) -> Completion<()> {
        let conn = conn.clone();
        self.0
            .submit(move || conn.link().send_carried(&v, deadline, carry))
    }
}

/// How long a dropped scope lets pending sends finish before closing their links (SEND-2).
const GRACE: Duration = Duration::from_millis(500);

/// Sends in flight from memory borrowed for `'a` (SEND-1).
pub(crate) struct SendScope<'a> {
    sender: &'a Sender,
    deadline: Deadline,
    pending: Vec<(Arc<Conn>, Completion<()>)>,
    /// The error of a send made in place (SEND-3), reported by `wait_all` like a lane's.
    failed: Option<Error>,
    /// How large host segments cross shared-memory links ([`SendScope::carry`]).
    carry: Carry,
    _bytes: PhantomData<&'a [u8]>,
}

impl<'a> SendScope<'a> {
    /// Runs `f` with a new scope and returns its result only after every send `f` started has
    /// completed (SEND-1), on every path: return, `?`, panic. The scope lives in this frame and `f`
    /// gets only a reference, so no caller can forget (`mem::forget`) or leak it to skip the wait
    /// while a send still reads the borrowed bytes.
    pub(crate) fn run<R>(comm: &'a Communicator<'_>, f: impl FnOnce(&mut SendScope<'a>) -> R) -> R {
        let mut scope = SendScope {
            sender: comm.sender(),
            deadline: comm.deadline(),
            pending: Vec::new(),
            failed: None,
            carry: Carry::Any,
            _bytes: PhantomData,
        };
        f(&mut scope)
        // `scope` drops here (or while unwinding): Drop waits for what is still pending.
    }

    /// How the scope's later sends carry large host segments over shared-memory links:
    /// [`Carry::Stream`] for messages the receiver combines piece by piece straight from the
    /// link's ring (a ring all-reduce's reduce-scatter), [`Carry::Any`] (the default) else.
    pub(crate) fn carry(&mut self, carry: Carry) {
        self.carry = carry;
    }

    /// Starts sending `bytes` (as a u8 tensor) to `conn` on the tree's sender lane; `bytes` stay
    /// borrowed until the scope is waited for or dropped.
    pub(crate) fn send(&mut self, conn: &Arc<Conn>, bytes: &'a [u8]) {
        // SAFETY: `bytes` is borrowed for 'a, which outlives this scope, and the scope does not
        // end (wait_all or Drop) before this send completed (SEND-1): the memory stays valid
        // and, being shared-borrowed, unmodified for as long as the lane's send reads it.
        let v = unsafe { super::view(bytes) };
        // SAFETY: as above.
        unsafe { self.send_value(conn, v) }
    }

    /// Starts sending `v`, a tensor over memory the caller does not hand over (host or device
    /// memory), to `conn` on the tree's sender lane.
    ///
    /// # Safety
    /// The memory `v` refers to stays valid and unwritten until this scope ended (SEND-1):
    /// [`SendScope::run`] waits for the send on every path, so a caller that keeps the memory
    /// for the scope's lifetime `'a` and writes none of it meanwhile keeps the contract.
    pub(crate) unsafe fn send_value(&mut self, conn: &Arc<Conn>, v: Value) {
        // SEND-3: a send that cannot wait for the peer (room in a shared-memory ring or a TCP
        // socket's send buffer) is written
        // here and now, unless an earlier send of this scope to the same link is still queued
        // (it would be overtaken). No hand-off to the lane: with two ranks on two cores, waking
        // another thread of ours per chunk costs a scheduler round trip while the peer waits.
        let queued = self
            .pending
            .iter()
            .any(|(c, p)| Arc::ptr_eq(c, conn) && !p.done());
        if !queued && self.failed.is_none() {
            match conn.link().send_now_carried(&v, self.carry) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    self.failed = Some(e);
                    return;
                }
            }
        }
        let c = self.sender.send_async(conn, v, self.deadline, self.carry);
        self.pending.push((conn.clone(), c));
    }

    /// Waits for every pending send; the first error, after all have completed (so the scope is
    /// empty whatever the outcome).
    pub(crate) fn wait_all(&mut self, op: &'static str) -> Result<()> {
        let mut first: Option<Error> = self.failed.take();
        for (conn, c) in std::mem::take(&mut self.pending) {
            if let Err(e) = c.wait(self.deadline, op) {
                if !c.done() {
                    // Timed out: the send may still read the bytes. Interrupt it and wait for it.
                    conn.close();
                    wait_done(&c);
                }
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Waits until `c` completed. Only called after the send's link was closed, which wakes a blocked
/// send (LINK-4), so this returns promptly; it logs if it does not rather than return while the
/// send may still read borrowed memory.
fn wait_done(c: &Completion<()>) {
    let mut waited = 0u32;
    while !c.done() {
        let _ = c.wait(Deadline::after(Duration::from_secs(1)), "send");
        waited += 1;
        if waited % 10 == 0 && !c.done() {
            tracing::error!(
                seconds = waited,
                "a send from borrowed memory has not finished after its link was closed; still \
                 waiting (SEND-1)"
            );
        }
    }
}

impl Drop for SendScope<'_> {
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        // An error path (SEND-2): give healthy sends a moment, then interrupt the rest.
        let grace = Deadline::after(GRACE);
        for (conn, c) in &self.pending {
            if c.wait(grace, "send").is_err() && !c.done() {
                conn.close();
            }
        }
        for (_, c) in &self.pending {
            wait_done(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Tree;
    use crate::rendezvous::TreeOptions;
    use std::time::Instant;

    /// SEND-1/SEND-2: a scope dropped on an error path, with large sends still blocked on a
    /// neighbour that does not read, returns only once every send completed (so the caller may
    /// then free the bytes), and promptly (it interrupts them), not at the 20 s deadline.
    #[test]
    fn send_2_dropped_scope_waits_for_every_pending_send() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = move |r: usize| TreeOptions {
            rank: Some(r),
            world_size: Some(2),
            root: Some(format!("127.0.0.1:{port}")),
            timeout: Some(Duration::from_secs(20)),
            ..Default::default()
        };
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let stalled = std::thread::spawn(move || {
            let t = Tree::new(opts(1)).unwrap();
            // Reads nothing until told to stop, then leaves.
            let _ = stop_rx.recv_timeout(Duration::from_secs(30));
            drop(t);
        });
        let t = Tree::new(opts(0)).unwrap();
        let comm = t.comm(Deadline::after(Duration::from_secs(20)));
        let conn = comm.link(1).unwrap().clone();
        let bytes = vec![0x5au8; 16 << 20];
        let started = Instant::now();
        let handles: Vec<Completion<()>> = SendScope::run(&comm, |scope| {
            for i in 0..4 {
                scope.send(&conn, &bytes[i * (4 << 20)..(i + 1) * (4 << 20)]);
            }
            let handles = scope.pending.iter().map(|(_, c)| c.clone()).collect();
            assert!(
                scope.pending.iter().any(|(_, c)| !c.done()),
                "64 MiB to a peer that reads nothing cannot all be sent at once"
            );
            handles
            // The scope ends here with sends pending, as on an early `?`.
        });
        let took = started.elapsed();
        assert!(
            handles.iter().all(Completion::done),
            "the scope ended with a send still reading the bytes"
        );
        assert!(
            took < Duration::from_secs(10),
            "the scope took {took:?} to end"
        );
        drop(bytes); // now sound: no send reads them
        stop_tx.send(()).unwrap();
        stalled.join().unwrap();
    }

    #[test]
    fn ring_2_segments_must_lie_in_the_buffer_without_overlap() {
        use crate::algorithms::ring::disjoint;
        assert!(disjoint(10, &(6..9), &(2..5)).is_ok());
        assert!(disjoint(10, &(0..2), &(2..2)).is_ok(), "an empty segment");
        assert!(disjoint(10, &(0..3), &(2..5)).is_err(), "overlap");
        let e = disjoint(10, &(0..3), &(8..11)).unwrap_err();
        assert!(
            e.to_string().contains("10-byte buffer"),
            "out of bounds: {e}"
        );
    }
}

//! One connection: a link plus the server-side id and tag (also a client's core), the inbox a
//! read-ahead fills (EP-5), and the asynchronous sends and receives on its reactor (EP-4).

use crate::error::Result;
use crate::link::{Carrier, Link, LinkKind, Stats};
use crate::runtime::{Completion, Deadline, Runtime};
use crate::value::{Key, Tensor, Value};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

static CONN_KEYS: AtomicUsize = AtomicUsize::new(0);

/// One connection: a link plus the server-side id and tag (also used as the client's core).
#[derive(Debug)]
pub struct Conn {
    pub(super) link: Link,
    id: AtomicI64,
    tag: Mutex<Option<String>>,
    key: usize,
    pub(super) reported: AtomicBool,
    created: Instant,
    /// Messages (or the error that ended the link) read ahead for `recv_any` (EP-5).
    pub(super) inbox: Mutex<VecDeque<Result<Value>>>,
    /// A read-ahead thread holds the receive lock (EP-5).
    pub(super) reading: AtomicBool,
}

impl Conn {
    pub(super) fn new(link: Link, id: i64) -> Conn {
        Conn {
            link,
            id: AtomicI64::new(id),
            tag: Mutex::new(None),
            key: CONN_KEYS.fetch_add(1, Ordering::Relaxed),
            reported: AtomicBool::new(false),
            created: Instant::now(),
            inbox: Mutex::new(VecDeque::new()),
            reading: AtomicBool::new(false),
        }
    }
    pub(super) fn take_inbox(&self) -> Option<Result<Value>> {
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
    pub(super) fn inbox_empty(&self) -> bool {
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
    /// Receives the next message: first what a read-ahead left in the inbox (EP-5).
    fn recv_deadline(
        &self,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
        start: Instant,
    ) -> Result<Value> {
        let mut g = self.link.lock_recv();
        if let Some(r) = self.take_inbox() {
            return match r {
                Ok(v) if !out.is_empty() => {
                    crate::link::into_outs(v, out, paths).map_err(|e| e.with_peer(self.peer()))
                }
                r => r,
            };
        }
        g.recv_keyed_started(out, paths, deadline, start)
    }
    /// Receives the next message, one host tensor (or bytes) matching `out`, handing its bytes
    /// to `sink` in pieces instead of writing them into `out`
    /// ([`crate::link::RecvGuard::recv_streamed`]).
    pub fn recv_streamed(
        &self,
        out: &mut Tensor,
        grain: usize,
        timeout: Option<Duration>,
        sink: &mut crate::link::Sink<'_>,
    ) -> Result<()> {
        let deadline = Deadline::or_default(timeout);
        crate::link::check_grain(grain)?;
        let mut g = self.link.lock_recv();
        if let Some(r) = self.take_inbox() {
            // Read ahead whole (EP-5): checked, then handed over in pieces (of PIECE bytes,
            // which every grain divides).
            let mut into = vec![Tensor::new(
                out.dtype(),
                out.shape().to_vec(),
                crate::buffer::Buf::with_len(out.nbytes())?,
            )?];
            crate::link::into_outs(r?, &mut into, None).map_err(|e| e.with_peer(self.peer()))?;
            return crate::link::feed(into[0].bytes().unwrap_or(&[]), sink);
        }
        g.recv_streamed(out, grain, deadline, sink)
    }
    /// A receive with one clock read for its deadline and its statistics.
    fn recv_timed(
        &self,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        timeout: Option<Duration>,
    ) -> Result<Value> {
        let t0 = Instant::now();
        self.recv_deadline(out, paths, Deadline::starting(t0, timeout), t0)
    }
    pub fn id(&self) -> i64 {
        self.id.load(Ordering::Relaxed)
    }
    pub fn set_id(&self, id: i64) {
        self.id.store(id, Ordering::Relaxed)
    }
    pub fn tag(&self) -> Option<String> {
        self.tag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
    pub fn set_tag(&self, tag: Option<String>) {
        *self.tag.lock().unwrap_or_else(|e| e.into_inner()) = tag;
    }
    pub fn peer(&self) -> &str {
        self.link.peer()
    }
    pub fn link_kind(&self) -> LinkKind {
        self.link.kind()
    }
    pub fn link(&self) -> &Link {
        &self.link
    }
    /// Names the peer in this connection's errors ([`Link::name_peer`]).
    pub fn name_peer(&self, name: String) {
        self.link.name_peer(name)
    }
    pub fn stats(&self) -> Stats {
        self.link.stats()
    }
    /// Seconds since the connection was set up.
    pub fn age(&self) -> Duration {
        self.created.elapsed()
    }
    pub fn is_closed(&self) -> bool {
        self.link.is_closed()
    }
    pub fn send(&self, v: &Value, timeout: Option<Duration>) -> Result<()> {
        // One clock read serves the deadline and the link's statistics.
        let t0 = Instant::now();
        self.link
            .send_started(v, Deadline::starting(t0, timeout), t0)
    }
    /// Sends `v` at once, on the caller's thread, when a shared-memory ring has room for all
    /// of it and it carries nothing the peer reads in place ([`Link::send_now`]): a copy into
    /// the ring, never a wait. `Ok(false)`: nothing was sent (a TCP link, or no room); errors
    /// are those of [`Conn::send`].
    pub fn send_if_room(&self, v: &Value) -> Result<bool> {
        if self.link.kind() != LinkKind::Shm {
            return Ok(false);
        }
        self.link.send_now(v)
    }
    /// Sends a collective's control message ([`Link::send_control`]).
    pub fn send_control(&self, v: &Value, timeout: Option<Duration>) -> Result<()> {
        self.link.send_control(v, Deadline::or_default(timeout))
    }
    /// Receives a collective's control message ([`Link::recv_control`]).
    pub fn recv_control(&self, timeout: Option<Duration>) -> Result<Value> {
        self.link.recv_control(Deadline::or_default(timeout))
    }
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Value> {
        self.recv_timed(&mut [], None, timeout)
    }
    /// Receives into the caller's tensors (in order), checking dtype and shape.
    pub fn recv_into(&self, out: &mut [Tensor], timeout: Option<Duration>) -> Result<Value> {
        self.recv_timed(out, None, timeout)
    }
    /// Like `recv_into`, matching tensors to `out` by path (`paths[i]` is `out[i]`'s), not by
    /// position ([`crate::link::Link::recv_keyed`]).
    pub fn recv_into_keyed(
        &self,
        out: &mut [Tensor],
        paths: &[Vec<Key>],
        timeout: Option<Duration>,
    ) -> Result<Value> {
        self.recv_timed(out, Some(paths), timeout)
    }
    pub fn close(&self) {
        self.link.close()
    }
    /// Sends an abort notice (see [`Link::send_abort`]).
    pub fn send_abort(&self, reason: &str, timeout: Option<Duration>) -> Result<()> {
        self.link.send_abort(reason, Deadline::or_default(timeout))
    }

    /// Sends on this connection's reactor (EP-4); the value is moved into the task.
    pub fn send_async(self: &Arc<Self>, v: Value, timeout: Option<Duration>) -> Completion<()> {
        let c = Completion::default();
        let (me, done) = (self.clone(), c.clone());
        let deadline = Deadline::or_default(timeout);
        Runtime::get().spawn_on(self.key, move || done.complete(me.link.send(&v, deadline)));
        c
    }

    /// Receives on this connection's reactor; `out` tensors are moved in and handed back.
    pub fn recv_async(
        self: &Arc<Self>,
        out: Vec<Tensor>,
        timeout: Option<Duration>,
    ) -> Completion<(Value, Vec<Tensor>)> {
        self.recv_async_keyed(out, None, timeout)
    }

    /// [`Conn::recv_async`], matching tensors to `out` by path when `paths` are given.
    pub fn recv_async_keyed(
        self: &Arc<Self>,
        mut out: Vec<Tensor>,
        paths: Option<Vec<Vec<Key>>>,
        timeout: Option<Duration>,
    ) -> Completion<(Value, Vec<Tensor>)> {
        let c = Completion::default();
        let (me, done) = (self.clone(), c.clone());
        let deadline = Deadline::or_default(timeout);
        Runtime::get().spawn_on(self.key, move || {
            let r = me.recv_deadline(&mut out, paths.as_deref(), deadline, Instant::now());
            done.complete(r.map(|v| (v, out)))
        });
        c
    }
}

impl crate::link::scope::sealed::Sealed for Conn {}

/// A connection carries a scope's operations; it receives through its inbox (EP-5).
impl Carrier for Conn {
    fn send_value(&self, v: &Value, deadline: Deadline) -> Result<()> {
        self.link.send(v, deadline)
    }
    fn recv_value_into(&self, out: &mut [Tensor], deadline: Deadline) -> Result<Value> {
        self.recv_deadline(out, None, deadline, Instant::now())
    }
    fn close_now(&self) {
        self.close()
    }
}

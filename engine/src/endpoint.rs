//! Server and Client: the user-facing endpoints (the seed's Client-Server).
//!
//! A [`Server`] listens; an acceptor thread accepts connections and hands each handshake to a
//! reactor, so a slow or hostile client never blocks the others. Connections get increasing ids
//! in the order they complete their handshake. A [`Client`] connects with retry until its
//! deadline.
//!
//! Invariants:
//! - EP-1: `recv_any` is fair: it scans connections round-robin from a rotating start, so a busy
//!   client cannot starve the others.
//! - EP-2: a connection whose peer closed in order leaves the server silently; one whose peer
//!   died is reported once (a `PeerLost` error naming it from `recv_any`) and then removed.
//! - EP-3: `close()` from any thread wakes every blocked call on the endpoint, which fails with
//!   `Closed`.
//! - EP-4: asynchronous operations of one connection run on one reactor, in submission order.
//! - EP-5: no head-of-line blocking: `recv_any` reads a message inline only when all of it is
//!   already queued; a message still arriving is read by a short-lived thread of its own, under
//!   the connection's receive lock, within `PARALLEL_FRAME_TIMEOUT` (else the connection is
//!   dropped with a warning), and lands in the connection's inbox, which every receive on the
//!   connection empties first (so order is kept).
//! - EP-6: a departed client is retired within about 0.2 s whatever the application calls: the
//!   acceptor thread checks for peers that hung up and, when nothing but an orderly close is left
//!   to read, closes the connection and drops it from the server (its fds and rings are freed
//!   once the application holds no `Conn`). A death found this way is reported by the next
//!   `recv_any` (EP-2), from a bounded list.
//! - EP-7: handshakes never lock clients out: at most `MAX_HANDSHAKES` run at once, and a new
//!   connection beyond that evicts the oldest unfinished one (idle sockets age first), so a
//!   client that completes its hello promptly always gets in.

use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use crate::link::handshake;
use crate::link::{Carrier, Link, LinkKind, Stats, sys};
use crate::runtime::{self, Completion, Deadline, Interest, Runtime};
use crate::value::{Key, Tensor, Value};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

static CONN_KEYS: AtomicUsize = AtomicUsize::new(0);
/// The most handshakes in progress at once in this process (EP-7).
const MAX_HANDSHAKES: usize = 256;
/// Deaths found by the acceptor and not yet reported by `recv_any`, at most (EP-6).
const MAX_LOST: usize = 64;
/// How often the acceptor looks for departed clients (EP-6).
const REAP_EVERY: Duration = Duration::from_millis(200);

/// A handshake in progress: a second descriptor of its socket, to shut it down on eviction.
struct Pending {
    ticket: u64,
    since: Instant,
    addr: SocketAddr,
    sock: Option<OwnedFd>,
}

/// Handshakes in progress in this process, oldest first (EP-7).
static PENDING: Mutex<Vec<Pending>> = Mutex::new(Vec::new());
static TICKETS: AtomicU64 = AtomicU64::new(0);

/// One connection: a link plus the server-side id and tag (also used as the client's core).
#[derive(Debug)]
pub struct Conn {
    link: Link,
    id: AtomicI64,
    tag: Mutex<Option<String>>,
    key: usize,
    reported: AtomicBool,
    created: Instant,
    /// Messages (or the error that ended the link) read ahead for `recv_any` (EP-5).
    inbox: Mutex<VecDeque<Result<Value>>>,
    /// A read-ahead thread holds the receive lock (EP-5).
    reading: AtomicBool,
}

impl Conn {
    fn new(link: Link, id: i64) -> Conn {
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
    fn take_inbox(&self) -> Option<Result<Value>> {
        self.inbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop_front()
    }
    fn inbox_empty(&self) -> bool {
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
        g.recv_keyed(out, paths, deadline)
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
        self.link.send(v, Deadline::or_default(timeout))
    }
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Value> {
        self.recv_deadline(&mut [], None, Deadline::or_default(timeout))
    }
    /// Receives into the caller's tensors (in order), checking dtype and shape.
    pub fn recv_into(&self, out: &mut [Tensor], timeout: Option<Duration>) -> Result<Value> {
        self.recv_deadline(out, None, Deadline::or_default(timeout))
    }
    /// Like `recv_into`, matching tensors to `out` by path (`paths[i]` is `out[i]`'s), not by
    /// position ([`crate::link::Link::recv_keyed`]).
    pub fn recv_into_keyed(
        &self,
        out: &mut [Tensor],
        paths: &[Vec<Key>],
        timeout: Option<Duration>,
    ) -> Result<Value> {
        self.recv_deadline(out, Some(paths), Deadline::or_default(timeout))
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
            let r = me.recv_deadline(&mut out, paths.as_deref(), deadline);
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
        self.recv_deadline(out, None, deadline)
    }
    fn close_now(&self) {
        self.close()
    }
}

/// A client: one connection to a server.
#[derive(Debug, Clone)]
pub struct Client {
    conn: Arc<Conn>,
}

impl Client {
    /// Connects to `host:port`, retrying until `timeout` (default `PARALLEL_CONNECT_TIMEOUT`).
    pub fn connect(host: &str, port: u16, timeout: Option<Duration>) -> Result<Client> {
        runtime::backend()?;
        let link = handshake::connect(host, port, timeout.unwrap_or(config().connect_timeout))?;
        Ok(Client {
            conn: Arc::new(Conn::new(link, 0)),
        })
    }
    pub fn conn(&self) -> &Arc<Conn> {
        &self.conn
    }
    pub fn send(&self, v: &Value) -> Result<()> {
        self.conn.send(v, None)
    }
    pub fn send_timeout(&self, v: &Value, timeout: Option<Duration>) -> Result<()> {
        self.conn.send(v, timeout)
    }
    pub fn recv(&self, timeout: Option<Duration>) -> Result<Value> {
        self.conn.recv(timeout)
    }
    pub fn recv_into(&self, out: &mut [Tensor], timeout: Option<Duration>) -> Result<Value> {
        self.conn.recv_into(out, timeout)
    }
    pub fn link_kind(&self) -> LinkKind {
        self.conn.link_kind()
    }
    pub fn peer(&self) -> &str {
        self.conn.peer()
    }
    pub fn stats(&self) -> Stats {
        self.conn.stats()
    }
    pub fn close(&self) {
        self.conn.close()
    }
}

struct ServerInner {
    listener: OwnedFd,
    addr: SocketAddr,
    conns: Mutex<Vec<Arc<Conn>>>,
    changed: Condvar,
    next_id: AtomicI64,
    rr: AtomicUsize,
    closed: AtomicBool,
    wake: OwnedFd,
    departed: Mutex<Stats>,
    accepted: AtomicU64,
    refused: AtomicU64,
    /// Deaths found by the acceptor, for `recv_any` to report (EP-6).
    lost: Mutex<VecDeque<Error>>,
}

/// A listening server and its connections.
#[derive(Clone)]
pub struct Server {
    inner: Arc<ServerInner>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Server({}, {} connections)",
            self.inner.addr,
            self.connections().len()
        )
    }
}

/// Server-wide counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerStats {
    /// Sum over current and departed connections.
    pub traffic: Stats,
    pub connections: usize,
    pub accepted: u64,
    pub refused: u64,
}

impl Server {
    /// Listens on `host:port` (port 0: ephemeral) and starts accepting.
    pub fn bind(host: &str, port: u16) -> Result<Server> {
        runtime::backend()?;
        let (listener, addr) = handshake::listen(host, port)?;
        let inner = Arc::new(ServerInner {
            listener,
            addr,
            conns: Mutex::new(Vec::new()),
            changed: Condvar::new(),
            next_id: AtomicI64::new(1),
            rr: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            wake: sys::eventfd()?,
            departed: Mutex::new(Stats::default()),
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            lost: Mutex::new(VecDeque::new()),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name(format!("parallel-accept-{}", addr.port()))
            .spawn(move || accept_loop(weak))
            .map_err(|e| {
                Error::new(
                    ErrorKind::Resource,
                    "listen",
                    format!("cannot start the acceptor thread: {e}"),
                )
            })?;
        Ok(Server { inner })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }
    pub fn port(&self) -> u16 {
        self.inner.addr.port()
    }

    /// Current connections, ordered by id.
    pub fn connections(&self) -> Vec<Arc<Conn>> {
        let mut v = self
            .inner
            .conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        v.sort_by_key(|c| c.id());
        v
    }

    fn tagged(&self, tag: Option<&str>) -> Vec<Arc<Conn>> {
        self.connections()
            .into_iter()
            .filter(|c| tag.is_none() || c.tag().as_deref() == tag)
            .collect()
    }

    /// Waits until at least `n` clients are connected (before the deadline).
    pub fn wait_for(&self, n: usize, timeout: Option<Duration>) -> Result<()> {
        let deadline = Deadline::or_default(timeout);
        let mut g = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "clients",
                    "the server was closed",
                ));
            }
            if g.len() >= n {
                return Ok(());
            }
            let slice = deadline.slice(
                "clients",
                &format!("{n} clients to connect (have {})", g.len()),
            )?;
            g = self
                .inner
                .changed
                .wait_timeout(g, slice)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `n` clients, then calls `f` for each connection with `tag` (all when None), in
    /// id order. Returns how many calls were made.
    pub fn clients(
        &self,
        n: usize,
        tag: Option<&str>,
        timeout: Option<Duration>,
        mut f: impl FnMut(&Arc<Conn>) -> Result<()>,
    ) -> Result<usize> {
        self.wait_for(n, timeout)?;
        let conns = self.tagged(tag);
        for c in &conns {
            f(c)?;
        }
        Ok(conns.len())
    }

    /// Sends `v` to every connection with `tag` (all when None), in id order, and returns how
    /// many got it. A client that is gone (closed, dead, hung up, its link broken by the failed
    /// send) is skipped, never an error, and dropped from the server unless it left unread
    /// messages; any other failure (the value
    /// cannot be encoded, say) is an error naming each connection it failed on.
    pub fn broadcast(
        &self,
        v: &Value,
        tag: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<usize> {
        let deadline = Deadline::or_default(timeout);
        let conns = self.tagged(tag);
        let mut failed = Vec::new();
        let mut first: Option<Error> = None;
        let mut sent = 0usize;
        for c in &conns {
            if c.link.is_broken() {
                self.inner.retire(c, None);
                continue;
            }
            if c.link.peer_hung_up() {
                // Departed; it stays listed only while it has unread messages (EP-6).
                continue;
            }
            match c.link.send(v, deadline) {
                Ok(()) => sent += 1,
                Err(e) if c.link.is_broken() => {
                    tracing::warn!("broadcast: dropping {} (id {}): {e}", c.peer(), c.id());
                    self.inner.retire(c, None);
                }
                Err(e) => {
                    failed.push(format!("{} (id {})", c.peer(), c.id()));
                    first.get_or_insert(e);
                }
            }
        }
        match first {
            None => Ok(sent),
            Some(e) => Err(Error::new(
                e.kind(),
                "broadcast",
                format!(
                    "sending to {} of {} clients failed: {}; first error: {e}",
                    failed.len(),
                    conns.len(),
                    failed.join(", ")
                ),
            )),
        }
    }

    /// Starts a read-ahead of the message arriving on `c` (EP-5); false if no thread could be
    /// started (the caller then reads inline).
    fn read_ahead(&self, c: &Arc<Conn>) -> bool {
        if c.reading.swap(true, Ordering::SeqCst) {
            return true;
        }
        let (conn, weak) = (c.clone(), Arc::downgrade(&self.inner));
        let spawned = std::thread::Builder::new()
            .name("parallel-frame".into())
            .stack_size(512 << 10)
            .spawn(move || {
                runtime::block_signals();
                let limit = config().frame_timeout;
                let mut g = conn.link.lock_recv();
                // A direct receive may have taken the message meanwhile: read only a frame
                // that has begun to arrive, so the frame deadline runs from its first byte.
                if conn.link.ready() {
                    let r = g
                        .recv(&mut [], Deadline::after(limit))
                        .map_err(|e| stalled(&conn, e, limit));
                    conn.inbox
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push_back(r);
                }
                drop(g);
                conn.reading.store(false, Ordering::SeqCst);
                if let Some(inner) = weak.upgrade() {
                    sys::eventfd_signal(inner.wake.as_raw_fd());
                }
            });
        if let Err(e) = spawned {
            c.reading.store(false, Ordering::SeqCst);
            tracing::warn!("cannot start a read-ahead thread ({e}); reading inline");
            return false;
        }
        true
    }

    /// A receive on `c` failed: the connection goes; the error is returned when it is the first
    /// report of a failure other than an orderly close (EP-2).
    fn failed(&self, c: &Arc<Conn>, e: Error) -> Option<Error> {
        let report = e.kind() != ErrorKind::Closed && !c.reported.swap(true, Ordering::SeqCst);
        self.inner.retire(c, None);
        report.then(|| e.with_op("recv_any"))
    }

    /// Receives the next message from whichever connection (with `tag`) has one first (EP-1),
    /// returning the message and its connection. A message still arriving never delays the
    /// others (EP-5).
    pub fn recv_any(
        &self,
        tag: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(Value, Arc<Conn>)> {
        let deadline = Deadline::or_default(timeout);
        let mut spin: Option<runtime::Spin> = None;
        let mut fds: Vec<(RawFd, Interest)> = Vec::new();
        loop {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "recv_any",
                    "the server was closed",
                ));
            }
            let lost = self
                .inner
                .lost
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .pop_front();
            if let Some(e) = lost {
                return Err(e);
            }
            let conns = self.tagged(tag);
            let n = conns.len();
            let start = self.inner.rr.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let c = &conns[(start + i) % n];
                match c.take_inbox() {
                    Some(Ok(v)) => return Ok((v, c.clone())),
                    Some(Err(e)) => match self.failed(c, e) {
                        Some(e) => return Err(e),
                        None => continue,
                    },
                    None => {}
                }
                if c.reading.load(Ordering::SeqCst) || !c.link.ready() {
                    continue;
                }
                let Some(mut g) = c.link.try_lock_recv() else {
                    continue;
                };
                if !c.inbox_empty() {
                    continue; // a read-ahead just finished: the next pass takes it
                }
                if !c.link.frame_queued() {
                    drop(g);
                    if self.read_ahead(c) {
                        continue;
                    }
                    g = c.link.lock_recv();
                }
                let r = g.recv(&mut [], deadline);
                drop(g);
                match r {
                    Ok(v) => return Ok((v, c.clone())),
                    Err(e) => {
                        if let Some(e) = self.failed(c, e) {
                            return Err(e);
                        }
                    }
                }
            }
            if spin
                .get_or_insert_with(|| runtime::Spin::start(config().spin))
                .step()
            {
                continue;
            }
            fds.clear();
            fds.push((self.inner.wake.as_raw_fd(), Interest::Read));
            let idle: Vec<&Arc<Conn>> = conns
                .iter()
                .filter(|c| !c.reading.load(Ordering::SeqCst))
                .collect();
            for c in &idle {
                c.link.park_fds(&mut fds);
            }
            let any_ready =
                idle.iter().any(|c| c.link.ready()) || conns.iter().any(|c| !c.inbox_empty());
            let r = if any_ready {
                Ok(())
            } else {
                let what = if n == 0 {
                    "a client to connect and send".to_string()
                } else {
                    format!("a message from any of {n} clients")
                };
                deadline
                    .slice("recv_any", &what)
                    .and_then(|s| runtime::wait_once(&fds, s))
            };
            for c in &idle {
                c.link.unpark();
            }
            sys::eventfd_drain(self.inner.wake.as_raw_fd());
            r?;
        }
    }

    /// Traffic of all connections, current and departed.
    pub fn stats(&self) -> ServerStats {
        let conns = self.connections();
        let mut t = *self
            .inner
            .departed
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        for c in &conns {
            t.add(&c.stats());
        }
        ServerStats {
            traffic: t,
            connections: conns.len(),
            accepted: self.inner.accepted.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting, closes every connection and wakes every blocked call (EP-3). Idempotent.
    pub fn close(&self) {
        if self.inner.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        sys::shutdown(self.inner.listener.as_raw_fd());
        let conns =
            std::mem::take(&mut *self.inner.conns.lock().unwrap_or_else(|e| e.into_inner()));
        for c in &conns {
            c.close();
        }
        sys::eventfd_signal(self.inner.wake.as_raw_fd());
        self.inner.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::SeqCst)
    }
}

impl ServerInner {
    /// Drops `c` from the server and closes it; `lost`, when given, is queued for the next
    /// `recv_any` to report (EP-2, EP-6).
    fn retire(&self, c: &Arc<Conn>, lost: Option<Error>) {
        let mut g = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = g.iter().position(|x| Arc::ptr_eq(x, c)) {
            g.remove(i);
            self.departed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(&c.stats());
        }
        drop(g);
        c.close();
        if let Some(e) = lost {
            let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
            if l.len() >= MAX_LOST {
                l.pop_front();
            }
            l.push_back(e.with_op("recv_any"));
            drop(l);
            sys::eventfd_signal(self.wake.as_raw_fd());
        }
        self.changed.notify_all();
    }

    /// Retires every connection whose client departed and left nothing to read but an orderly
    /// close (EP-6). A connection with unread messages stays until they are read.
    fn reap(&self) {
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner()).clone();
        for c in &conns {
            if c.reading.load(Ordering::SeqCst) || !c.inbox_empty() {
                continue;
            }
            if c.link.is_broken() {
                self.retire(c, None);
                continue;
            }
            if !c.link.peer_hung_up() {
                continue;
            }
            let Some(mut g) = c.link.try_lock_recv() else {
                continue;
            };
            if !c.link.only_close_queued() {
                continue;
            }
            let r = g.recv(&mut [], Deadline::after(Duration::from_millis(50)));
            drop(g);
            let lost = match r {
                Err(e) if e.kind() != ErrorKind::Closed => {
                    (!c.reported.swap(true, Ordering::SeqCst)).then_some(e)
                }
                _ => None,
            };
            self.retire(c, lost);
        }
    }
}

/// The error a read-ahead reports for a frame that did not complete in time (EP-5).
fn stalled(conn: &Conn, e: Error, limit: Duration) -> Error {
    if e.kind() != ErrorKind::Timeout {
        return e;
    }
    tracing::warn!(
        "dropping {} (id {}): a message did not arrive completely within PARALLEL_FRAME_TIMEOUT={:.0}s",
        conn.peer(),
        conn.id(),
        limit.as_secs_f64()
    );
    Error::new(
        ErrorKind::Timeout,
        "recv_any",
        format!(
            "the client sent part of a message and stalled for {:.0}s: it was dropped (PARALLEL_FRAME_TIMEOUT)",
            limit.as_secs_f64()
        ),
    )
    .with_peer(conn.peer())
}

/// Registers a handshake about to start, evicting the oldest unfinished one when `MAX_HANDSHAKES`
/// are in progress (EP-7). Returns the ticket that `handshake_done` takes.
fn handshake_begin(sock: RawFd, addr: SocketAddr) -> (u64, Option<(SocketAddr, Duration)>) {
    let ticket = TICKETS.fetch_add(1, Ordering::Relaxed);
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let mut evicted = None;
    if p.len() >= MAX_HANDSHAKES {
        let old = p.remove(0);
        if let Some(s) = &old.sock {
            sys::shutdown(s.as_raw_fd());
        }
        evicted = Some((old.addr, old.since.elapsed()));
    }
    p.push(Pending {
        ticket,
        since: Instant::now(),
        addr,
        sock: sys::dup(sock),
    });
    (ticket, evicted)
}

fn handshake_done(ticket: u64) {
    let mut p = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = p.iter().position(|x| x.ticket == ticket) {
        p.remove(i);
    }
}

impl Drop for ServerInner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::SeqCst);
        sys::shutdown(self.listener.as_raw_fd());
        for c in self
            .conns
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            c.close();
        }
    }
}

fn accept_loop(weak: std::sync::Weak<ServerInner>) {
    runtime::block_signals();
    let mut last_reap = Instant::now();
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        if last_reap.elapsed() >= REAP_EVERY {
            inner.reap();
            last_reap = Instant::now();
        }
        let lfd = inner.listener.as_raw_fd();
        match handshake::try_accept(lfd) {
            Ok(Some((fd, addr))) => {
                // Each handshake gets its own short-lived thread (HS-1): a silent client then
                // costs one parked thread for PARALLEL_HANDSHAKE_TIMEOUT and delays nobody else.
                // The number in flight is bounded; beyond it the oldest is evicted (EP-7).
                let (ticket, evicted) = handshake_begin(fd.as_raw_fd(), addr);
                if let Some((old, age)) = evicted {
                    tracing::warn!(
                        "{MAX_HANDSHAKES} handshakes in progress: dropped the oldest (from {old}, {:.1}s old) to admit {addr}",
                        age.as_secs_f64()
                    );
                }
                let w = weak.clone();
                let spawned = std::thread::Builder::new()
                    .name("parallel-handshake".into())
                    .spawn(move || {
                        struct Done(u64);
                        impl Drop for Done {
                            fn drop(&mut self) {
                                handshake_done(self.0);
                            }
                        }
                        let _done = Done(ticket);
                        runtime::block_signals();
                        let id_hint = 0;
                        match handshake::accept(fd, addr, id_hint) {
                            Ok(acc) => {
                                let Some(inner) = w.upgrade() else { return };
                                if inner.closed.load(Ordering::SeqCst) {
                                    acc.link.close();
                                    return;
                                }
                                let mut g = inner.conns.lock().unwrap_or_else(|e| e.into_inner());
                                let id = inner.next_id.fetch_add(1, Ordering::SeqCst);
                                g.push(Arc::new(Conn::new(acc.link, id)));
                                inner.accepted.fetch_add(1, Ordering::Relaxed);
                                drop(g);
                                inner.changed.notify_all();
                                sys::eventfd_signal(inner.wake.as_raw_fd());
                            }
                            Err(e) => {
                                if let Some(inner) = w.upgrade() {
                                    inner.refused.fetch_add(1, Ordering::Relaxed);
                                }
                                tracing::warn!("connection from {addr} refused: {e}");
                            }
                        }
                    });
                if let Err(e) = spawned {
                    handshake_done(ticket);
                    tracing::error!("cannot start a handshake thread: {e}");
                }
            }
            Ok(None) => {
                drop(inner);
                // Sliced wait so a dropped server ends this thread promptly.
                let _ = runtime::wait_once(&[(lfd, Interest::Read)], Duration::from_millis(200));
            }
            Err(e) => {
                tracing::error!("accept failed: {e}; retrying");
                drop(inner);
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

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

use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{self, Completion, Deadline, Interest, Runtime};
use crate::transport::handshake;
use crate::transport::{Link, LinkKind, Stats, sys};
use crate::value::{Key, Tensor, Value};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

static CONN_KEYS: AtomicUsize = AtomicUsize::new(0);
/// Handshakes in progress in this process, and the most allowed at once.
static HANDSHAKES: AtomicUsize = AtomicUsize::new(0);
const MAX_HANDSHAKES: usize = 256;

/// One connection: a link plus the server-side id and tag (also used as the client's core).
#[derive(Debug)]
pub struct Conn {
    link: Link,
    id: AtomicI64,
    tag: Mutex<Option<String>>,
    key: usize,
    reported: AtomicBool,
    created: Instant,
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
        }
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
        self.link.recv(&mut [], Deadline::or_default(timeout))
    }
    /// Receives into the caller's tensors (in order), checking dtype and shape.
    pub fn recv_into(&self, out: &mut [Tensor], timeout: Option<Duration>) -> Result<Value> {
        self.link.recv(out, Deadline::or_default(timeout))
    }
    /// Like `recv_into`, matching tensors to `out` by path (`paths[i]` is `out[i]`'s), not by
    /// position ([`crate::transport::Link::recv_keyed`]).
    pub fn recv_into_keyed(
        &self,
        out: &mut [Tensor],
        paths: &[Vec<Key>],
        timeout: Option<Duration>,
    ) -> Result<Value> {
        self.link
            .recv_keyed(out, paths, Deadline::or_default(timeout))
    }
    pub fn close(&self) {
        self.link.close()
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
            let r = match &paths {
                Some(p) => me.link.recv_keyed(&mut out, p, deadline),
                None => me.link.recv(&mut out, deadline),
            };
            done.complete(r.map(|v| (v, out)))
        });
        c
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

    /// Sends `v` to every connection with `tag` (all when None), in id order. Every connection is
    /// tried; the error names each one that failed.
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
        for c in &conns {
            if let Err(e) = c.link.send(v, deadline) {
                failed.push(format!("{} (id {})", c.peer(), c.id()));
                first.get_or_insert(e);
            }
        }
        match first {
            None => Ok(conns.len()),
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

    fn remove(&self, c: &Arc<Conn>) {
        let mut g = self.inner.conns.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = g.iter().position(|x| Arc::ptr_eq(x, c)) {
            g.remove(i);
            self.inner
                .departed
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .add(&c.stats());
        }
        self.inner.changed.notify_all();
    }

    /// Receives the next message from whichever connection (with `tag`) has one first (EP-1),
    /// returning the message and its connection.
    pub fn recv_any(
        &self,
        tag: Option<&str>,
        timeout: Option<Duration>,
    ) -> Result<(Value, Arc<Conn>)> {
        let deadline = Deadline::or_default(timeout);
        let spin_until = Instant::now() + config().spin;
        let mut spins = 0u32;
        let mut fds: Vec<(RawFd, Interest)> = Vec::new();
        loop {
            if self.inner.closed.load(Ordering::SeqCst) {
                return Err(Error::new(
                    ErrorKind::Closed,
                    "recv_any",
                    "the server was closed",
                ));
            }
            let conns = self.tagged(tag);
            let n = conns.len();
            let start = self.inner.rr.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let c = &conns[(start + i) % n];
                if !c.link.ready() {
                    continue;
                }
                let Some(mut g) = c.link.try_lock_recv() else {
                    continue;
                };
                match g.recv(&mut [], deadline) {
                    Ok(v) => return Ok((v, c.clone())),
                    Err(e) if e.kind() == ErrorKind::Closed => {
                        drop(g);
                        self.remove(c);
                    }
                    Err(e) if e.kind() == ErrorKind::Timeout => return Err(e.with_op("recv_any")),
                    Err(e) => {
                        drop(g);
                        self.remove(c);
                        if !c.reported.swap(true, Ordering::SeqCst) {
                            return Err(e.with_op("recv_any"));
                        }
                    }
                }
            }
            if Instant::now() < spin_until {
                crate::runtime::relax(&mut spins);
                continue;
            }
            fds.clear();
            fds.push((self.inner.wake.as_raw_fd(), Interest::Read));
            for c in &conns {
                c.link.park_fds(&mut fds);
            }
            let any_ready = conns.iter().any(|c| c.link.ready());
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
            for c in &conns {
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
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.closed.load(Ordering::SeqCst) {
            return;
        }
        let lfd = inner.listener.as_raw_fd();
        match handshake::try_accept(lfd) {
            Ok(Some((fd, addr))) => {
                // Each handshake gets its own short-lived thread (HS-1): a silent client then
                // costs one parked thread for PARALLEL_HANDSHAKE_TIMEOUT and delays nobody else.
                // The number in flight is bounded; beyond it new connections are dropped at once.
                if HANDSHAKES.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                    HANDSHAKES.fetch_sub(1, Ordering::SeqCst);
                    inner.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "dropping {addr}: {MAX_HANDSHAKES} handshakes already in progress"
                    );
                    continue;
                }
                let w = weak.clone();
                let spawned = std::thread::Builder::new()
                    .name("parallel-handshake".into())
                    .spawn(move || {
                        struct Done;
                        impl Drop for Done {
                            fn drop(&mut self) {
                                HANDSHAKES.fetch_sub(1, Ordering::SeqCst);
                            }
                        }
                        let _done = Done;
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
                    HANDSHAKES.fetch_sub(1, Ordering::SeqCst);
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

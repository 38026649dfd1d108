//! A listening server and its connections: fair `recv_any` with read-ahead (EP-1, EP-5),
//! broadcast, close from any thread (EP-3), and retiring departed clients (EP-2, EP-6).

use super::Conn;
use super::accept::accept_loop;
use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use crate::link::handshake;
use crate::link::{Stats, sys};
use crate::runtime::{self, Deadline, Interest};
use crate::value::Value;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Deaths found by the acceptor and not yet reported by `recv_any`, at most (EP-6).
const MAX_LOST: usize = 64;

pub(super) struct ServerInner {
    pub(super) listener: OwnedFd,
    addr: SocketAddr,
    pub(super) conns: Mutex<Vec<Arc<Conn>>>,
    pub(super) changed: Condvar,
    pub(super) next_id: AtomicI64,
    rr: AtomicUsize,
    pub(super) closed: AtomicBool,
    pub(super) wake: OwnedFd,
    departed: Mutex<Stats>,
    pub(super) accepted: AtomicU64,
    pub(super) refused: AtomicU64,
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
    pub(super) fn reap(&self) {
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

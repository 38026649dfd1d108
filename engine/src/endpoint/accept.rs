//! The acceptor thread: accepts connections, hands each handshake to a short-lived thread of
//! its own (HS-1) with at most `MAX_HANDSHAKES` in flight (EP-7), and retires departed clients
//! every `REAP_EVERY` (EP-6).

use super::Conn;
use super::server::ServerInner;
use crate::link::{handshake, sys};
use crate::runtime::{self, Interest};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The most handshakes in progress at once in this process (EP-7).
const MAX_HANDSHAKES: usize = 256;

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

pub(super) fn accept_loop(weak: std::sync::Weak<ServerInner>) {
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

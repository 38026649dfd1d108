//! Links: a connected pair of endpoints that carry frames, over TCP or a shared-memory ring.
//!
//! Every link kind has the same shape: a probe (can it run here?), a way to be set up (the
//! handshake in [`handshake`]), and a [`Link`] that sends and receives whole messages with a
//! deadline. The endpoints above (Server, Client) never see a socket.
//!
//! Invariants:
//! - LINK-1: a failure at a message boundary (timeout before the first byte, mismatch of a
//!   caller's `out` tensors) leaves the link usable; the payload of a refused message is drained.
//! - LINK-2: a failure inside a frame (a timeout or interrupt half way, malformed bytes, the
//!   stream ending anywhere after the first byte, even between two segments) poisons the link
//!   and shuts it down, so the peer gets a prompt error instead of a desynchronized stream, and
//!   no partial message is ever returned as whole. A send that fails part way returns only when
//!   the peer can no longer read its buffers (SHM-7). engine/tests/link_conformance.rs checks
//!   LINK-1..3 for every link kind.
//! - LINK-3: a peer that disappears turns every pending and later call into `PeerLost` naming the
//!   peer; an orderly close (a Close frame) into `Closed`.
//! - LINK-4: closing from another thread wakes blocked calls (the socket is shut down), which then
//!   fail with `Closed` ("closed locally").

//!
//! Layout: this file holds the [`Link`] handle (state, byte streams, readiness, close); the
//! frames it carries are written in `send.rs` and read in `recv.rs`; `outs.rs` matches received
//! tensors to a caller's `out`; each kind lives in its own module: [`tcp`] (sockets), `shm`
//! (sealed memfd rings, cross-memory attach), `cuda_ipc` (CUDA IPC and staging through pinned
//! host memory); [`kinds`] is the registry the plan asks; [`handshake`] sets links up;
//! [`scope`] runs asynchronous operations on borrowed memory that cannot outlive the borrow.

mod ahead;
pub mod cuda_ipc;
pub mod handshake;
pub mod kinds;
mod outs;
mod recv;
pub mod scope;
mod send;
pub mod shm;
/// System calls shared with parallel-workers (memfd, eventfd, Unix sockets passing fds).
pub mod sys;
pub mod tcp;

pub use kinds::{Cost, End, Kind, Policy, choose, kinds};
pub use outs::into_outs;
pub(crate) use recv::check_grain;
pub(crate) use recv::feed;
pub use recv::{PIECE, Sink};
pub use scope::{Carrier, Op, Scope, scope};
pub use send::Carry;
/// Randomness from the OS generator only (nonces, names): an error where there is none.
pub use sys::{random_bytes, random_hex};

use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{self, Deadline, Interest};
use crate::value::{Key, Tensor, Value};
use crate::wire::{FLAG_CMA, FLAG_CUDA_IPC, FrameKind, HEADER_LEN, Header, Limits};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// The kind of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Tcp,
    Shm,
    /// CUDA tensors by CUDA IPC over a shared-memory link (a [`Link`] of this kind reports
    /// [`LinkKind::Shm`] with [`Link::cuda_ipc`] true: the ring carries everything else).
    CudaIpc,
}

impl LinkKind {
    pub fn name(self) -> &'static str {
        match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Shm => "shm",
            LinkKind::CudaIpc => "cuda_ipc",
        }
    }

    /// How a plan shows a link of this kind (`print(tree)`).
    pub fn label(self) -> &'static str {
        match self {
            LinkKind::CudaIpc => "shm + cuda-ipc",
            k => k.name(),
        }
    }
}

/// Traffic counters of a link (the original's netStats).
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_sent: AtomicU64,
    pub bytes_recv: AtomicU64,
    pub msgs_sent: AtomicU64,
    pub msgs_recv: AtomicU64,
    pub send_ns: AtomicU64,
    pub recv_ns: AtomicU64,
}

/// A snapshot of a link's or server's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stats {
    pub bytes_sent: u64,
    pub bytes_recv: u64,
    pub msgs_sent: u64,
    pub msgs_recv: u64,
    /// Seconds spent inside send calls / receive calls.
    pub send_secs: f64,
    pub recv_secs: f64,
}

impl Stats {
    /// Bytes per second while sending (0 when nothing was sent).
    pub fn send_bandwidth(&self) -> f64 {
        if self.send_secs > 0.0 {
            self.bytes_sent as f64 / self.send_secs
        } else {
            0.0
        }
    }
    pub fn recv_bandwidth(&self) -> f64 {
        if self.recv_secs > 0.0 {
            self.bytes_recv as f64 / self.recv_secs
        } else {
            0.0
        }
    }
    pub fn add(&mut self, o: &Stats) {
        self.bytes_sent += o.bytes_sent;
        self.bytes_recv += o.bytes_recv;
        self.msgs_sent += o.msgs_sent;
        self.msgs_recv += o.msgs_recv;
        self.send_secs += o.send_secs;
        self.recv_secs += o.recv_secs;
    }
}

impl Counters {
    pub fn snapshot(&self) -> Stats {
        Stats {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_recv: self.bytes_recv.load(Ordering::Relaxed),
            msgs_sent: self.msgs_sent.load(Ordering::Relaxed),
            msgs_recv: self.msgs_recv.load(Ordering::Relaxed),
            send_secs: self.send_ns.load(Ordering::Relaxed) as f64 * 1e-9,
            recv_secs: self.recv_ns.load(Ordering::Relaxed) as f64 * 1e-9,
        }
    }
}

struct SendState {
    seq: u64,
    poisoned: Option<String>,
}

struct RecvState {
    poisoned: Option<String>,
    scratch: Vec<u8>,
    /// The descriptor buffer, kept for the next message (recv.rs).
    desc: rkyv::util::AlignedVec<16>,
    /// Descriptors this link received and checked lately (recv.rs, RECV-1).
    known: Vec<recv::Known>,
    /// The entry of `known` the next new descriptor replaces.
    known_next: usize,
}

/// A connected link to one peer.
pub struct Link {
    kind: LinkKind,
    sock: OwnedFd,
    shm: Option<shm::ShmEnd>,
    peer: String,
    /// What the owner calls the peer ("rank 3"), named in every error of this link with its
    /// address (`name_peer`); unset, errors name the address alone.
    peer_name: std::sync::OnceLock<String>,
    send: Mutex<SendState>,
    recv: Mutex<RecvState>,
    /// TCP bytes read ahead of the frame being received (ahead.rs: AHEAD-1..4).
    ahead: Mutex<ahead::Ahead>,
    closed_locally: AtomicBool,
    peer_closed: AtomicBool,
    /// A receive found the peer gone (LINK-3): later sends fail instead of writing into the void.
    peer_lost: AtomicBool,
    pub(crate) counters: Counters,
    limits: Limits,
    spin: Duration,
    /// CUDA tensors go by CUDA IPC on this link (handshake HS-3).
    cuda_ipc: bool,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Link({} to {})", self.kind.name(), self.peer)
    }
}

/// A receive in progress holds the link's receive lock.
#[allow(missing_debug_implementations)] // a lock guard; its link's Debug says all there is
pub struct RecvGuard<'a> {
    link: &'a Link,
    state: MutexGuard<'a, RecvState>,
    /// The frame kind this receive takes: a user message, or a collective's control message
    /// (`Link::recv_control`); the other is a protocol error, never delivered.
    expect: FrameKind,
}

/// TCP frames up to this size are copied into one piece before they are sent.
const COALESCE: usize = 1024;

/// Releasing the receive lock gives the room read from a shared ring back to its writer
/// (`ShmEnd::publish_reads`): every receive ends with its reads published, whatever
/// way it ends.
impl Drop for RecvGuard<'_> {
    fn drop(&mut self) {
        if let Some(s) = &self.link.shm {
            s.publish_reads();
        }
    }
}

impl Link {
    pub(crate) fn new(
        sock: OwnedFd,
        shm: Option<shm::ShmEnd>,
        peer: String,
        cuda_ipc: bool,
    ) -> Link {
        Link {
            kind: if shm.is_some() {
                LinkKind::Shm
            } else {
                LinkKind::Tcp
            },
            sock,
            shm,
            peer,
            peer_name: std::sync::OnceLock::new(),
            send: Mutex::new(SendState {
                seq: 0,
                poisoned: None,
            }),
            recv: Mutex::new(RecvState {
                poisoned: None,
                scratch: Vec::new(),
                desc: rkyv::util::AlignedVec::new(),
                known: Vec::new(),
                known_next: 0,
            }),
            ahead: Mutex::new(ahead::Ahead::default()),
            closed_locally: AtomicBool::new(false),
            peer_closed: AtomicBool::new(false),
            peer_lost: AtomicBool::new(false),
            counters: Counters::default(),
            limits: Limits::from_config(),
            spin: config().spin,
            cuda_ipc,
        }
    }

    /// Whether CUDA tensors travel by CUDA IPC on this link (else staged through host memory).
    pub fn cuda_ipc(&self) -> bool {
        self.cuda_ipc
    }

    pub fn kind(&self) -> LinkKind {
        self.kind
    }
    /// Our end's address of the underlying TCP connection (the interface that routes to the peer).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        sys::local_addr(self.sock.as_raw_fd())
    }

    /// The peer, as "address (pid N)".
    pub fn peer(&self) -> &str {
        &self.peer
    }
    pub fn stats(&self) -> Stats {
        self.counters.snapshot()
    }
    pub fn is_closed(&self) -> bool {
        self.closed_locally.load(Ordering::SeqCst) || self.peer_closed.load(Ordering::SeqCst)
    }

    /// Names the peer for this link's errors ("rank 3"): they read "(peer rank 3 at
    /// 10.0.0.2:4567 (pid 812))", so a failure says which member was lost, not only where it
    /// ran. The first name given stays.
    pub fn name_peer(&self, name: String) {
        let _ = self.peer_name.set(name);
    }

    /// The peer as errors name it: its name, if given, and its address.
    fn peer_label(&self) -> String {
        match self.peer_name.get() {
            Some(n) => format!("{n} at {}", self.peer),
            None => self.peer.clone(),
        }
    }

    fn err(&self, e: Error) -> Error {
        if self.closed_locally.load(Ordering::SeqCst)
            && matches!(
                e.kind(),
                ErrorKind::PeerLost | ErrorKind::Resource | ErrorKind::Closed | ErrorKind::Protocol
            )
        {
            return Error::new(
                ErrorKind::Closed,
                e.op(),
                "the connection was closed locally",
            )
            .with_peer(self.peer_label());
        }
        e.with_peer(self.peer_label())
    }

    // ---- byte streams -------------------------------------------------------------------------

    fn write_bytes(&self, bufs: &[&[u8]], deadline: Deadline, what: &str) -> Result<()> {
        match &self.shm {
            Some(s) => s.write_all(bufs, deadline, what),
            None => {
                // A small frame leaves as one piece: the kernel's TCP send costs more per
                // piece than copying a few hundred bytes (8-byte messages, plain sockets:
                // 0.3-0.5 us less per round trip with one piece than with three).
                let total: usize = bufs.iter().map(|b| b.len()).sum();
                if bufs.len() > 1 && total <= COALESCE {
                    let mut one = [0u8; COALESCE];
                    let mut at = 0;
                    for b in bufs {
                        one[at..at + b.len()].copy_from_slice(b);
                        at += b.len();
                    }
                    return runtime::send_all(self.sock.as_raw_fd(), &[&one[..at]], deadline, what);
                }
                runtime::send_all(self.sock.as_raw_fd(), bufs, deadline, what)
            }
        }
    }

    /// Reads exactly buf.len() bytes; Ok(false) at EOF before the first byte.
    fn read_bytes(
        &self,
        buf: &mut [u8],
        deadline: Deadline,
        what: &str,
        spin: Duration,
    ) -> Result<bool> {
        match &self.shm {
            Some(s) => s.read_exact(buf, deadline, what).map(|_| true),
            None => self.read_tcp(buf, deadline, what, spin),
        }
    }

    /// Reads exactly buf.len() bytes inside a frame: the end of the stream here, even between
    /// two segments, is `PeerLost` (LINK-2), never a short or zero-filled segment.
    fn read_in_frame(&self, buf: &mut [u8], deadline: Deadline, what: &str) -> Result<()> {
        if self.read_bytes(buf, deadline, what, Duration::ZERO)? || buf.is_empty() {
            return Ok(());
        }
        Err(Error::new(
            ErrorKind::PeerLost,
            "recv",
            format!("the connection ended inside a message (while reading {what})"),
        ))
    }

    // ---- receive ------------------------------------------------------------------------------

    /// Takes the receive lock (blocking).
    pub fn lock_recv(&self) -> RecvGuard<'_> {
        RecvGuard {
            link: self,
            state: self.recv.lock().unwrap_or_else(|e| e.into_inner()),
            expect: FrameKind::Message,
        }
    }

    /// Takes the receive lock if no other receive is in progress.
    pub fn try_lock_recv(&self) -> Option<RecvGuard<'_>> {
        self.recv.try_lock().ok().map(|state| RecvGuard {
            link: self,
            state,
            expect: FrameKind::Message,
        })
    }

    /// Receives one message; tensors go into `out` (in order) when given (LINK-1 on mismatch).
    pub fn recv(&self, out: &mut [Tensor], deadline: Deadline) -> Result<Value> {
        self.lock_recv().recv(out, deadline)
    }

    /// Receives the next frame as a collective's control message (sent by
    /// [`Link::send_control`]); a user message in its place is a protocol error.
    pub fn recv_control(&self, deadline: Deadline) -> Result<Value> {
        let mut g = self.lock_recv();
        g.expect = FrameKind::Control;
        g.recv(&mut [], deadline)
    }

    /// Receives one message; each tensor goes into the `out` tensor whose path (`paths[i]` for
    /// `out[i]`: list/tuple indices and dict keys from the root) is the tensor's path in the
    /// message, whatever order either side's dicts list their keys in (LINK-1 on mismatch).
    pub fn recv_keyed(
        &self,
        out: &mut [Tensor],
        paths: &[Vec<Key>],
        deadline: Deadline,
    ) -> Result<Value> {
        self.lock_recv().recv_keyed(out, Some(paths), deadline)
    }

    /// True when a receive would find bytes (or the end of the stream) without waiting.
    pub fn ready(&self) -> bool {
        match &self.shm {
            Some(s) => s.has_data() || sys::readable_now(self.sock.as_raw_fd()),
            None => self.ahead_has_news() || sys::readable_now(self.sock.as_raw_fd()),
        }
    }

    /// The bytes queued for reading, how many of the next header's bytes are among them, and
    /// the header when it decodes; consumes nothing. `None`: the stream ended or broke (a
    /// receive fails at once).
    fn peek_header(&self) -> Option<(usize, usize, Option<Header>)> {
        let mut hb = [0u8; HEADER_LEN];
        let (queued, n) = match &self.shm {
            Some(s) => s.peek(&mut hb)?,
            None => self.peek_tcp(&mut hb)?,
        };
        let h = (n == HEADER_LEN)
            .then(|| Header::decode(&hb, &self.limits).ok())
            .flatten();
        Some((queued, n, h))
    }

    /// [`sys::peek`] through the read-ahead buffer (AHEAD-2): its bytes come first.
    fn peek_tcp(&self, hb: &mut [u8; HEADER_LEN]) -> Option<(usize, usize)> {
        let fd = self.sock.as_raw_fd();
        let (k, buffered, err) = self.ahead_peek(hb);
        if err {
            return None; // the next receive fails at once (AHEAD-4)
        }
        if k == HEADER_LEN {
            return Some((buffered + sys::queued(fd).unwrap_or(0), k));
        }
        let (queued, n) = sys::peek(fd, &mut hb[k..])?;
        Some((buffered + queued, k + n))
    }

    /// True when a receive would complete without waiting for the peer: the whole next frame
    /// is queued, or the stream ended or holds bytes that are no frame (the receive fails at
    /// once). Call with the receive lock held; consumes nothing. A frame whose payload travels
    /// by cross-memory attach or CUDA IPC is never "queued".
    pub fn frame_queued(&self) -> bool {
        match self.peek_header() {
            None => true,
            // Woken by the liveness socket, not the ring: the peer is gone.
            Some((0, _, _)) => self.shm.is_some(),
            Some((queued, _, Some(h))) => {
                h.flags & (FLAG_CMA | FLAG_CUDA_IPC) == 0
                    && queued as u64 >= HEADER_LEN as u64 + h.desc_len as u64 + h.payload_len
            }
            // A whole header that does not decode is refused at once; a partial one may stall.
            Some((_, n, None)) => n == HEADER_LEN,
        }
    }

    /// After the peer hung up: true when nothing but an orderly close (or nothing) remains to be
    /// read, so the link can be retired without losing a message. Call with the receive lock held.
    pub fn only_close_queued(&self) -> bool {
        match self.peek_header() {
            None | Some((0, _, _)) => true,
            Some((_, _, Some(h))) => h.kind == FrameKind::Close,
            // Part of a header (it can never complete), or bytes that are no frame.
            Some((_, _, None)) => true,
        }
    }

    /// True when the peer hung up (its side of the socket is shut down or the process died).
    pub fn peer_hung_up(&self) -> bool {
        sys::hung_up(self.sock.as_raw_fd())
    }

    /// True when the link can carry nothing more: closed, peer lost, or poisoned (LINK-2).
    pub fn is_broken(&self) -> bool {
        self.is_closed()
            || self.peer_lost.load(Ordering::SeqCst)
            || self.send.try_lock().is_ok_and(|st| st.poisoned.is_some())
            || self.recv.try_lock().is_ok_and(|st| st.poisoned.is_some())
    }

    /// Waits (spin, then park) until [`Link::ready`] or the deadline; consumes nothing.
    pub fn wait_ready(&self, deadline: Deadline) -> Result<()> {
        // Spins only while a core is free (runtime::spin), then parks. A shared-memory spin
        // watches the ring alone (no system call per step); the liveness socket is checked
        // before parking, so a dead peer is found at most one spin later.
        let spun = match &self.shm {
            Some(s) => crate::runtime::spin_until(self.spin, || s.has_data()),
            None => crate::runtime::spin_until(self.spin, || self.ready()),
        };
        // Held until the park ends (SPIN-3 learns from its length).
        let held = match spun {
            crate::runtime::Spun::Ready => return Ok(()),
            crate::runtime::Spun::Sleep(s) => s,
        };
        if let Some(s) = &self.shm
            && held.unpaid()
        {
            // SPREAD-2: the writer may be waiting for this very CPU.
            crate::runtime::spread::after_unpaid_spin([s.writer_cpu()]);
        }
        let mut fds = Vec::with_capacity(2);
        loop {
            fds.clear();
            self.park_fds(&mut fds);
            if self.ready() {
                self.unpark();
                return Ok(());
            }
            let r = deadline
                .slice("recv", "a message")
                .and_then(|s| runtime::wait_once(&fds, s));
            self.unpark();
            r?;
        }
    }

    /// The descriptors to park on while waiting for this link to become ready; call
    /// [`Link::unpark`] after the wait.
    pub fn park_fds(&self, out: &mut Vec<(RawFd, Interest)>) {
        match &self.shm {
            Some(s) => out.extend_from_slice(&s.park_fds()),
            None => out.push((self.sock.as_raw_fd(), Interest::Read)),
        }
    }

    pub fn unpark(&self) {
        if let Some(s) = &self.shm {
            s.unpark();
        }
    }

    // ---- close --------------------------------------------------------------------------------

    fn shutdown(&self) {
        sys::shutdown(self.sock.as_raw_fd());
    }

    /// Orderly close: tells the peer (best effort, briefly), then shuts the link down, waking any
    /// blocked call (LINK-4). Idempotent.
    pub fn close(&self) {
        // Marked first: a peer that answers the close notice by shutting its end must not make
        // a call blocked here report `PeerLost` for a close this side made.
        if self.closed_locally.swap(true, Ordering::SeqCst) {
            return;
        }
        if !self.peer_closed.load(Ordering::SeqCst)
            && let Ok(mut st) = self.send.try_lock()
            && st.poisoned.is_none()
        {
            st.seq += 1;
            let h = Header {
                kind: FrameKind::Close,
                flags: 0,
                desc_len: 0,
                nseg: 0,
                payload_len: 0,
                seq: st.seq,
            };
            // A Close frame is just a header; its descriptor is absent (desc_len 0).
            let _ = self.write_bytes(
                &[&h.encode()],
                Deadline::after(Duration::from_millis(200)),
                "the close notice",
            );
            st.poisoned = Some("it was closed".into());
        }
        if let Some(s) = &self.shm {
            s.mark_closed();
        }
        self.shutdown();
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.close();
    }
}

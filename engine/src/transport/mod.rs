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

pub mod handshake;
pub(crate) mod shm;
/// System calls shared with parallel-workers (memfd, eventfd, Unix sockets passing fds).
pub mod sys;
/// Randomness from the OS generator only (nonces, names): an error where there is none.
pub use sys::{random_bytes, random_hex};

use crate::buffer::Buf;
use crate::config::config;
use crate::cuda;
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::{self, Deadline, Interest};
use crate::value::{Device, Key, Tensor, Value};
use crate::wire::{
    self, FLAG_CMA, FLAG_CUDA_IPC, Filled, FrameKind, HEADER_LEN, Header, Limits, SegKind,
};
use rkyv::util::AlignedVec;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// A descriptor is received in pieces that start at this size and double, so the memory it
/// commits follows the bytes that arrived (BUF-4).
const DESC_CHUNK: usize = 16 << 10;

/// One piece of an outgoing frame.
enum Part<'a> {
    Host(&'a [u8]),
    /// (address, length, device) of a CUDA tensor to stage.
    Device(u64, usize, i32),
}

/// The kind of a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Tcp,
    Shm,
}

impl LinkKind {
    pub fn name(self) -> &'static str {
        match self {
            LinkKind::Tcp => "tcp",
            LinkKind::Shm => "shm",
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
}

/// A connected link to one peer.
pub struct Link {
    kind: LinkKind,
    sock: OwnedFd,
    shm: Option<shm::ShmEnd>,
    peer: String,
    send: Mutex<SendState>,
    recv: Mutex<RecvState>,
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
            send: Mutex::new(SendState {
                seq: 0,
                poisoned: None,
            }),
            recv: Mutex::new(RecvState {
                poisoned: None,
                scratch: Vec::new(),
            }),
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
            .with_peer(&self.peer);
        }
        e.with_peer(&self.peer)
    }

    // ---- byte streams -------------------------------------------------------------------------

    fn write_bytes(&self, bufs: &[&[u8]], deadline: Deadline, what: &str) -> Result<()> {
        match &self.shm {
            Some(s) => s.write_all(bufs, deadline, what),
            None => runtime::send_all(self.sock.as_raw_fd(), bufs, deadline, what),
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
            None => runtime::recv_exact(self.sock.as_raw_fd(), buf, deadline, spin, what),
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

    // ---- send ---------------------------------------------------------------------------------

    /// Sends a user message.
    /// Writes host parts in as few calls as possible and streams device parts through pinned
    /// staging buffers.
    fn write_parts(&self, parts: &[Part<'_>], deadline: Deadline) -> Result<()> {
        let mut pending: Vec<&[u8]> = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Part::Host(b) => pending.push(b),
                Part::Device(ptr, len, dev) => {
                    if !pending.is_empty() {
                        self.write_bytes(&pending, deadline, "a message")?;
                        pending.clear();
                    }
                    self.send_device(*ptr, *len, *dev, deadline)?;
                }
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            self.write_bytes(&pending, deadline, "a message")
        }
    }

    /// Staged send of device memory (CUDA-4): the device-to-host copy of chunk k+1.. overlaps
    /// the send of chunk k; `PARALLEL_CUDA_STAGING` pinned buffers of `PARALLEL_CUDA_CHUNK` bytes.
    fn send_device(&self, ptr: u64, len: usize, dev: i32, deadline: Deadline) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cuda::Stage {
            g,
            chunk,
            nchunks,
            bufs,
        } = cuda::Stage::plan("send", len, true)?;
        let nb = bufs.len();
        let mut events: std::collections::VecDeque<cuda::Event> = Default::default();
        let n_of = |k: usize| chunk.min(len - k * chunk);
        let issue = |k: usize, events: &mut std::collections::VecDeque<cuda::Event>| {
            // SAFETY: the chunk lies inside the sender's tensor (kept alive by the caller until
            // send returns) and inside staging buffer k % nb (ours; the buffer's previous chunk
            // was written out before it is reused).
            unsafe {
                g.copy(
                    dev,
                    cuda::Mem::Host(bufs[k % nb].0),
                    cuda::Mem::Dev(ptr + (k * chunk) as u64),
                    n_of(k),
                )?
            };
            events.push_back(g.record(dev, false)?);
            Ok::<(), Error>(())
        };
        let r = (|| {
            for k in 0..nb {
                issue(k, &mut events)?;
            }
            for k in 0..nchunks {
                let ev = events.pop_front().expect("one event per issued chunk");
                g.wait_event(ev, deadline)?;
                // SAFETY: the copy into this buffer completed (its event); n_of(k) <= chunk.
                let b = unsafe { std::slice::from_raw_parts(bufs[k % nb].0, n_of(k)) };
                self.write_bytes(&[b], deadline, "a CUDA tensor")?;
                if k + nb < nchunks {
                    issue(k + nb, &mut events)?;
                }
            }
            Ok(())
        })();
        if r.is_err() {
            // Copies still in flight must not land in buffers a later transfer reuses.
            for ev in events.drain(..) {
                g.release_event(ev);
            }
            g.drain(dev);
        }
        r
    }

    pub fn send(&self, v: &Value, deadline: Deadline) -> Result<()> {
        self.send_frame(FrameKind::Message, v, deadline)
    }

    /// Tells the peer that what the two ends were doing is abandoned, and why: its pending or
    /// next receive fails with `PeerLost` carrying `reason`, whatever it expected.
    pub fn send_abort(&self, reason: &str, deadline: Deadline) -> Result<()> {
        let v = Value::Dict(vec![(
            crate::value::Key::Str("reason".into()),
            Value::str(reason),
        )]);
        self.send_frame(FrameKind::Abort, &v, deadline)
    }

    pub(crate) fn send_frame(&self, kind: FrameKind, v: &Value, deadline: Deadline) -> Result<()> {
        let start = Instant::now();
        let enc = wire::encode(v, &self.limits).map_err(|e| self.err(e))?;
        let mut st = self.send.lock().unwrap_or_else(|e| e.into_inner());
        if self.closed_locally.load(Ordering::SeqCst) {
            return Err(self.err(Error::new(
                ErrorKind::Closed,
                "send",
                "the connection was closed locally",
            )));
        }
        if let Some(p) = &st.poisoned {
            return Err(self.err(Error::new(
                ErrorKind::Closed,
                "send",
                format!("the connection is unusable: {p}"),
            )));
        }
        if self.peer_lost.load(Ordering::SeqCst) {
            return Err(self.err(Error::new(
                ErrorKind::PeerLost,
                "send",
                "the peer went away (an earlier receive found it gone); nothing was sent",
            )));
        }
        let cma = self.shm.as_ref().filter(|s| {
            s.cma_send
                && enc
                    .segs
                    .iter()
                    .any(|g| !g.is_device() && g.len() as u64 >= s.cma_threshold)
        });
        let has_dev = enc.segs.iter().any(wire::OutSeg::is_device);
        // CUDA IPC: export every device segment first; if any cannot be exported (memory from a
        // pool allocator, say), the whole frame is staged instead.
        // Small messages are staged: no mapping to open, and `send` need not wait for the peer.
        let dev_bytes: u64 = enc
            .segs
            .iter()
            .filter(|g| g.is_device())
            .map(|g| g.len() as u64)
            .sum();
        let mut ipc: Option<Vec<(cuda::IpcRecord, Option<cuda::Event>)>> = None;
        if has_dev && self.cuda_ipc && dev_bytes >= config().cuda_ipc_threshold {
            let g = cuda::require("send").map_err(|e| self.err(e))?;
            let mut recs = Vec::new();
            let mut ok = true;
            for seg in &enc.segs {
                match seg {
                    // Nothing to map: an empty record.
                    wire::OutSeg::Device { len: 0, .. } => recs.push((
                        cuda::IpcRecord {
                            mem: [0; 64],
                            event: [0; 64],
                            offset: 0,
                            len: 0,
                        },
                        None,
                    )),
                    wire::OutSeg::Device { ptr, len, dev } => {
                        match g.ipc_export(*dev, *ptr, *len) {
                            Ok((r, ev)) => recs.push((r, Some(ev))),
                            Err(e) => {
                                // Said once at info (PARALLEL_LOG=info), then at debug.
                                static SAID: AtomicBool = AtomicBool::new(false);
                                if SAID.swap(true, Ordering::Relaxed) {
                                    tracing::debug!(
                                        "CUDA IPC export failed ({e}); staging this message"
                                    );
                                } else {
                                    tracing::info!(
                                        peer = %self.peer,
                                        "CUDA IPC export failed ({e}); staging through pinned host memory instead (said once)"
                                    );
                                }
                                ok = false;
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
            if ok {
                ipc = Some(recs);
            } else {
                for ev in recs.into_iter().filter_map(|r| r.1) {
                    g.release_event(ev);
                }
            }
        }
        st.seq += 1;
        let h = Header {
            kind,
            flags: if cma.is_some() { FLAG_CMA } else { 0 }
                | if ipc.is_some() { FLAG_CUDA_IPC } else { 0 },
            desc_len: enc.desc.len() as u32,
            nseg: enc.segs.len() as u32,
            payload_len: enc.payload_len,
            seq: st.seq,
        };
        let hb = h.encode();
        // Records standing in for cross-memory segments: (address, length).
        let records: Vec<[u8; 16]> = enc
            .segs
            .iter()
            .map(|g| {
                let b = g.bytes();
                let mut r = [0u8; 16];
                r[..8].copy_from_slice(&(b.as_ptr() as u64).to_le_bytes());
                r[8..].copy_from_slice(&(b.len() as u64).to_le_bytes());
                r
            })
            .collect();
        let ipc_records: Vec<[u8; cuda::IPC_RECORD_LEN]> =
            ipc.iter().flatten().map(|(r, _)| r.encode()).collect();
        let mut parts: Vec<Part<'_>> = Vec::with_capacity(2 + enc.segs.len());
        parts.push(Part::Host(&hb));
        parts.push(Part::Host(&enc.desc));
        let mut ipc_i = 0usize;
        for (g, r) in enc.segs.iter().zip(&records) {
            match (g, cma) {
                (wire::OutSeg::Device { ptr, len, dev }, _) => {
                    if ipc.is_some() {
                        parts.push(Part::Host(&ipc_records[ipc_i]));
                        ipc_i += 1;
                    } else {
                        parts.push(Part::Device(*ptr, *len, *dev));
                    }
                }
                (_, Some(s)) if g.len() as u64 >= s.cma_threshold => parts.push(Part::Host(r)),
                _ => parts.push(Part::Host(g.bytes())),
            }
        }
        // Frames whose memory the receiver reads in place are numbered before the first byte
        // leaves, so that a failure part way can cancel them (SHM-7).
        let gated = match (cma.is_some() || ipc.is_some(), self.shm.as_ref()) {
            (true, Some(s)) => Some((s, s.note_cma_sent())),
            _ => None,
        };
        let r = self
            .write_parts(&parts, deadline)
            .and_then(|_| match gated {
                Some((s, n)) => s.wait_cma_ack(n, deadline),
                None => Ok(()),
            });
        if let Err(e) = &r {
            // We cannot know how much of the frame left: the stream is no longer framed (LINK-2).
            st.poisoned = Some(format!("a send failed part way ({e})"));
        }
        drop(st);
        if let Err(e) = &r {
            self.shutdown();
            // The caller may free or reuse its buffers once we return: cancel the frame, or
            // wait for a receiver already reading them (SHM-7).
            if let Some((s, n)) = gated
                && !s.abandon_cma(n, config().frame_timeout)
            {
                tracing::error!(
                    "{self:?}: a send failed ({e}) and the shared ring's gate held a value no receiver writes (the peer corrupted it); the receiver may still read this message's buffers"
                );
            }
        }
        if let Some(recs) = ipc
            && let Some(g) = cuda::cuda()
        {
            for ev in recs.into_iter().filter_map(|r| r.1) {
                g.release_event(ev);
            }
        }
        if let Err(e) = r {
            return Err(self.err(e));
        }
        self.counters.bytes_sent.fetch_add(
            HEADER_LEN as u64 + enc.desc.len() as u64 + enc.payload_len,
            Ordering::Relaxed,
        );
        self.counters.msgs_sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .send_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    // ---- receive ------------------------------------------------------------------------------

    /// Takes the receive lock (blocking).
    pub fn lock_recv(&self) -> RecvGuard<'_> {
        RecvGuard {
            link: self,
            state: self.recv.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Takes the receive lock if no other receive is in progress.
    pub fn try_lock_recv(&self) -> Option<RecvGuard<'_>> {
        self.recv
            .try_lock()
            .ok()
            .map(|state| RecvGuard { link: self, state })
    }

    /// Receives one message; tensors go into `out` (in order) when given (LINK-1 on mismatch).
    pub fn recv(&self, out: &mut [Tensor], deadline: Deadline) -> Result<Value> {
        self.lock_recv().recv(out, deadline)
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
            None => sys::readable_now(self.sock.as_raw_fd()),
        }
    }

    /// The bytes queued for reading, how many of the next header's bytes are among them, and
    /// the header when it decodes; consumes nothing. `None`: the stream ended or broke (a
    /// receive fails at once).
    fn peek_header(&self) -> Option<(usize, usize, Option<Header>)> {
        let mut hb = [0u8; HEADER_LEN];
        let (queued, n) = match &self.shm {
            Some(s) => s.peek(&mut hb)?,
            None => sys::peek(self.sock.as_raw_fd(), &mut hb)?,
        };
        let h = (n == HEADER_LEN)
            .then(|| Header::decode(&hb, &self.limits).ok())
            .flatten();
        Some((queued, n, h))
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
        let spin_until = Instant::now() + self.spin;
        let mut spins = 0u32;
        while Instant::now() < spin_until {
            if self.ready() {
                return Ok(());
            }
            crate::runtime::relax(&mut spins);
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

impl RecvGuard<'_> {
    fn poison(&mut self, why: String) {
        self.state.poisoned = Some(why);
        self.link.shutdown();
    }

    /// Receives one message (see [`Link::recv`]).
    pub fn recv(&mut self, out: &mut [Tensor], deadline: Deadline) -> Result<Value> {
        self.recv_keyed(out, None, deadline)
    }

    /// Receives one message (see [`Link::recv_keyed`]; `None`: `out` in order).
    pub fn recv_keyed(
        &mut self,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
    ) -> Result<Value> {
        let r = self.recv_message(out, paths, deadline);
        if let Some(e) = r.as_ref().err().filter(|e| e.kind() == ErrorKind::PeerLost) {
            // LINK-3 for the other direction: a shared-memory ring (or a TCP socket whose reset
            // has not arrived yet) would otherwise accept a send to the dead peer silently.
            if !self.link.peer_lost.swap(true, Ordering::SeqCst) {
                tracing::warn!(peer = %self.link.peer, link = self.link.kind.name(), "peer lost: {e}");
            }
        }
        r
    }

    fn recv_message(
        &mut self,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
    ) -> Result<Value> {
        let link = self.link;
        let start = Instant::now();
        if link.closed_locally.load(Ordering::SeqCst) {
            return Err(link.err(Error::new(
                ErrorKind::Closed,
                "recv",
                "the connection was closed locally",
            )));
        }
        if link.peer_closed.load(Ordering::SeqCst) {
            return Err(link.err(Error::new(
                ErrorKind::Closed,
                "recv",
                "the peer closed the connection",
            )));
        }
        if let Some(p) = &self.state.poisoned {
            return Err(link.err(Error::new(
                ErrorKind::Closed,
                "recv",
                format!("the connection is unusable: {p}"),
            )));
        }
        // Wait for the first byte without consuming anything, so a timeout here is clean (LINK-1).
        if let Err(e) = link.wait_ready(deadline) {
            return Err(link.err(e));
        }
        let mut hb = [0u8; HEADER_LEN];
        match link.read_bytes(&mut hb, deadline, "a message", Duration::ZERO) {
            Ok(true) => {}
            Ok(false) => {
                let e = Error::new(
                    ErrorKind::PeerLost,
                    "recv",
                    "the peer went away without closing the connection (process exited or connection reset)",
                );
                self.state.poisoned = Some("the peer went away".into());
                return Err(link.err(e));
            }
            Err(e) => {
                if e.kind() == ErrorKind::Closed {
                    link.peer_closed.store(true, Ordering::SeqCst);
                }
                self.poison(e.to_string());
                return Err(link.err(e));
            }
        }
        let r = self.recv_after_header(&hb, out, paths, deadline);
        match &r {
            Ok(_) => {
                link.counters.msgs_recv.fetch_add(1, Ordering::Relaxed);
                link.counters
                    .recv_ns
                    .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            }
            Err(e) if e.kind() == ErrorKind::Mismatch => {}
            Err(e) if e.kind() == ErrorKind::Closed && link.peer_closed.load(Ordering::SeqCst) => {}
            Err(e) => self.poison(e.to_string()),
        }
        r.map_err(|e| link.err(e))
    }

    fn recv_after_header(
        &mut self,
        hb: &[u8; HEADER_LEN],
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
    ) -> Result<Value> {
        let link = self.link;
        let h = Header::decode(hb, &link.limits)?;
        match h.kind {
            FrameKind::Message | FrameKind::Abort => {}
            FrameKind::Close => {
                link.peer_closed.store(true, Ordering::SeqCst);
                return Err(Error::new(
                    ErrorKind::Closed,
                    "recv",
                    "the peer closed the connection",
                ));
            }
            k => {
                return Err(protocol(
                    "recv",
                    format!("unexpected {k:?} frame after the handshake"),
                ));
            }
        }
        // Grown as the bytes arrive (WIRE-1, BUF-4): a header that announces a large
        // descriptor and stalls commits one chunk, not the declared size.
        let mut desc = AlignedVec::<16>::with_capacity((h.desc_len as usize).min(DESC_CHUNK));
        while desc.len() < h.desc_len as usize {
            let at = desc.len();
            // Doubling from DESC_CHUNK: at most twice what arrived is committed.
            desc.resize((at + at.max(DESC_CHUNK)).min(h.desc_len as usize), 0);
            link.read_in_frame(&mut desc[at..], deadline, "a message descriptor")?;
        }
        let d = wire::access_descriptor(&desc)?;
        let segs = wire::check_descriptor(d, &h, &link.limits)?;
        if h.kind == FrameKind::Abort {
            // Whatever the receive expected, an abort is the answer (with its reason).
            if !segs.is_empty() {
                return Err(protocol("recv", "an Abort frame with payload segments"));
            }
            let v = wire::build_value(d, &segs, Vec::new())?;
            let why = v
                .get("reason")
                .and_then(Value::as_str)
                .unwrap_or("no reason given");
            return Err(Error::new(
                ErrorKind::PeerLost,
                "recv",
                format!("the peer aborted: {why}"),
            ));
        }
        // bytes_recv counts what arrived, segment by segment, never what the peer declared.
        let received = |n: usize| {
            link.counters
                .bytes_recv
                .fetch_add(n as u64, Ordering::Relaxed)
        };
        received(HEADER_LEN + desc.len());
        let cma = h.flags & FLAG_CMA != 0;
        let ipc = h.flags & FLAG_CUDA_IPC != 0;
        if (cma || ipc) && link.shm.is_none() {
            return Err(protocol(
                "recv",
                "cross-memory or CUDA IPC frame on a TCP link",
            ));
        }
        // Which out tensor each tensor segment lands in: in order, or by path.
        let (order, by_path) = match paths {
            Some(p) if !out.is_empty() => match wire::match_paths(&wire::tensor_paths(d), p) {
                Ok(o) => (o, None),
                Err(m) => (Vec::new(), Some(m)),
            },
            _ => ((0..out.len()).collect(), None),
        };
        let mismatch = if out.is_empty() {
            None
        } else {
            by_path
                .map(|m| format!("{m} (the message was discarded; the connection is still usable)"))
                .or_else(|| {
                    let name = |j: usize| match paths {
                        Some(p) => format!("out= at {}", wire::path_str(&p[j])),
                        None => format!("out[{j}]"),
                    };
                    match_outs(&segs, out, &order, &name)
                })
        };
        // SHM-7: the sender's memory is read only after this receive claimed the frame; a frame
        // its sender gave up on is refused, whatever its buffers hold now.
        let gate = if cma || ipc { link.shm.as_ref() } else { None };
        if let Some(g) = gate
            && let Err(e) = g.claim_cma()
        {
            g.ack_cma();
            return Err(e);
        }
        let r = (|| {
            let mut filled = Vec::with_capacity(segs.len());
            let mut out_i = 0usize;
            let mut failure: Option<Error> = None;
            for s in &segs {
                let len = s.len as usize;
                let dev_seg = match &s.kind {
                    SegKind::Tensor {
                        device: Device::Cuda(i),
                        ..
                    } => Some(*i),
                    _ => None,
                };
                let via_cma = cma
                    && dev_seg.is_none()
                    && link.shm.as_ref().is_some_and(|x| s.len >= x.cma_threshold);
                let via_ipc = ipc && dev_seg.is_some();
                let to_out = mismatch.is_none()
                    && !out.is_empty()
                    && matches!(s.kind, SegKind::Tensor { .. });
                if mismatch.is_some() || failure.is_some() {
                    if via_ipc {
                        self.read_ipc_record(len, deadline)?;
                    } else {
                        self.skip(len, via_cma, deadline)?;
                    }
                    received(len);
                    continue;
                }
                // Where the bytes land: the caller's tensor, a new CUDA tensor (for a CUDA segment,
                // when this process has CUDA), or a new host buffer.
                let r = if to_out {
                    let j = order[out_i];
                    out_i += 1;
                    self.fill_tensor(&mut out[j], len, via_cma, via_ipc, dev_seg, deadline)
                        .map(|_| Filled::Out(j))
                } else if let (Some(i), SegKind::Tensor { dtype, shape, .. }) = (dev_seg, &s.kind)
                    && let Some(g) = cuda::cuda()
                {
                    let dev = if (i as usize) < g.device_count() {
                        i
                    } else {
                        0
                    };
                    let a = match cuda::DeviceAlloc::new(dev, len) {
                        Ok(a) => a,
                        Err(e) => {
                            // Nothing of the segment was consumed yet: drop it, keep the framing.
                            if via_ipc {
                                self.read_ipc_record(len, deadline)?;
                            } else {
                                self.skip(len, via_cma, deadline)?;
                            }
                            received(len);
                            failure = Some(e);
                            continue;
                        }
                    };
                    {
                        let a = std::sync::Arc::new(a);
                        // SAFETY: a fresh device allocation of exactly `len` bytes, kept by `keep`.
                        let mut t = unsafe {
                            Tensor::from_raw(
                                *dtype,
                                shape.clone(),
                                None,
                                Device::Cuda(dev),
                                a.ptr as *mut u8,
                                len,
                                a.clone(),
                            )
                        };
                        self.fill_tensor(&mut t, len, via_cma, via_ipc, dev_seg, deadline)
                            .map(|_| Filled::Tensor(t))
                    }
                } else if via_ipc {
                    // A CUDA IPC record for a process without CUDA cannot happen (HS-3).
                    Err(protocol("recv", "CUDA IPC record on a link without CUDA"))
                } else {
                    // Sized by the peer's declaration: memory is committed as the bytes arrive (BUF-4).
                    Buf::for_incoming(len).and_then(|mut b| {
                        self.fill(&mut b, via_cma, deadline)?;
                        Ok(match (&s.kind, dev_seg) {
                            // A CUDA tensor arriving where there is no CUDA: a CPU tensor.
                            (SegKind::Tensor { dtype, shape, .. }, Some(_)) => {
                                Filled::Tensor(Tensor::new(*dtype, shape.clone(), b)?)
                            }
                            _ => Filled::Buf(b),
                        })
                    })
                };
                match r {
                    Ok(f) => {
                        received(len);
                        filled.push(f);
                    }
                    // The segment may be half consumed: the stream is no longer framed (LINK-2).
                    Err(e) => return Err(e),
                }
            }
            Ok((filled, failure))
        })();
        // SHM-7: every read of the sender's memory is done; deliver only if the sender did not
        // revoke the claim meanwhile (it may have reused its buffers since).
        let r = match (r, gate) {
            (Ok(got), Some(g)) => g.check_claim().map(|_| got),
            (r, _) => r,
        };
        if let Some(g) = gate {
            g.ack_cma();
        }
        let (filled, failure) = r?;
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(m) = mismatch {
            return Err(Error::new(ErrorKind::Mismatch, "recv", m));
        }
        wire::build_value(d, &segs, filled)
    }

    /// Receives the next segment into tensor `t` (CPU or CUDA, contiguous or strided CPU).
    fn fill_tensor(
        &mut self,
        t: &mut Tensor,
        len: usize,
        via_cma: bool,
        via_ipc: bool,
        src_dev: Option<i32>,
        deadline: Deadline,
    ) -> Result<()> {
        if via_ipc {
            let rec = self.read_ipc_record(len, deadline)?;
            if len == 0 {
                return Ok(());
            }
            let g = cuda::require("recv")?;
            let dev = match (t.device(), src_dev) {
                (Device::Cuda(i), _) => i,
                (Device::Cpu, Some(i)) if (i as usize) < g.device_count() => i,
                (Device::Cpu, _) => 0,
            };
            let link = self.link;
            let src = g.ipc_import(dev, &rec).map_err(|e| {
                // LINK-3: a sender that died with the frame in flight, not a resource problem.
                match link.shm.as_ref() {
                    Some(s) if s.peer_process_gone() || link.peer_hung_up() => Error::new(
                        ErrorKind::PeerLost,
                        "recv",
                        format!("the sending process went away in the middle of a message ({e})"),
                    ),
                    _ => e,
                }
            })?;
            let mut copy = || -> Result<()> {
                match t.device() {
                    Device::Cuda(_) => {
                        // SAFETY: the exporter keeps its memory until our ack; `t` is
                        // contiguous (match_outs) and holds `len` bytes.
                        unsafe {
                            g.copy(
                                dev,
                                cuda::Mem::Dev(t.data_mut_ptr() as u64),
                                cuda::Mem::Dev(src),
                                len,
                            )?
                        };
                        g.sync(dev, deadline)
                    }
                    Device::Cpu => {
                        // Straight into a contiguous tensor; a strided one through a buffer.
                        let mut tmp = if t.is_contiguous() {
                            None
                        } else {
                            Some(Buf::with_len(len)?)
                        };
                        let host = match (&mut tmp, out_contiguous_slice(t)) {
                            (Some(b), _) => b.as_mut_ptr(),
                            (None, Some(d)) => d.as_mut_ptr(),
                            (None, None) => unreachable!("contiguous"),
                        };
                        // SAFETY: as above; `host` holds `len` bytes (the out tensor or tmp).
                        unsafe { g.copy(dev, cuda::Mem::Host(host), cuda::Mem::Dev(src), len)? };
                        g.sync(dev, deadline)?;
                        if let Some(b) = &tmp {
                            t.scatter_from(b)?;
                        }
                        Ok(())
                    }
                }
            };
            let r = copy();
            if r.is_err() {
                // The sender frees its memory once we acknowledge: finish reading it first.
                g.drain(dev);
            }
            g.ipc_done(&rec);
            return r;
        }
        if let Device::Cuda(dev) = t.device() {
            let dst = t.data_mut_ptr() as u64;
            if via_cma {
                let mut tmp = Buf::with_len(len)?;
                self.fill(&mut tmp, true, deadline)?;
                // SAFETY: `t` is a contiguous CUDA tensor of `len` bytes (match_outs).
                return unsafe {
                    cuda::copy_sync(
                        dev,
                        cuda::Mem::Dev(dst),
                        cuda::Mem::Host(tmp.as_mut_ptr()),
                        len,
                    )
                };
            }
            return self.recv_device(dst, len, dev, deadline);
        }
        if let Some(dst) = out_contiguous_slice(t) {
            self.fill(dst, via_cma, deadline)
        } else {
            let mut tmp = Buf::with_len(len)?;
            self.fill(&mut tmp, via_cma, deadline)?;
            t.scatter_from(&tmp)
        }
    }

    /// Staged receive into device memory (CUDA-4): the host-to-device copy of chunk k overlaps
    /// the receive of chunk k+1.
    fn recv_device(&mut self, dst: u64, len: usize, dev: i32, deadline: Deadline) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cuda::Stage {
            g,
            chunk,
            nchunks,
            bufs,
        } = cuda::Stage::plan("recv", len, false)?;
        let nb = bufs.len();
        let mut events: std::collections::VecDeque<cuda::Event> = Default::default();
        let r = (|| {
            for k in 0..nchunks {
                if k >= nb {
                    // Buffer k % nb is free once the copy of chunk k - nb finished.
                    let ev = events.pop_front().expect("one event per chunk in flight");
                    g.wait_event(ev, deadline)?;
                }
                let n = chunk.min(len - k * chunk);
                // SAFETY: staging buffer k % nb holds `chunk` >= n bytes and no copy reads it.
                let b = unsafe { std::slice::from_raw_parts_mut(bufs[k % nb].0, n) };
                self.link.read_in_frame(b, deadline, "a CUDA tensor")?;
                // SAFETY: `dst` holds `len` bytes (the caller's contiguous CUDA tensor or our
                // allocation); the staging buffer stays untouched until the copy's event.
                unsafe {
                    g.copy(
                        dev,
                        cuda::Mem::Dev(dst + (k * chunk) as u64),
                        cuda::Mem::Host(b.as_mut_ptr()),
                        n,
                    )?
                };
                events.push_back(g.record(dev, false)?);
            }
            for ev in events.drain(..) {
                g.release_event(ev);
            }
            g.sync(dev, deadline)
        })();
        if r.is_err() {
            for ev in events.drain(..) {
                g.release_event(ev);
            }
            g.drain(dev);
        }
        r
    }

    /// Reads the CUDA IPC record standing in for a device segment of `len` bytes.
    fn read_ipc_record(&mut self, len: usize, deadline: Deadline) -> Result<cuda::IpcRecord> {
        let mut b = [0u8; cuda::IPC_RECORD_LEN];
        self.link
            .read_in_frame(&mut b, deadline, "a CUDA IPC record")?;
        let rec = cuda::IpcRecord::decode(&b);
        if rec.len != len as u64 {
            return Err(protocol(
                "recv",
                format!(
                    "CUDA IPC record of {} bytes for a {len}-byte tensor",
                    rec.len
                ),
            ));
        }
        Ok(rec)
    }

    /// Fills `dst` with the next segment (through the stream, or by cross-memory attach).
    fn fill(&mut self, dst: &mut [u8], via_cma: bool, deadline: Deadline) -> Result<()> {
        let link = self.link;
        if !via_cma {
            return link.read_in_frame(dst, deadline, "a message payload");
        }
        let (addr, len) = self.read_record(deadline)?;
        if len != dst.len() as u64 {
            return Err(protocol(
                "recv",
                format!(
                    "cross-memory record of {len} bytes for a {}-byte segment",
                    dst.len()
                ),
            ));
        }
        let s = link.shm.as_ref().expect("cma implies shm");
        sys::cma_read(s.peer_pid, addr, dst).map_err(|e| {
            if e.raw_os_error() == Some(libc::ESRCH) {
                // The sender died inside its send (it waits for our ack): LINK-3, not Resource.
                Error::new(
                    ErrorKind::PeerLost,
                    "recv",
                    "the sending process went away in the middle of a message",
                )
            } else {
                Error::os("recv", "process_vm_readv from the sender", e)
            }
        })
    }

    fn read_record(&mut self, deadline: Deadline) -> Result<(u64, u64)> {
        let mut r = [0u8; 16];
        self.link
            .read_in_frame(&mut r, deadline, "a cross-memory record")?;
        Ok((
            u64::from_le_bytes(r[..8].try_into().expect("8")),
            u64::from_le_bytes(r[8..].try_into().expect("8")),
        ))
    }

    /// Discards the next segment (LINK-1).
    fn skip(&mut self, len: usize, via_cma: bool, deadline: Deadline) -> Result<()> {
        if via_cma {
            return self.read_record(deadline).map(|_| ());
        }
        let mut scratch = std::mem::take(&mut self.state.scratch);
        scratch.resize(scratch.len().clamp(64 << 10, 1 << 20), 0);
        let mut left = len;
        let mut r = Ok(());
        while left > 0 && r.is_ok() {
            let n = left.min(scratch.len());
            r = self
                .link
                .read_in_frame(&mut scratch[..n], deadline, "a refused payload");
            left -= n;
        }
        self.state.scratch = scratch;
        r
    }
}

/// Moves the tensors of an already received message into the caller's `out` tensors (in order,
/// or by path when `paths` is given, as [`Link::recv_keyed`] matches them), as a receive into
/// `out` would have: they then appear as `Value::Out(i)`. A message whose tensors do not match is
/// a `Mismatch` error (the message is consumed, as in LINK-1).
pub fn into_outs(mut v: Value, out: &mut [Tensor], paths: Option<&[Vec<Key>]>) -> Result<Value> {
    let mut found: Vec<(Vec<Key>, Tensor)> = Vec::new();
    let mut stack: Vec<(Vec<Key>, &mut Value)> = vec![(Vec::new(), &mut v)];
    while let Some((at, x)) = stack.pop() {
        match x {
            Value::List(l) | Value::Tuple(l) => {
                for (i, c) in l.iter_mut().enumerate().rev() {
                    let mut p = at.clone();
                    p.push(Key::Int(i as i64));
                    stack.push((p, c));
                }
            }
            Value::Dict(d) => {
                for (k, c) in d.iter_mut().rev() {
                    let mut p = at.clone();
                    p.push(k.clone());
                    stack.push((p, c));
                }
            }
            Value::Tensor(_) => {
                let Ok(t) = std::mem::replace(x, Value::Out(found.len())).into_tensor() else {
                    unreachable!("matched a tensor")
                };
                found.push((at, t));
            }
            _ => {}
        }
    }
    // Where each found tensor goes: in order, or to the out tensor at the same path.
    let order: Vec<usize> = match paths {
        Some(p) if !out.is_empty() && found.len() == out.len() => {
            let incoming: Vec<Vec<Key>> = found.iter().map(|(at, _)| at.clone()).collect();
            wire::match_paths(&incoming, p).map_err(|m| {
                Error::new(
                    ErrorKind::Mismatch,
                    "recv",
                    format!("{m} (the message was discarded; the connection is still usable)"),
                )
            })?
        }
        _ => (0..found.len()).collect(),
    };
    // The placeholders name the discovery index; renumber them to the out tensor each fills.
    let mut stack: Vec<&mut Value> = vec![&mut v];
    while let Some(x) = stack.pop() {
        match x {
            Value::List(l) | Value::Tuple(l) => stack.extend(l.iter_mut()),
            Value::Dict(d) => stack.extend(d.iter_mut().map(|(_, c)| c)),
            Value::Out(k) => *k = order[*k],
            _ => {}
        }
    }
    let mut got: Vec<Option<Tensor>> = Vec::new();
    got.resize_with(out.len().max(found.len()), || None);
    let n_found = found.len();
    for ((_, t), &j) in found.into_iter().zip(&order) {
        if j < got.len() {
            got[j] = Some(t);
        }
    }
    let got: Vec<Tensor> = got.into_iter().flatten().collect();
    let got_len = n_found;
    let why = if got_len != out.len() {
        Some(format!(
            "the message holds {} tensors but {} were given as out (the message was discarded; the connection is still usable)",
            got_len,
            out.len()
        ))
    } else {
        got.iter().zip(out.iter()).enumerate().find_map(|(i, (g, o))| {
            (g.dtype() != o.dtype() || g.shape() != o.shape() || o.is_cuda() || g.bytes().is_none()).then(|| {
                format!(
                    "tensor {i} of the message is {} {:?} but out[{i}] is {} {:?}{} (the message was discarded; the connection is still usable)",
                    g.dtype().name(),
                    g.shape(),
                    o.dtype().name(),
                    o.shape(),
                    if o.is_cuda() { " on CUDA (this message was read ahead by recv_any into host memory)" } else { "" }
                )
            })
        })
    };
    if let Some(m) = why {
        return Err(Error::new(ErrorKind::Mismatch, "recv", m));
    }
    for (g, o) in got.iter().zip(out.iter_mut()) {
        let src = g.bytes().expect("checked above");
        match out_contiguous_slice(o) {
            Some(d) => d.copy_from_slice(src),
            None => o.scatter_from(src)?,
        }
    }
    Ok(v)
}

/// Checks the caller's `out` tensors against the incoming tensor segments; returns why they do
/// not match, if they do not.
fn match_outs(
    segs: &[wire::SegInfo],
    out: &[Tensor],
    order: &[usize],
    name: &dyn Fn(usize) -> String,
) -> Option<String> {
    let incoming: Vec<_> = segs
        .iter()
        .filter_map(|s| match &s.kind {
            SegKind::Tensor { dtype, shape, .. } => Some((dtype, shape)),
            _ => None,
        })
        .collect();
    if incoming.len() != out.len() {
        return Some(format!(
            "the message holds {} tensors but {} were given as out (the message was discarded; the connection is still usable)",
            incoming.len(),
            out.len()
        ));
    }
    for (i, t) in out.iter().enumerate() {
        if t.is_cuda() && !t.is_contiguous() {
            return Some(format!(
                "out[{i}] is a non-contiguous CUDA tensor: receive into a contiguous one and copy (torch_parallel does this for you) (the message was discarded; the connection is still usable)"
            ));
        }
        if t.is_cuda() && cuda::cuda().is_none() {
            return Some(format!(
                "out[{i}] is a CUDA tensor but this process cannot use CUDA: {} (the message was discarded; the connection is still usable)",
                cuda::unavailable_reason()
            ));
        }
    }
    for (i, ((dtype, shape), j)) in incoming.iter().zip(order).enumerate() {
        let t = &out[*j];
        if **dtype != t.dtype() || **shape != t.shape() {
            return Some(format!(
                "tensor {i} of the message is {} {:?} but {} is {} {:?} (the message was discarded; the connection is still usable)",
                dtype.name(),
                shape,
                name(*j),
                t.dtype().name(),
                t.shape()
            ));
        }
    }
    None
}

fn out_contiguous_slice(t: &mut Tensor) -> Option<&mut [u8]> {
    if !t.is_contiguous() {
        return None;
    }
    let n = t.nbytes();
    if n == 0 {
        return Some(&mut []);
    }
    // SAFETY: a contiguous tensor's n bytes from its data pointer are its elements; the caller of
    // recv guarantees exclusive access to out tensors for the duration of the call.
    Some(unsafe { std::slice::from_raw_parts_mut(t.data_mut_ptr(), n) })
}

//! Links: a connected pair of endpoints that carry frames, over TCP or a shared-memory ring.
//!
//! Every link kind has the same shape: a probe (can it run here?), a way to be set up (the
//! handshake in [`handshake`]), and a [`Link`] that sends and receives whole messages with a
//! deadline. The endpoints above (Server, Client) never see a socket.
//!
//! Invariants:
//! - LINK-1: a failure at a message boundary (timeout before the first byte, mismatch of a
//!   caller's `out` tensors) leaves the link usable; the payload of a refused message is drained.
//! - LINK-2: a failure inside a frame (a timeout or interrupt half way, malformed bytes) poisons
//!   the link and shuts it down, so the peer gets a prompt error instead of a desynchronized stream.
//! - LINK-3: a peer that disappears turns every pending and later call into `PeerLost` naming the
//!   peer; an orderly close (a Close frame) into `Closed`.
//! - LINK-4: closing from another thread wakes blocked calls (the socket is shut down), which then
//!   fail with `Closed` ("closed locally").

pub mod handshake;
pub(crate) mod shm;
pub(crate) mod sys;

use crate::buffer::Buf;
use crate::config::config;
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::{self, Deadline, Interest};
use crate::value::{Tensor, Value};
use crate::wire::{self, FLAG_CMA, Filled, FrameKind, HEADER_LEN, Header, Limits, SegKind};
use rkyv::util::AlignedVec;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    pub(crate) fn new(sock: OwnedFd, shm: Option<shm::ShmEnd>, peer: String) -> Link {
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
        }
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

    // ---- send ---------------------------------------------------------------------------------

    /// Sends a user message.
    pub fn send(&self, v: &Value, deadline: Deadline) -> Result<()> {
        self.send_frame(FrameKind::Message, v, deadline)
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
                    .any(|g| g.bytes().len() as u64 >= s.cma_threshold)
        });
        st.seq += 1;
        let h = Header {
            kind,
            flags: if cma.is_some() { FLAG_CMA } else { 0 },
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
        let mut parts: Vec<&[u8]> = Vec::with_capacity(2 + enc.segs.len());
        parts.push(&hb);
        parts.push(&enc.desc);
        for (g, r) in enc.segs.iter().zip(&records) {
            match cma {
                Some(s) if g.bytes().len() as u64 >= s.cma_threshold => parts.push(r),
                _ => parts.push(g.bytes()),
            }
        }
        let r = self
            .write_bytes(&parts, deadline, "a message")
            .and_then(|_| match cma {
                Some(s) => s.wait_cma_ack(s.note_cma_sent(), deadline),
                None => Ok(()),
            });
        if let Err(e) = r {
            // We cannot know how much of the frame left: the stream is no longer framed (LINK-2).
            st.poisoned = Some(format!("a send failed part way ({e})"));
            drop(st);
            self.shutdown();
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

    /// True when a receive would find bytes (or the end of the stream) without waiting.
    pub fn ready(&self) -> bool {
        match &self.shm {
            Some(s) => s.has_data() || sys::readable_now(self.sock.as_raw_fd()),
            None => sys::readable_now(self.sock.as_raw_fd()),
        }
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
        if self.closed_locally.load(Ordering::SeqCst) {
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
        self.closed_locally.store(true, Ordering::SeqCst);
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
        let r = self.recv_message(out, deadline);
        if r.as_ref().is_err_and(|e| e.kind() == ErrorKind::PeerLost) {
            // LINK-3 for the other direction: a shared-memory ring (or a TCP socket whose reset
            // has not arrived yet) would otherwise accept a send to the dead peer silently.
            self.link.peer_lost.store(true, Ordering::SeqCst);
        }
        r
    }

    fn recv_message(&mut self, out: &mut [Tensor], deadline: Deadline) -> Result<Value> {
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
        let r = self.recv_after_header(&hb, out, deadline);
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
        deadline: Deadline,
    ) -> Result<Value> {
        let link = self.link;
        let h = Header::decode(hb, &link.limits)?;
        match h.kind {
            FrameKind::Message => {}
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
        let mut desc = AlignedVec::<16>::with_capacity(h.desc_len as usize);
        desc.resize(h.desc_len as usize, 0);
        link.read_bytes(&mut desc, deadline, "a message descriptor", Duration::ZERO)?
            .then_some(())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::PeerLost,
                    "recv",
                    "connection closed inside a message",
                )
            })?;
        let d = wire::access_descriptor(&desc)?;
        let segs = wire::check_descriptor(d, &h, &link.limits)?;
        link.counters.bytes_recv.fetch_add(
            HEADER_LEN as u64 + desc.len() as u64 + h.payload_len,
            Ordering::Relaxed,
        );
        let cma = h.flags & FLAG_CMA != 0;
        if cma && link.shm.is_none() {
            return Err(protocol("recv", "cross-memory frame on a TCP link"));
        }
        let mismatch = if out.is_empty() {
            None
        } else {
            match_outs(&segs, out)
        };
        let mut filled = Vec::with_capacity(segs.len());
        let mut out_i = 0usize;
        let mut failure: Option<Error> = None;
        for s in &segs {
            let len = s.len as usize;
            let via_cma = cma && link.shm.as_ref().is_some_and(|x| s.len >= x.cma_threshold);
            let to_out =
                mismatch.is_none() && !out.is_empty() && matches!(s.kind, SegKind::Tensor { .. });
            if mismatch.is_some() || failure.is_some() {
                self.skip(len, via_cma, deadline)?;
                continue;
            }
            if to_out {
                let t = &mut out[out_i];
                if let Some(dst) = out_contiguous_slice(t) {
                    if let Err(e) = self.fill(dst, via_cma, deadline) {
                        failure = Some(e);
                        continue;
                    }
                } else {
                    let mut tmp = Buf::with_len(len)?;
                    if let Err(e) = self.fill(&mut tmp, via_cma, deadline) {
                        failure = Some(e);
                        continue;
                    }
                    t.scatter_from(&tmp);
                }
                filled.push(Filled::Out(out_i));
                out_i += 1;
            } else {
                // Sized by the peer's declaration: memory is committed as the bytes arrive (BUF-4).
                let mut b = Buf::for_incoming(len)?;
                if let Err(e) = self.fill(&mut b, via_cma, deadline) {
                    failure = Some(e);
                    continue;
                }
                filled.push(Filled::Buf(b));
            }
        }
        if cma {
            link.shm.as_ref().expect("checked").ack_cma();
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(m) = mismatch {
            return Err(Error::new(ErrorKind::Mismatch, "recv", m));
        }
        wire::build_value(d, &segs, filled)
    }

    /// Fills `dst` with the next segment (through the stream, or by cross-memory attach).
    fn fill(&mut self, dst: &mut [u8], via_cma: bool, deadline: Deadline) -> Result<()> {
        let link = self.link;
        if !via_cma {
            return link
                .read_bytes(dst, deadline, "a message payload", Duration::ZERO)
                .map(|_| ());
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
            .read_bytes(&mut r, deadline, "a cross-memory record", Duration::ZERO)?;
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
                .read_bytes(
                    &mut scratch[..n],
                    deadline,
                    "a refused payload",
                    Duration::ZERO,
                )
                .map(|_| ());
            left -= n;
        }
        self.state.scratch = scratch;
        r
    }
}

/// Checks the caller's `out` tensors against the incoming tensor segments; returns why they do
/// not match, if they do not.
fn match_outs(segs: &[wire::SegInfo], out: &[Tensor]) -> Option<String> {
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
    for (i, ((dtype, shape), t)) in incoming.iter().zip(out).enumerate() {
        if **dtype != t.dtype || **shape != t.shape {
            return Some(format!(
                "tensor {i} of the message is {} {:?} but out[{i}] is {} {:?} (the message was discarded; the connection is still usable)",
                dtype.name(),
                shape,
                t.dtype.name(),
                t.shape
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

//! Reading frames: header, descriptor (memory committed as bytes arrive, BUF-4) and segments into
//! the caller's tensors or new buffers; LINK-1 (refusals at a message boundary keep the link),
//! LINK-2 (failures inside a frame poison it), LINK-3 (a vanished peer is `PeerLost`).
//!
//! - RECV-1 (small frames of a known shape): a link remembers the last few small descriptors it
//!   received and checked, with what the check found. A frame whose bytes already lie whole and
//!   contiguous where the link reads from (a shared ring, a TCP link's read-ahead), with no
//!   flags, of the kind the receive expects, and whose descriptor bytes, segment count and
//!   payload length equal a remembered descriptor's, is taken from there in one step
//!   ([`RecvGuard::recv_known`]): its header is still decoded and checked, its payload copied
//!   into new buffers, its value built from the remembered descriptor (the same bytes, so the
//!   same value the general path would build). Anything else, or anything that fails, goes the
//!   general path with nothing consumed, so that path alone reports errors.

use super::outs::match_outs;
use super::{RecvGuard, sys};
use crate::buffer::Buf;
use crate::cuda;
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::Deadline;
use crate::value::{Device, Key, Tensor, Value};
use crate::wire::{
    self, FLAG_CMA, FLAG_CUDA_IPC, Filled, FrameKind, HEADER_LEN, Header, SegInfo, SegKind,
};
use rkyv::util::AlignedVec;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A frame kind as errors name it.
fn frame_name(k: FrameKind) -> &'static str {
    match k {
        FrameKind::Control => "collective control message",
        FrameKind::Message => "user message",
        _ => "handshake or close",
    }
}

/// A descriptor is received in pieces that start at this size and double, so the memory it
/// commits follows the bytes that arrived (BUF-4).
const DESC_CHUNK: usize = 16 << 10;
/// What a streamed receive hands its bytes to: `(offset, bytes)` ([`RecvGuard::recv_streamed`]).
pub type Sink<'a> = dyn FnMut(usize, &[u8]) -> Result<()> + 'a;

/// The pieces a streamed receive hands to its sink ([`RecvGuard::recv_streamed`]): small
/// enough that a piece stays in a core's cache between its copy and its use.
pub const PIECE: usize = 256 << 10;
/// The pieces of a streamed receive of a cross-memory segment.
const CMA_PIECE: usize = 1 << 20;
/// Hands `bytes`, already received whole, to `sink` in pieces of at most [`PIECE`] bytes, as a
/// streamed receive would have.
pub(crate) fn feed(bytes: &[u8], sink: &mut Sink<'_>) -> Result<()> {
    bytes
        .chunks(PIECE)
        .enumerate()
        .try_for_each(|(i, c)| sink(i * PIECE, c))
}

/// A streamed receive's element size: one that every piece size divides.
pub(crate) fn check_grain(grain: usize) -> Result<()> {
    if matches!(grain, 1 | 2 | 4 | 8 | 16) {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Unsupported,
        "recv",
        format!(
            "a streamed receive of {grain}-byte elements: 1, 2, 4, 8 or 16 bytes are supported"
        ),
    ))
}

/// The largest descriptor buffer a link keeps for its next message.
const DESC_KEEP: usize = 64 << 10;
/// Descriptors up to this size are remembered (RECV-1).
const KNOWN_DESC_MAX: usize = 512;
/// Descriptors a link remembers (RECV-1).
const KNOWN_ENTRIES: usize = 4;
/// Frames up to this size may be taken whole from where they lie (RECV-1).
const KNOWN_FRAME_MAX: usize = 64 << 10;

/// A descriptor a link received and checked (RECV-1): its bytes, the header fields it was
/// checked against, and what the check found.
pub(super) struct Known {
    desc: AlignedVec<16>,
    nseg: u32,
    payload_len: u64,
    segs: Vec<SegInfo>,
}

/// Builds the value of a whole frame in `bytes` (header, descriptor, payload, perhaps more after
/// it) when it is of kind `expect`, flagless, and its descriptor is one of `known`: the value and
/// the frame's length. `None` for anything else (RECV-1).
fn build_known(
    bytes: &[u8],
    known: &[Known],
    expect: FrameKind,
    limits: &wire::Limits,
) -> Option<(Value, usize)> {
    // Copied first: the bytes may be a shared ring's, which the peer could change under us.
    let hb: [u8; HEADER_LEN] = bytes.get(..HEADER_LEN)?.try_into().ok()?;
    let h = Header::decode(&hb, limits).ok()?;
    if h.kind != expect || h.flags != 0 {
        return None;
    }
    let dl = h.desc_len as usize;
    let need = (HEADER_LEN + dl).checked_add(usize::try_from(h.payload_len).ok()?)?;
    if need > KNOWN_FRAME_MAX {
        return None;
    }
    let frame = bytes.get(..need)?;
    let desc = &frame[HEADER_LEN..HEADER_LEN + dl];
    let k = known
        .iter()
        .find(|k| k.nseg == h.nseg && k.payload_len == h.payload_len && k.desc[..] == *desc)?;
    let mut payload = &frame[HEADER_LEN + dl..];
    let mut filled = Vec::with_capacity(k.segs.len());
    for s in &k.segs {
        let (a, rest) = payload.split_at(s.len as usize);
        let mut b = Buf::for_incoming(a.len()).ok()?;
        b.copy_from_slice(a);
        filled.push(Filled::Buf(b));
        payload = rest;
    }
    let d = wire::access_descriptor(&k.desc).ok()?;
    Some((wire::build_value(d, &k.segs, filled).ok()?, need))
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
        self.recv_keyed_started(out, paths, deadline, Instant::now())
    }

    /// [`RecvGuard::recv_keyed`] for a caller that read the clock as it began (`start`, also
    /// the start of `deadline`): the receive's time in the link's statistics counts from there.
    pub fn recv_keyed_started(
        &mut self,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
        start: Instant,
    ) -> Result<Value> {
        let r = self.recv_message(out, paths, deadline, start, None);
        self.note_peer_lost(&r);
        r
    }

    /// LINK-3 for the other direction: a receive that found the peer gone marks the link, so a
    /// shared-memory ring (or a TCP socket whose reset has not arrived yet) does not accept a
    /// send to the dead peer silently.
    fn note_peer_lost<T>(&self, r: &Result<T>) {
        if let Some(e) = r.as_ref().err().filter(|e| e.kind() == ErrorKind::PeerLost)
            && !self.link.peer_lost.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(peer = %self.link.peer, link = self.link.kind.name(), "peer lost: {e}");
        }
    }

    /// Receives the next message, which must be one host tensor (or bytes) of `out`'s dtype and
    /// shape, and hands its bytes to `sink` in order, `(offset, bytes)`, in pieces instead of
    /// writing them into `out`: a ring all-reduce combines each piece into its tensor while the
    /// piece is still in the cache. Every piece but the last is a whole number of `grain`-byte
    /// elements (the caller's element size: 1, 2, 4, 8 or 16; `out` may be a byte view). Over a
    /// shared-memory ring the pieces are the ring's own memory (at most [`PIECE`] bytes, not
    /// aligned beyond the byte); from a socket they are read through a buffer the link keeps
    /// (at most [`PIECE`] bytes), by cross-memory attach likewise (at most `CMA_PIECE`). `out`
    /// is only checked against the message, never written. A cross-memory frame is read piece
    /// by piece from the sender's memory, so the sink has seen its bytes
    /// before the sender's claim is confirmed (SHM-7): when that fails, the receive fails, and
    /// what the sink made of the bytes is the caller's to discard (an all-reduce that fails
    /// leaves its tensor undefined anyway). A sink error fails the receive.
    pub fn recv_streamed(
        &mut self,
        out: &mut Tensor,
        grain: usize,
        deadline: Deadline,
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        check_grain(grain)?;
        let r = self.recv_message(
            std::slice::from_mut(out),
            None,
            deadline,
            Instant::now(),
            Some((grain, sink)),
        );
        self.note_peer_lost(&r);
        r.map(|_| ())
    }

    fn recv_message(
        &mut self,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
        start: Instant,
        sink: Option<(usize, &mut Sink<'_>)>,
    ) -> Result<Value> {
        let link = self.link;
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
        let waited = match link.shm {
            Some(_) => link.wait_ready(deadline),
            None => link.fill_wait(deadline),
        };
        if let Err(e) = waited {
            return Err(link.err(e));
        }
        if out.is_empty()
            && sink.is_none()
            && let Some((v, n)) = self.recv_known()
        {
            link.counters
                .bytes_recv
                .fetch_add(n as u64, Ordering::Relaxed);
            link.counters.msgs_recv.fetch_add(1, Ordering::Relaxed);
            link.counters
                .recv_ns
                .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
            return Ok(v);
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
        // The descriptor's buffer is kept from one message to the next (a small message then
        // allocates nothing for it); one grown past DESC_KEEP is let go afterwards.
        let mut desc = std::mem::take(&mut self.state.desc);
        let r = self.recv_after_header(&hb, &mut desc, out, paths, deadline, sink);
        if desc.capacity() <= DESC_KEEP {
            self.state.desc = desc;
        }
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

    /// The next frame taken whole from where it lies, when its shape is known (RECV-1): the
    /// value and the bytes consumed; `None` (nothing consumed) for the general path.
    fn recv_known(&mut self) -> Option<(Value, usize)> {
        let known = &self.state.known;
        if known.is_empty() {
            return None;
        }
        let (link, expect) = (self.link, self.expect);
        let build =
            |b: &[u8]| build_known(b, known, expect, &link.limits).map(|(v, n)| ((v, n), n));
        match &link.shm {
            Some(s) => s.take_contiguous(build),
            None => link.ahead_take(build),
        }
    }

    /// Remembers a descriptor just checked against `h` (RECV-1), unless it is large, already
    /// known, or of a frame whose segments do not come through the stream as host bytes.
    fn remember(&mut self, h: &Header, desc: &[u8], segs: &[SegInfo]) {
        let device = segs.iter().any(|s| {
            matches!(
                s.kind,
                SegKind::Tensor {
                    device: Device::Cuda(_),
                    ..
                }
            )
        });
        let st = &mut *self.state;
        if h.flags != 0
            || device
            || desc.len() > KNOWN_DESC_MAX
            || st.known.iter().any(|k| k.desc[..] == *desc)
        {
            return;
        }
        if st.known.len() < KNOWN_ENTRIES {
            let mut copy = AlignedVec::<16>::with_capacity(desc.len());
            copy.extend_from_slice(desc);
            st.known.push(Known {
                desc: copy,
                nseg: h.nseg,
                payload_len: h.payload_len,
                segs: segs.to_vec(),
            });
            return;
        }
        // In the place of the oldest, reusing its buffers.
        let k = &mut st.known[st.known_next];
        st.known_next = (st.known_next + 1) % KNOWN_ENTRIES;
        k.desc.clear();
        k.desc.extend_from_slice(desc);
        k.segs.clear();
        k.segs.extend_from_slice(segs);
        k.nseg = h.nseg;
        k.payload_len = h.payload_len;
    }

    fn recv_after_header(
        &mut self,
        hb: &[u8; HEADER_LEN],
        desc: &mut AlignedVec<16>,
        out: &mut [Tensor],
        paths: Option<&[Vec<Key>]>,
        deadline: Deadline,
        mut sink: Option<(usize, &mut Sink<'_>)>,
    ) -> Result<Value> {
        let link = self.link;
        let h = Header::decode(hb, &link.limits)?;
        match h.kind {
            k if k == self.expect => {}
            FrameKind::Abort => {}
            k @ (FrameKind::Message | FrameKind::Control) => {
                return Err(protocol(
                    "recv",
                    format!(
                        "a {} where a {} was expected: the two ends disagree about what \
                         this connection carries (a collective's control message meets a user \
                         receive, or a user message meets a collective)",
                        frame_name(k),
                        frame_name(self.expect)
                    ),
                ));
            }
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
        desc.clear();
        desc.reserve((h.desc_len as usize).min(DESC_CHUNK));
        while desc.len() < h.desc_len as usize {
            let at = desc.len();
            // Doubling from DESC_CHUNK: at most twice what arrived is committed.
            desc.resize((at + at.max(DESC_CHUNK)).min(h.desc_len as usize), 0);
            link.read_in_frame(&mut desc[at..], deadline, "a message descriptor")?;
        }
        let d = wire::access_descriptor(desc)?;
        let segs = wire::check_descriptor(d, &h, &link.limits)?;
        if h.kind == self.expect {
            self.remember(&h, desc, &segs);
        }
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
                    && link
                        .shm
                        .as_ref()
                        .is_some_and(|x| s.len >= x.peer_cma_threshold);
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
                let r = if to_out && let Some((grain, f)) = sink.as_mut() {
                    let j = order[out_i];
                    out_i += 1;
                    if out[j].device() != Device::Cpu {
                        return Err(protocol(
                            "recv",
                            "a streamed receive into device memory (a bug: please report it)",
                        ));
                    }
                    if dev_seg.is_some() || via_ipc {
                        // Device memory of the sender (staged, or by CUDA IPC): into host
                        // memory whole first, then to the sink.
                        let mut tmp = Tensor::new(
                            out[j].dtype(),
                            out[j].shape().to_vec(),
                            Buf::with_len(len)?,
                        )?;
                        self.fill_tensor(&mut tmp, len, via_cma, via_ipc, dev_seg, deadline)
                            .and_then(|_| feed(tmp.bytes().unwrap_or(&[]), &mut **f))
                            .map(|_| Filled::Out(j))
                    } else {
                        self.fill_streamed(len, *grain, via_cma, deadline, &mut **f)
                            .map(|_| Filled::Out(j))
                    }
                } else if to_out {
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

    /// Fills `dst` with the next segment (through the stream, or by cross-memory attach).
    pub(super) fn fill(&mut self, dst: &mut [u8], via_cma: bool, deadline: Deadline) -> Result<()> {
        let link = self.link;
        if !via_cma {
            if let Some(s) = &link.shm
                && dst.len() >= crate::buffer::STREAMING_MIN
            {
                // A segment larger than the caches: written once, so it goes to memory without
                // first reading each destination line from it.
                return s.read_exact_with(dst, deadline, "a message payload", true);
            }
            return link.read_in_frame(dst, deadline, "a message payload");
        }
        let addr = self.read_record_of(dst.len(), deadline)?;
        self.cma_read(addr, dst)
    }

    /// The next cross-memory record, which must stand for a `len`-byte segment: its address.
    fn read_record_of(&mut self, len: usize, deadline: Deadline) -> Result<u64> {
        let (addr, n) = self.read_record(deadline)?;
        if n != len as u64 {
            return Err(protocol(
                "recv",
                format!("cross-memory record of {n} bytes for a {len}-byte segment"),
            ));
        }
        Ok(addr)
    }

    /// Copies `dst.len()` bytes from the sender's address `addr` (cross-memory attach).
    fn cma_read(&self, addr: u64, dst: &mut [u8]) -> Result<()> {
        let s = self.link.shm.as_ref().expect("cma implies shm");
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

    /// The next segment, `len` bytes of `grain`-byte elements, handed to `sink` in pieces of at
    /// most [`PIECE`] bytes: where they lie in a shared-memory ring, read through a buffer from
    /// a socket, or `CMA_PIECE` bytes by cross-memory attach; see [`RecvGuard::recv_streamed`].
    fn fill_streamed(
        &mut self,
        len: usize,
        grain: usize,
        via_cma: bool,
        deadline: Deadline,
        sink: &mut Sink<'_>,
    ) -> Result<()> {
        let addr = if via_cma {
            Some(self.read_record_of(len, deadline)?)
        } else {
            None
        };
        if addr.is_none()
            && let Some(s) = self.link.shm.as_ref()
        {
            // Straight from the ring: the piece buffer's copy (a write and a read of every
            // byte) is saved.
            return s.read_lent(len, grain, PIECE, deadline, "a message payload", sink);
        }
        // A cross-memory read costs a system call that pins the sender's pages: its pieces are
        // larger (still within a core's cache here), so that the calls stay few.
        let most = if addr.is_some() { CMA_PIECE } else { PIECE };
        let mut piece = std::mem::take(&mut self.state.scratch);
        if piece.len() < len.min(most) {
            piece.resize(len.min(most), 0);
        }
        let r = (|| {
            let mut off = 0usize;
            while off < len {
                let n = (len - off).min(piece.len()).min(most);
                let b = &mut piece[..n];
                match addr {
                    Some(a) => self.cma_read(a + off as u64, b)?,
                    None => self.link.read_in_frame(b, deadline, "a message payload")?,
                }
                sink(off, b)?;
                off += n;
            }
            Ok(())
        })();
        self.state.scratch = piece;
        r
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
    pub(super) fn skip(&mut self, len: usize, via_cma: bool, deadline: Deadline) -> Result<()> {
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

//! Pipelined ring all-reduce: reduce-scatter, then all-gather, chunk by chunk, for host or
//! device memory alike. The algorithm (segments, chunks, order on the wire) is one function,
//! `all_reduce_in`; what differs between a CPU and a CUDA buffer is the `Memory` it runs
//! on: where the bytes live, the kernel that combines a received chunk into them (the SIMD CPU
//! kernels, or the NVRTC device kernels), and how a chunk moves (the links carry host bytes as
//! they are, and device memory by CUDA IPC inside a host or staged through pinned host memory).
//! `Host` is host memory; the Tree's GPU path brings device memory (`tree/gpu_ring.rs`).
//!
//! The buffer is cut into `p` segments (the first `count % p` one element longer). In step `s`
//! of the reduce-scatter, the rank at ring position `pos` sends segment `(pos - s) mod p` to its
//! right neighbour while it receives segment `(pos - s - 1) mod p` from its left one and reduces
//! it into its own copy; after `p - 1` steps it holds segment `(pos + 1) mod p` fully reduced,
//! and the all-gather passes the reduced segments around the ring the same way.
//!
//! Invariants:
//! - RING-1: each segment is reduced along the ring in ring order, starting at the rank after
//!   its owner, exactly once; the all-gather only copies (ALGO-1).
//! - RING-2: a step sends one segment while it receives another; the two never overlap and both
//!   lie in the buffer (checked, `disjoint`), and the sent one is not written before its sends
//!   completed (SEND-1: each step's sends live in a scope that ends with the step).
//! - RING-3: a reduce-scatter or an all-gather alone cuts the buffer into `p` equal parts, part
//!   q being rank q's (the ring holds every rank of the world once: checked), and numbers them
//!   so that the schedule's segment `pos + 1`, the one the rank at position `pos` ends holding
//!   reduced (or starts with, in an all-gather), is the part of that rank.

use super::{Communicator, SendScope};
use crate::ops::{self, Op};
use parallel_engine::endpoint::Conn;
use parallel_engine::link::Carry;
use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::Arc;

/// The buffer a ring all-reduce works on: where it lives, the reduce kernel that combines a
/// received chunk into it, and how its chunks move over the links (the copy engine).
pub(crate) trait Memory {
    /// Bytes in the buffer (whole elements of [`Memory::dtype`]).
    fn len(&self) -> usize;
    fn dtype(&self) -> DType;
    /// Makes room for receiving chunks of up to `chunk` bytes before reducing them.
    fn prepare(&mut self, chunk: usize) -> Result<()>;
    /// Starts sending bytes `r` of the buffer to `to` in `sends`.
    ///
    /// # Safety
    /// `r` lies in the buffer, and the caller writes none of it until `sends` ended (RING-2).
    unsafe fn send(&self, sends: &mut SendScope<'_>, to: &Arc<Conn>, r: Range<usize>)
    -> Result<()>;
    /// Receives rank `from`'s next message, exactly `r.len()` bytes, into bytes `r` of the
    /// buffer: combined into them with the reduce kernel when `reduce`, else replacing them.
    ///
    /// # Safety
    /// `r` lies in the buffer and overlaps no range being sent (RING-2).
    unsafe fn recv(
        &mut self,
        comm: &Communicator<'_>,
        from: usize,
        r: Range<usize>,
        reduce: bool,
    ) -> Result<()>;
    /// The op's last touch of the fully reduced bytes `r` (avg's division by `contributors`).
    fn finish(&mut self, r: Range<usize>, contributors: usize) -> Result<()>;
}

/// Host memory with the CPU reduce kernels ([`ops::reduce_into`]); the links send chunks from
/// it and receive into it without a copy of ours.
pub(crate) struct Host<'a> {
    ptr: *mut u8,
    len: usize,
    dtype: DType,
    op: &'a Op,
    _buf: PhantomData<&'a mut [u8]>,
}

impl<'a> Host<'a> {
    /// The ring's view of `buf` (elements of `dtype`), reduced with `op`; `buf` stays
    /// exclusively borrowed for as long as the view lives.
    pub(crate) fn new(buf: &'a mut [u8], dtype: DType, op: &'a Op) -> Host<'a> {
        Host {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
            dtype,
            op,
            _buf: PhantomData,
        }
    }

    /// Bytes `r` of the buffer, mutably.
    ///
    /// # Safety
    /// `r` lies in the buffer, and nothing else reads or writes it while the slice lives.
    unsafe fn bytes_mut(&mut self, r: Range<usize>) -> &mut [u8] {
        debug_assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: the caller's contract; `ptr` is valid for `len` bytes for 'a (the borrow).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len()) }
    }
}

impl Memory for Host<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn prepare(&mut self, _chunk: usize) -> Result<()> {
        // Received chunks are combined piece by piece as they arrive: no buffer to make.
        Ok(())
    }

    unsafe fn send(
        &self,
        sends: &mut SendScope<'_>,
        to: &Arc<Conn>,
        r: Range<usize>,
    ) -> Result<()> {
        debug_assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: `r` lies in the buffer (the caller's contract), borrowed for 'a.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr.add(r.start), r.len()) };
        // SAFETY: the caller writes none of `r` until the scope ended, and the buffer outlives
        // the scope (the ring's call borrows it).
        let v = unsafe { super::view(bytes) };
        // SAFETY: as above.
        unsafe { sends.send_value(to, v) };
        Ok(())
    }

    unsafe fn recv(
        &mut self,
        comm: &Communicator<'_>,
        from: usize,
        r: Range<usize>,
        reduce: bool,
    ) -> Result<()> {
        let (op, dtype) = (self.op, self.dtype);
        // Over TCP the kernel copies into the buffer itself; a shared ring's bytes are ours to
        // copy.
        let streaming = self.len >= parallel_engine::buffer::STREAMING_MIN
            && comm.link(from)?.link_kind() == parallel_engine::LinkKind::Shm;
        // SAFETY: the caller's contract: `r` lies in the buffer and no send reads it.
        let dst = unsafe { self.bytes_mut(r) };
        if !reduce && !streaming {
            return comm.recv_bytes(from, dst, "ring step");
        }
        // Each piece of the chunk is taken as it arrives: combined into the buffer while it is
        // still in the cache (a whole chunk received first would go to memory and back); or, in
        // the all-gather of a buffer larger than the caches, copied with stores that bypass
        // them (the bytes are written once and not read again here, so no line of the buffer
        // is read from memory first).
        // SAFETY: the view only describes the chunk for the receive's checks: a streamed
        // receive never writes through it, and `dst` outlives the call.
        let mut check = unsafe { super::out_view(dst) };
        let n = dst.len();
        let grain = if reduce { dtype.itemsize() } else { 1 };
        comm.recv_streamed(from, &mut check, grain, "ring step", &mut |off, piece| {
            let d = dst
                .get_mut(off..off + piece.len())
                .ok_or_else(|| too_long(off + piece.len(), n))?;
            if reduce {
                ops::reduce_into(op, dtype, d, piece)
            } else {
                parallel_engine::buffer::copy_streaming(d, piece);
                Ok(())
            }
        })
    }

    fn finish(&mut self, r: Range<usize>, contributors: usize) -> Result<()> {
        if matches!(self.op, Op::Avg) {
            if r.end > self.len || r.start > r.end {
                return Err(too_long(r.end, self.len));
            }
            // SAFETY: `r` lies in the buffer (checked), and no send is in flight (the ring
            // calls this between steps, whose scopes have ended).
            ops::divide(self.dtype, unsafe { self.bytes_mut(r) }, contributors);
        }
        Ok(())
    }
}

/// A chunk longer than the room the ring prepared for it (a bug).
pub(crate) fn too_long(n: usize, room: usize) -> Error {
    Error::new(
        ErrorKind::Protocol,
        "all_reduce",
        format!("a {n}-byte ring chunk exceeds its {room}-byte buffer (a bug: please report it)"),
    )
}

/// How the ring cuts its segments into chunks (each chunk is one message, so every rank of a
/// ring must cut alike: a rank serving a device ring from host memory cuts like device memory).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunking {
    /// Host memory: at least ~4 chunks per segment so the copy of one overlaps the reduction of
    /// the last, but not under 256 KiB, where per-chunk costs start to show, nor over the
    /// communicator's chunk.
    Host,
    /// Device memory: whole segments, up to this many bytes (each chunk by CUDA IPC costs a
    /// mapping and an event round trip, and staged transfers are pipelined inside the links).
    Device(usize),
}

impl Chunking {
    /// The chunk in bytes for `len` bytes of `item`-byte elements cut into `p` segments.
    fn bytes(self, len: usize, item: usize, p: usize, comm_chunk: usize) -> usize {
        let target = match self {
            Chunking::Host => (len / p / 4).max(256 << 10).min(comm_chunk),
            Chunking::Device(most) => len.div_ceil(p).min(most),
        };
        (target / item).max(1) * item
    }
}

/// All-reduce of `buf` (elements of `dtype`) with `op` over the ranks of `ring` (in that order),
/// which must include this rank. `contributors` divides the result of [`Op::Avg`].
pub fn all_reduce(
    comm: &Communicator<'_>,
    ring: &[usize],
    dtype: DType,
    buf: &mut [u8],
    op: &Op,
    contributors: usize,
) -> Result<()> {
    let mut mem = Host::new(buf, dtype, op);
    all_reduce_in(comm, ring, &mut mem, Chunking::Host, contributors)
}

/// Reduce-scatter of `buf` (elements of `dtype`, a multiple of the ring's length) with `op`
/// over the ranks of `ring`, every rank of the world once: afterwards part r of the buffer
/// (its r-th of `ring.len()` equal parts) holds, on rank r, the reduction of every rank's part
/// r; the other parts are left partly reduced. `contributors` divides the result of
/// [`Op::Avg`].
pub fn reduce_scatter(
    comm: &Communicator<'_>,
    ring: &[usize],
    dtype: DType,
    buf: &mut [u8],
    op: &Op,
    contributors: usize,
) -> Result<()> {
    let mut mem = Host::new(buf, dtype, op);
    run_in(
        comm,
        ring,
        &mut mem,
        Chunking::Host,
        contributors,
        Shape::ReduceScatter,
    )
}

/// All-gather in `buf` (elements of `dtype`, a multiple of the ring's length) over the ranks of
/// `ring`, every rank of the world once: part r of the buffer (its r-th of `ring.len()` equal
/// parts) holds rank r's piece on rank r before, and on every rank after.
pub fn all_gather(
    comm: &Communicator<'_>,
    ring: &[usize],
    dtype: DType,
    buf: &mut [u8],
) -> Result<()> {
    // (No reduction happens: the op is never called.)
    let mut mem = Host::new(buf, dtype, &Op::Sum);
    run_in(comm, ring, &mut mem, Chunking::Host, 1, Shape::AllGather)
}

/// What a ring run does with the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Both phases over `p` segments of elements (the first `count % p` one element longer),
    /// segment s moving as the module's comment says.
    AllReduce,
    /// The reduce-scatter phase alone, over `p` equal parts, numbered so that the rank at ring
    /// position `pos` ends with the part of its own rank (RING-3).
    ReduceScatter,
    /// The all-gather phase alone over the same parts: each rank's own part travels (RING-3).
    AllGather,
}

/// All-reduce of `mem` (host or device memory, with its reduce kernel and copy engine) over
/// the ranks of `ring` (in that order), which must include this rank, cut into chunks as
/// `chunking` says (alike on every rank). `contributors` divides the result of [`Op::Avg`].
pub(crate) fn all_reduce_in<M: Memory>(
    comm: &Communicator<'_>,
    ring: &[usize],
    mem: &mut M,
    chunking: Chunking,
    contributors: usize,
) -> Result<()> {
    run_in(comm, ring, mem, chunking, contributors, Shape::AllReduce)
}

/// The ring over `mem` as `shape` says (see [`all_reduce_in`]).
fn run_in<M: Memory>(
    comm: &Communicator<'_>,
    ring: &[usize],
    mem: &mut M,
    chunking: Chunking,
    contributors: usize,
    shape: Shape,
) -> Result<()> {
    let p = ring.len();
    let len = mem.len();
    let what = match shape {
        Shape::AllReduce => "all_reduce",
        Shape::ReduceScatter => "reduce_scatter",
        Shape::AllGather => "all_gather_into",
    };
    let item = mem.dtype().itemsize();
    let count = len / item;
    if shape != Shape::AllReduce {
        // RING-3: part q is rank q's; every rank of the world is in the ring once.
        let mut seen = vec![false; p];
        let whole = ring
            .iter()
            .all(|&r| r < p && !std::mem::replace(&mut seen[r], true));
        if !whole || count % p.max(1) != 0 {
            return Err(Error::new(
                ErrorKind::Protocol,
                what,
                format!(
                    "{count} elements cannot be cut into parts of ranks 0..{p} along the ring {ring:?} (a bug: please report it)"
                ),
            ));
        }
    }
    if p < 2 {
        return match shape {
            Shape::AllGather => Ok(()),
            _ => mem.finish(0..len, contributors),
        };
    }
    let pos = ring.iter().position(|r| *r == comm.rank()).ok_or_else(|| {
        Error::new(
            ErrorKind::Protocol,
            what,
            format!("rank {} is not in the ring {ring:?}", comm.rank()),
        )
    })?;
    let (left, right) = (ring[(pos + p - 1) % p], ring[(pos + 1) % p]);
    let rc = comm.link(right)?;
    comm.link(left)?;
    let seg = |s: usize| -> (usize, usize) {
        if shape != Shape::AllReduce {
            // RING-3: the schedule's segment s is the part of the rank at position s - 1,
            // which the rank at position pos ends holding for s = pos + 1.
            let part = ring[(s + p - 1) % p];
            return (part * (count / p) * item, (count / p) * item);
        }
        let base = count / p;
        let extra = count % p;
        let start = s * base + s.min(extra);
        let len = base + usize::from(s < extra);
        (start * item, len * item)
    };
    let chunk = chunking.bytes(len, item, p, comm.chunk());
    mem.prepare(chunk.min(len.max(1)))?;
    // One step: send segment `send_s` to the right while receiving segment `recv_s` from the
    // left, chunk by chunk; `reduce`: combine into our copy, else receive straight into it.
    // The sends live in a scope (SEND-1) that ends with the step, on every path, before any
    // later step writes the segment they read.
    let step = |mem: &mut M, send_s: usize, recv_s: usize, reduce: bool| -> Result<()> {
        let (so, sl) = seg(send_s);
        let (ro, rl) = seg(recv_s);
        disjoint(len, &(so..so + sl), &(ro..ro + rl))?;
        let chunks = sl.max(rl).div_ceil(chunk).max(1);
        SendScope::run(comm, |sends| {
            // Over shared memory, every chunk goes through the link's ring: the receiver
            // combines (or copies) it from there, piece by piece, while the sender writes the
            // next. A cross-memory copy from the sender's tensor instead costs the receiver
            // twice a memory copy's time (page pinning; measured, 64 MiB, 2 ranks: 12-16 ms
            // against 9-12 ms), and in a reduce-scatter step a copy more.
            sends.carry(Carry::Stream);
            for k in 0..chunks {
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(sl));
                if a < b || (k == 0 && sl == 0) {
                    // SAFETY: [so + a, so + b) lies in the send segment, inside the buffer and
                    // disjoint from the receive segment (checked above); nothing writes it
                    // before this scope ended (RING-2).
                    unsafe { mem.send(sends, rc, so + a..so + b.max(a))? };
                }
            }
            // The whole send segment is ready at the start of the step: all its chunks are
            // queued first, so the lane sends them back to back instead of waking once per
            // chunk (measured over TCP: ~175 context switches per 64 MiB op and rank before,
            // ~29 after, together with IO-1).
            for k in 0..chunks {
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(rl));
                if a < b || (k == 0 && rl == 0) {
                    let n = b.saturating_sub(a);
                    // SAFETY: [ro + a, ro + a + n) lies in the receive segment (as above),
                    // which no send of this step reads.
                    unsafe { mem.recv(comm, left, ro + a..ro + a + n, reduce)? };
                }
            }
            sends.wait_all(what)
        })
        .map_err(|e| {
            Error::new(
                e.kind(),
                what,
                format!("ring step (to rank {right}, from rank {left}): {e}"),
            )
        })
    };
    if shape != Shape::AllGather {
        for s in 0..p - 1 {
            step(mem, (pos + p - s) % p, (pos + p - s - 1) % p, true)?;
        }
        // Our fully reduced segment; no send is in flight (every step's scope ended).
        let (o, l) = seg((pos + 1) % p);
        mem.finish(o..o + l, contributors)?;
    }
    if shape != Shape::ReduceScatter {
        for s in 0..p - 1 {
            step(mem, (pos + 1 + p - s) % p, (pos + p - s) % p, false)?;
        }
    }
    Ok(())
}

/// Checks that ranges `send` and `recv` lie in a buffer of `len` bytes and do not overlap
/// (RING-2).
pub(crate) fn disjoint(len: usize, send: &Range<usize>, recv: &Range<usize>) -> Result<()> {
    let inside = |r: &Range<usize>| r.start <= r.end && r.end <= len;
    let apart = send.end <= recv.start || recv.end <= send.start;
    if inside(send) && inside(recv) && apart {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Protocol,
        "all_reduce",
        format!(
            "ring segments {send:?} and {recv:?} of a {len}-byte buffer overlap (a bug: please report it)"
        ),
    ))
}

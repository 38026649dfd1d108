//! Pipelined ring all-reduce: reduce-scatter, then all-gather, chunk by chunk (moved from the
//! Tree unchanged: same segments, same chunks, same order on the wire).
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
//! - RING-2: a step sends one segment while it receives another; the two never overlap (checked,
//!   [`disjoint`]), and the sent one is not written before its sends completed (SEND-1).
//! - RING-3: the last reduce-scatter step and the first all-gather step run as one turn: each
//!   chunk of this rank's own segment is sent on as soon as it is final (reduced, divided for
//!   an average), while still in cache; the frames on every link, and their order, are those
//!   of the two steps run one after the other. For 2 ranks the bytes the turn sends first are
//!   the bytes it receives last: their sends complete before the first of those is written.

use super::{Communicator, SendScope};
use crate::ops::{self, Op};
use parallel_engine::buffer::Buf;
use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result};

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
    let p = ring.len();
    if p < 2 {
        if matches!(op, Op::Avg) {
            ops::divide(dtype, buf, contributors);
        }
        return Ok(());
    }
    let item = dtype.itemsize();
    let count = buf.len() / item;
    let pos = ring.iter().position(|r| *r == comm.rank()).ok_or_else(|| {
        Error::new(
            ErrorKind::Protocol,
            "all_reduce",
            format!("rank {} is not in the ring {ring:?}", comm.rank()),
        )
    })?;
    let (left, right) = (ring[(pos + p - 1) % p], ring[(pos + 1) % p]);
    let rc = comm.link(right)?;
    comm.link(left)?;
    let seg = |s: usize| -> (usize, usize) {
        let base = count / p;
        let extra = count % p;
        let start = s * base + s.min(extra);
        let len = base + usize::from(s < extra);
        (start * item, len * item)
    };
    // At least ~4 chunks per segment so the copy of one overlaps the reduction of the last, but
    // not under 256 KiB, where per-chunk costs start to show.
    let target = (buf.len() / p / 4).max(256 << 10).min(comm.chunk());
    let chunk = (target / item).max(1) * item;
    let mut scratch = Buf::with_len(chunk.min(buf.len().max(1)))?;
    // One step: send segment `send_s` to the right while receiving segment `recv_s` from the
    // left, chunk by chunk; `reduce`: combine into our copy, else receive straight into it.
    // The sends borrow the send segment through a scope (SEND-1): the borrow checker keeps
    // it unwritten until they completed, and an early `?` waits for (or interrupts) them.
    let step = |buf: &mut [u8],
                scratch: &mut [u8],
                send_s: usize,
                recv_s: usize,
                reduce: bool|
     -> Result<()> {
        let (so, sl) = seg(send_s);
        let (ro, rl) = seg(recv_s);
        let (send, recv) = disjoint(buf, so..so + sl, ro..ro + rl)?;
        let chunks = sl.max(rl).div_ceil(chunk).max(1);
        SendScope::run(comm, |sends| {
            // The whole send segment is ready at the start of the step: queue all its chunks
            // at once, so the lane sends them back to back instead of waking once per chunk.
            for k in 0..chunks {
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(sl));
                if a < b || (k == 0 && sl == 0) {
                    sends.send(rc, &send[a..b.max(a)]);
                }
            }
            for k in 0..chunks {
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(rl));
                if a < b || (k == 0 && rl == 0) {
                    let n = b.saturating_sub(a);
                    let dst = &mut recv[a..a + n];
                    // Reduce: receive into the scratch chunk, then combine; else straight into buf.
                    let into: &mut [u8] = if reduce { &mut scratch[..n] } else { &mut *dst };
                    comm.recv_bytes(left, into, "ring step")?;
                    if reduce {
                        ops::reduce_into(op, dtype, dst, &scratch[..n])?;
                    }
                }
            }
            sends.wait_all("all_reduce")
        })
        .map_err(|e| {
            Error::new(
                e.kind(),
                "all_reduce",
                format!("ring step to rank {right}: {e}"),
            )
        })
    };
    for s in 0..p - 2 {
        step(
            buf,
            &mut scratch,
            (pos + p - s) % p,
            (pos + p - s - 1) % p,
            true,
        )?;
    }
    // The last reduce-scatter step and the first all-gather step as one (RING-3).
    let segs: Vec<(usize, usize)> = (0..p).map(seg).collect();
    let avg = matches!(op, Op::Avg).then_some(contributors);
    let turn = Turn {
        comm,
        left,
        rc,
        chunk,
        dtype,
        op,
        avg,
    };
    turn.run(buf, &segs, (pos + 2) % p, (pos + 1) % p, pos, &mut scratch)
        .map_err(|e| {
            Error::new(
                e.kind(),
                "all_reduce",
                format!("ring step to rank {right}: {e}"),
            )
        })?;
    for s in 1..p - 1 {
        step(
            buf,
            &mut scratch,
            (pos + 1 + p - s) % p,
            (pos + p - s) % p,
            false,
        )?;
    }
    Ok(())
}

/// The byte ranges, relative to a segment of `len` bytes, of the messages that carry it:
/// `chunk` bytes each, the last one shorter, and one empty message for an empty segment (so
/// both ends of a link agree on the number of messages from the segment's length alone).
fn pieces(len: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len.div_ceil(chunk).max(1)).map(move |k| (k * chunk, ((k + 1) * chunk).min(len)))
}

/// The turn from reduce-scatter to all-gather (RING-3): this rank receives the last
/// contributions to its own segment chunk by chunk, and sends each chunk on to the right as
/// soon as it is final (divided for an average), while its bytes are still in cache, instead
/// of after the whole step; then it receives the left neighbour's final segment.
struct Turn<'c, 'a> {
    comm: &'c Communicator<'a>,
    left: usize,
    rc: &'c std::sync::Arc<parallel_engine::endpoint::Conn>,
    chunk: usize,
    dtype: DType,
    op: &'c Op,
    avg: Option<usize>,
}

impl Turn<'_, '_> {
    /// `send`: the segment the last reduce-scatter step sends; `own`: the one it completes
    /// here; `gather`: the one the first all-gather step receives (for 2 ranks, `send`).
    fn run(
        &self,
        buf: &mut [u8],
        segs: &[(usize, usize)],
        send: usize,
        own: usize,
        gather: usize,
        scratch: &mut [u8],
    ) -> Result<()> {
        let (oo, ol) = segs[own];
        let (so, sl) = segs[send];
        let (go, gl) = segs[gather];
        if send == own || gather == own {
            return Err(Error::new(
                ErrorKind::Protocol,
                "all_reduce",
                format!(
                    "ring turn with segments {send}, {own}, {gather} (a bug: please report it)"
                ),
            ));
        }
        // The own segment, and what lies before and after it (every other segment lies
        // wholly in one of the two: segments do not overlap).
        let (lo, hi) = buf.split_at_mut(oo);
        let (own_bytes, hi) = hi.split_at_mut(ol);
        let skip = oo + ol;
        SendScope::run(self.comm, |gathered| {
            // Our own segment's chunks are sent (all-gather) from the outer scope as they
            // become final; the reduce-scatter sends of `send` end with the inner scope,
            // before `gather` (for 2 ranks, the same bytes) is written.
            let mut rest: &mut [u8] = own_bytes;
            let s: &[u8] = if so < oo {
                &lo[so..so + sl]
            } else {
                &hi[so - skip..so - skip + sl]
            };
            SendScope::run(self.comm, |sends| {
                for (a, b) in pieces(sl, self.chunk) {
                    sends.send(self.rc, &s[a..b]);
                }
                for (a, b) in pieces(ol, self.chunk) {
                    let n = b - a;
                    let into = &mut scratch[..n];
                    self.comm.recv_bytes(self.left, into, "ring step")?;
                    let (head, tail) = std::mem::take(&mut rest).split_at_mut(n);
                    ops::reduce_into(self.op, self.dtype, head, &scratch[..n])?;
                    if let Some(c) = self.avg {
                        ops::divide(self.dtype, head, c);
                    }
                    gathered.send(self.rc, head);
                    rest = tail;
                }
                sends.wait_all("all_reduce")
            })?;
            let g: &mut [u8] = if go < oo {
                &mut lo[go..go + gl]
            } else {
                &mut hi[go - skip..go - skip + gl]
            };
            for (a, b) in pieces(gl, self.chunk) {
                self.comm.recv_bytes(self.left, &mut g[a..b], "ring step")?;
            }
            gathered.wait_all("all_reduce")
        })
    }
}

/// The bytes of range `send` (shared) and of range `recv` (exclusive) of `buf`, which must not
/// overlap: the ring sends one segment while it receives another (RING-2).
pub(crate) fn disjoint(
    buf: &mut [u8],
    send: std::ops::Range<usize>,
    recv: std::ops::Range<usize>,
) -> Result<(&[u8], &mut [u8])> {
    let bad = || {
        Error::new(
            ErrorKind::Protocol,
            "all_reduce",
            format!(
                "ring segments {send:?} and {recv:?} of a {}-byte buffer overlap (a bug: please report it)",
                buf.len()
            ),
        )
    };
    if send.end.max(recv.end) > buf.len() {
        return Err(bad());
    }
    if send.end <= recv.start {
        let (lo, hi) = buf.split_at_mut(recv.start);
        Ok((&lo[send], &mut hi[..recv.end - recv.start]))
    } else if recv.end <= send.start {
        let (lo, hi) = buf.split_at_mut(send.start);
        Ok((&hi[..send.end - send.start], &mut lo[recv]))
    } else {
        Err(bad())
    }
}

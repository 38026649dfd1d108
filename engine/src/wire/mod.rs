//! The wire format: a fixed 32-byte header, an rkyv-archived descriptor, raw payload segments.
//!
//! ```text
//! header   magic "PRL\x01" | version u16 | kind u8 | flags u8 | desc_len u32 | nseg u32 |
//!          payload_len u64 | seq u64                                 (little endian, 32 bytes)
//! desc     rkyv archive of Descriptor { nodes: [Node] (pre-order value tree), segments: [u64] }
//! payload  nseg segments back to back, lengths from the descriptor, summing to payload_len
//! ```
//! See docs/protocol.md for the full description.
//!
//! Invariants:
//! - WIRE-1: every length from the wire is checked against the limits before any allocation
//!   ([`Header::decode`] checks desc_len, nseg, payload_len; [`check_descriptor`] the rest).
//! - WIRE-2: the decoder needs no socket: it works on byte slices, so it is property-tested and
//!   fuzzed alone (fuzz/fuzz_targets/decode.rs).
//! - WIRE-3: the value tree is flat (pre-order with child counts), so validating untrusted input
//!   never recurses; depth is checked with an explicit stack.
//! - WIRE-4: segments are referenced by the tree exactly once each, in increasing order, so a
//!   receiver can stream them into their destinations in arrival order.
//!
//! Files: `header` (the fixed header and the limits), `descriptor` (the archived value tree),
//! `encode` (value to descriptor and segments), `decode` (the checks on untrusted descriptors
//! and the value built from them); whole frames in memory here.

mod decode;
mod descriptor;
mod encode;
mod header;
#[cfg(test)]
mod tests;

pub use decode::{
    Filled, access_descriptor, build_value, check_descriptor, match_paths, path_str, tensor_paths,
};
// All of it, with the `Archived*` and resolver types rkyv derives.
pub use descriptor::*;
pub use encode::{Desc, Encoded, OutSeg, encode};
pub use header::{FLAG_CMA, FLAG_CUDA_IPC, FrameKind, HEADER_LEN, Header, Limits, MAGIC, VERSION};

use crate::buffer::Buf;
use crate::error::{Result, protocol};
use crate::value::Value;
use rkyv::util::AlignedVec;

/// Decodes a whole frame held in memory (header, descriptor, payload): the fuzz and property
/// tests' entry point, and the reference for what a link does incrementally.
pub fn decode_frame(frame: &[u8], limits: &Limits) -> Result<(Header, Value)> {
    let hb: &[u8; HEADER_LEN] = frame
        .get(..HEADER_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| protocol("decode", "truncated header"))?;
    let h = Header::decode(hb, limits)?;
    let rest = &frame[HEADER_LEN..];
    let dl = h.desc_len as usize;
    if rest.len() < dl {
        return Err(protocol("decode", "truncated descriptor"));
    }
    let mut desc = AlignedVec::<16>::with_capacity(dl);
    desc.extend_from_slice(&rest[..dl]);
    let d = access_descriptor(&desc)?;
    let segs = check_descriptor(d, &h, limits)?;
    let mut payload = &rest[dl..];
    if (payload.len() as u64) < h.payload_len {
        return Err(protocol("decode", "truncated payload"));
    }
    let mut filled = Vec::with_capacity(segs.len());
    for s in &segs {
        let (a, b) = payload.split_at(s.len as usize);
        let mut buf = Buf::with_len(a.len())?;
        buf.copy_from_slice(a);
        filled.push(Filled::Buf(buf));
        payload = b;
    }
    Ok((h, build_value(d, &segs, filled)?))
}

/// Encodes a whole frame into one vector (tests and the handshake).
pub fn encode_frame(kind: FrameKind, seq: u64, v: &Value, limits: &Limits) -> Result<Vec<u8>> {
    let e = encode(v, limits)?;
    let h = Header {
        kind,
        flags: 0,
        desc_len: e.desc.len() as u32,
        nseg: e.segs.len() as u32,
        payload_len: e.payload_len,
        seq,
    };
    let mut out = Vec::with_capacity(HEADER_LEN + e.desc.len() + e.payload_len as usize);
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(&e.desc);
    for s in &e.segs {
        out.extend_from_slice(s.bytes());
    }
    Ok(out)
}

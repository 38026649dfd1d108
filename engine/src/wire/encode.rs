//! Encoding a value: its descriptor (refusing depth beyond the limit, WIRE-3) and the payload
//! segments to send after it, borrowed from the value where they can be.
//!
//! A thread keeps the archives of the last few small descriptors it made (`Memo`): a message
//! shaped like a recent one (the same nodes and segment lengths, floats compared by their bits)
//! shares the archive ([`Desc::Shared`]) instead of running the archiver again. The bytes are the archiver's own for that descriptor, so
//! nothing on the wire changes.

use super::descriptor::{Descriptor, Node, TensorNode};
use super::header::Limits;
use crate::buffer::Buf;
use crate::error::{Error, ErrorKind, Result};
use crate::value::{Device, Key, Value};
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use std::cell::RefCell;
use std::sync::Arc;

/// Descriptors up to this size are memoized.
pub const DESC_MEMO_MAX: usize = 512;
/// Descriptors each thread remembers.
const MEMO_ENTRIES: usize = 4;
/// A thread's scratch descriptor is kept for the next message up to this many nodes.
const SCRATCH_KEEP: usize = 64;

/// An archived descriptor's bytes: its own buffer, or one a thread remembers (shared, not copied).
#[derive(Clone)]
pub enum Desc {
    Own(AlignedVec),
    Shared(Arc<AlignedVec>),
}

impl std::ops::Deref for Desc {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Desc::Own(v) => v,
            Desc::Shared(v) => v,
        }
    }
}

impl std::fmt::Debug for Desc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Desc({} bytes)", self.len())
    }
}

/// A thread's recent descriptors and their archives, and the descriptor it fills next.
#[derive(Default)]
struct Memo {
    scratch: Descriptor,
    entries: Vec<(Descriptor, Arc<AlignedVec>)>,
    next: usize,
}

thread_local! {
    static MEMO: RefCell<Memo> = RefCell::new(Memo::default());
}

/// Equality of descriptors as archives see it: floats by their bits (0.0 and -0.0 archive
/// differently; a NaN equals itself), everything else as `==`.
fn same_archive(a: &Descriptor, b: &Descriptor) -> bool {
    a.segments == b.segments
        && a.nodes.len() == b.nodes.len()
        && a.nodes.iter().zip(&b.nodes).all(|(x, y)| match (x, y) {
            (Node::Float(p), Node::Float(q)) => p.to_bits() == q.to_bits(),
            _ => x == y,
        })
}

/// The archive of `d` if this thread made it recently.
fn recalled(d: &Descriptor) -> Option<Desc> {
    MEMO.try_with(|m| {
        let m = m.try_borrow().ok()?;
        m.entries
            .iter()
            .find(|(k, _)| same_archive(k, d))
            .map(|(_, b)| Desc::Shared(b.clone()))
    })
    .ok()
    .flatten()
}

/// Remembers an archive for the next messages of the same shape (in the place of the oldest,
/// whose vectors are reused).
fn remember(d: &Descriptor, archive: &Arc<AlignedVec>) {
    let _ = MEMO.try_with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            if m.entries.len() < MEMO_ENTRIES {
                m.entries.push((d.clone(), archive.clone()));
                return;
            }
            let i = m.next;
            m.next = (i + 1) % MEMO_ENTRIES;
            let e = &mut m.entries[i];
            e.0.nodes.clone_from(&d.nodes);
            e.0.segments.clone_from(&d.segments);
            e.1 = archive.clone();
        }
    });
}

/// This thread's scratch descriptor, emptied (a fresh one where the thread has none).
fn scratch() -> Descriptor {
    let mut d = MEMO
        .try_with(|m| {
            m.try_borrow_mut()
                .map(|mut m| std::mem::take(&mut m.scratch))
        })
        .ok()
        .and_then(|r| r.ok())
        .unwrap_or_default();
    d.nodes.clear();
    d.segments.clear();
    // Sized for the common small message (a handful of nodes) the first time.
    d.nodes.reserve(8);
    d.segments.reserve(4);
    d
}

/// Gives the scratch descriptor back for the thread's next message (not a large one).
fn give_back(d: Descriptor) {
    if d.nodes.capacity() > SCRATCH_KEEP || d.segments.capacity() > SCRATCH_KEEP {
        return;
    }
    let _ = MEMO.try_with(|m| {
        if let Ok(mut m) = m.try_borrow_mut() {
            m.scratch = d;
        }
    });
}

/// A payload segment to send: borrowed from the value, gathered into a buffer, or CUDA device
/// memory (staged or exported by the link; never read as host bytes).
#[derive(Debug)]
pub enum OutSeg<'a> {
    Borrowed(&'a [u8]),
    Owned(Buf),
    Device { ptr: u64, len: usize, dev: i32 },
}

impl OutSeg<'_> {
    /// The bytes of a host segment (empty for a device segment: see [`OutSeg::len`]).
    pub fn bytes(&self) -> &[u8] {
        match self {
            OutSeg::Borrowed(b) => b,
            OutSeg::Owned(b) => b,
            OutSeg::Device { .. } => &[],
        }
    }
    pub fn len(&self) -> usize {
        match self {
            OutSeg::Device { len, .. } => *len,
            _ => self.bytes().len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_device(&self) -> bool {
        matches!(self, OutSeg::Device { .. })
    }
}

/// An encoded message: archived descriptor plus the segments to send after it.
#[derive(Debug)]
pub struct Encoded<'a> {
    pub desc: Desc,
    pub segs: Vec<OutSeg<'a>>,
    pub payload_len: u64,
}

/// Encodes a value (refusing depth beyond the limit and `Value::Out`, which only receivers make).
pub fn encode<'a>(v: &'a Value, limits: &Limits) -> Result<Encoded<'a>> {
    let mut d = scratch();
    let r = walk(v, limits, &mut d).and_then(|segs| archive(&d, segs, limits));
    give_back(d);
    r
}

/// Fills `d` with `v`'s nodes and segment lengths (WIRE-3: depth checked on the way) and
/// returns the segments to send.
fn walk<'a>(v: &'a Value, limits: &Limits, d: &mut Descriptor) -> Result<Vec<OutSeg<'a>>> {
    enum Emit<'a> {
        Val(&'a Value, usize),
        Key(&'a Key),
    }
    let mut segs: Vec<OutSeg<'a>> = Vec::with_capacity(4);
    // Grows only for containers: a single value needs no stack.
    let mut stack: Vec<Emit<'a>> = Vec::new();
    let mut first = Some(Emit::Val(v, 0));
    while let Some(item) = first.take().or_else(|| stack.pop()) {
        let (v, depth) = match item {
            Emit::Key(Key::Str(s)) => {
                d.nodes.push(Node::Str(s.clone()));
                continue;
            }
            Emit::Key(Key::Int(i)) => {
                d.nodes.push(Node::Int(*i));
                continue;
            }
            Emit::Val(v, depth) => (v, depth),
        };
        if matches!(v, Value::List(_) | Value::Tuple(_) | Value::Dict(_))
            && depth >= limits.max_depth
        {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "send",
                format!(
                    "value nesting deeper than PARALLEL_MAX_VALUE_DEPTH ({})",
                    limits.max_depth
                ),
            ));
        }
        let seg = segs.len() as u32;
        let mut add_seg = |s: OutSeg<'a>| {
            d.segments.push(s.len() as u64);
            segs.push(s);
        };
        let node = match v {
            Value::None => Node::None,
            Value::Bool(b) => Node::Bool(*b),
            Value::Int(i) => Node::Int(*i),
            Value::Float(f) => Node::Float(*f),
            Value::Str(s) => Node::Str(s.clone()),
            Value::Bytes(b) => {
                add_seg(OutSeg::Borrowed(b));
                Node::Bytes(seg)
            }
            Value::Pickle(b) => {
                add_seg(OutSeg::Borrowed(b));
                Node::Pickle(seg)
            }
            Value::List(items) | Value::Tuple(items) => {
                stack.extend(items.iter().rev().map(|x| Emit::Val(x, depth + 1)));
                if matches!(v, Value::List(_)) {
                    Node::List(items.len() as u32)
                } else {
                    Node::Tuple(items.len() as u32)
                }
            }
            Value::Dict(items) => {
                for (k, x) in items.iter().rev() {
                    stack.push(Emit::Val(x, depth + 1));
                    stack.push(Emit::Key(k));
                }
                Node::Dict(items.len() as u32)
            }
            Value::Tensor(t) => {
                add_seg(match (t.device(), t.bytes()) {
                    (Device::Cuda(dev), _) => {
                        if !t.is_contiguous() {
                            return Err(Error::new(
                                ErrorKind::Unsupported,
                                "send",
                                "a non-contiguous CUDA tensor: send t.contiguous() (torch_parallel does this for you)",
                            ));
                        }
                        OutSeg::Device {
                            ptr: t.data_ptr() as u64,
                            len: t.nbytes(),
                            dev,
                        }
                    }
                    (_, Some(b)) => OutSeg::Borrowed(b),
                    (_, None) => OutSeg::Owned(t.contiguous_bytes()?),
                });
                let (device, device_index) = match t.device() {
                    Device::Cpu => (0, 0),
                    Device::Cuda(i) => (1, i),
                };
                Node::Tensor(TensorNode {
                    dtype: t.dtype() as u8,
                    device,
                    device_index,
                    shape: t.shape().iter().map(|x| *x as u64).collect(),
                    seg,
                })
            }
            Value::Out(_) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "send",
                    "Value::Out only appears in received values; send the tensor itself",
                ));
            }
        };
        d.nodes.push(node);
    }
    if segs.len() > limits.max_segments {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "send",
            format!(
                "{} tensors and bytes objects exceed PARALLEL_MAX_SEGMENTS ({})",
                segs.len(),
                limits.max_segments
            ),
        ));
    }
    Ok(segs)
}

/// The archive of a walked descriptor (recalled when this thread made it recently), checked
/// against the descriptor limit.
fn archive<'a>(d: &Descriptor, segs: Vec<OutSeg<'a>>, limits: &Limits) -> Result<Encoded<'a>> {
    let payload_len = d.segments.iter().sum();
    let desc = match recalled(d) {
        Some(desc) => desc,
        None => archive_new(d)?,
    };
    if desc.len() as u64 > limits.max_descriptor {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "send",
            format!(
                "descriptor of {} bytes exceeds PARALLEL_MAX_DESCRIPTOR ({}): send large strings as bytes",
                desc.len(),
                limits.max_descriptor
            ),
        ));
    }
    Ok(Encoded {
        desc,
        segs,
        payload_len,
    })
}

/// Runs the archiver on `d` (and remembers a small archive).
fn archive_new(d: &Descriptor) -> Result<Desc> {
    // Written into a buffer sized for it up front (a node archives to at most 32 bytes plus its
    // shape or string), not grown from empty.
    let estimate = 64
        + 32 * d.nodes.len()
        + 8 * d.segments.len()
        + d.nodes
            .iter()
            .map(|n| match n {
                Node::Str(s) => s.len() + 16,
                Node::Tensor(t) => 8 * t.shape.len() + 16,
                _ => 0,
            })
            .sum::<usize>();
    let desc = rkyv::api::high::to_bytes_in::<_, RkyvError>(d, AlignedVec::with_capacity(estimate))
        .map_err(|e| {
            Error::new(
                ErrorKind::Resource,
                "send",
                format!("cannot archive the descriptor: {e}"),
            )
        })?;
    Ok(if desc.len() <= DESC_MEMO_MAX {
        let shared = Arc::new(desc);
        remember(d, &shared);
        Desc::Shared(shared)
    } else {
        Desc::Own(desc)
    })
}

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

use crate::buffer::Buf;
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::value::{DType, Device, Key, Tensor, Value, byte_len};
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

pub const MAGIC: [u8; 4] = *b"PRL\x01";
pub const VERSION: u16 = 1;
pub const HEADER_LEN: usize = 32;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// Client's first frame (version, host identity, nonce, wishes).
    Hello = 1,
    /// Server's answer to Hello (its identity, nonce, proof, link offer).
    Welcome = 2,
    /// Client's proof of the shared secret.
    Auth = 3,
    /// Server accepted the client.
    Ready = 4,
    /// Server refused the client; the descriptor carries the reason.
    Refuse = 5,
    /// A user message.
    Message = 16,
    /// Orderly close: the sender will send nothing more.
    Close = 17,
    /// The sender abandoned what the two ends were doing (a collective whose rank died, say);
    /// the descriptor carries `{"reason": str}`, no segments; a Close follows.
    Abort = 18,
}

impl FrameKind {
    fn from_u8(v: u8) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Welcome,
            3 => FrameKind::Auth,
            4 => FrameKind::Ready,
            5 => FrameKind::Refuse,
            16 => FrameKind::Message,
            17 => FrameKind::Close,
            18 => FrameKind::Abort,
            _ => return None,
        })
    }
}

/// Header flag: large segments of this message travel by cross-memory attach (shm links only).
pub const FLAG_CMA: u8 = 1;
/// Header flag: CUDA tensor segments of this message are CUDA IPC records (shm links only).
pub const FLAG_CUDA_IPC: u8 = 2;

/// Limits applied to everything decoded.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_descriptor: u64,
    pub max_payload: u64,
    pub max_segments: usize,
    pub max_depth: usize,
}

impl Limits {
    pub fn from_config() -> Limits {
        let c = crate::config::config();
        Limits {
            max_descriptor: c.max_descriptor,
            max_payload: c.max_frame,
            max_segments: c.max_segments,
            max_depth: c.max_value_depth,
        }
    }
}

/// A decoded, checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub flags: u8,
    pub desc_len: u32,
    pub nseg: u32,
    pub payload_len: u64,
    pub seq: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&VERSION.to_le_bytes());
        b[6] = self.kind as u8;
        b[7] = self.flags;
        b[8..12].copy_from_slice(&self.desc_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.nseg.to_le_bytes());
        b[16..24].copy_from_slice(&self.payload_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.seq.to_le_bytes());
        b
    }

    /// Decodes and checks a header against the limits (WIRE-1).
    pub fn decode(b: &[u8; HEADER_LEN], limits: &Limits) -> Result<Header> {
        if b[0..4] != MAGIC {
            return Err(protocol(
                "decode",
                format!(
                    "bad magic {:02x?}: the peer is not speaking Parallel's protocol (a different program on this port?)",
                    &b[0..4]
                ),
            ));
        }
        let version = u16::from_le_bytes([b[4], b[5]]);
        if version != VERSION {
            return Err(protocol(
                "decode",
                format!(
                    "the peer speaks wire version {version}, this build speaks {VERSION}: run the same torch_parallel version on both ends"
                ),
            ));
        }
        let kind = FrameKind::from_u8(b[6])
            .ok_or_else(|| protocol("decode", format!("unknown frame kind {}", b[6])))?;
        let h = Header {
            kind,
            flags: b[7],
            desc_len: u32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
            nseg: u32::from_le_bytes(b[12..16].try_into().expect("4 bytes")),
            payload_len: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            seq: u64::from_le_bytes(b[24..32].try_into().expect("8 bytes")),
        };
        if h.flags & !(FLAG_CMA | FLAG_CUDA_IPC) != 0 {
            return Err(protocol(
                "decode",
                format!("unknown header flags {:#04x}", h.flags),
            ));
        }
        if u64::from(h.desc_len) > limits.max_descriptor {
            return Err(protocol(
                "decode",
                format!(
                    "descriptor of {} bytes exceeds PARALLEL_MAX_DESCRIPTOR ({})",
                    h.desc_len, limits.max_descriptor
                ),
            ));
        }
        if h.nseg as usize > limits.max_segments {
            return Err(protocol(
                "decode",
                format!(
                    "{} segments exceed PARALLEL_MAX_SEGMENTS ({})",
                    h.nseg, limits.max_segments
                ),
            ));
        }
        if h.payload_len > limits.max_payload {
            return Err(protocol(
                "decode",
                format!(
                    "payload of {} bytes exceeds PARALLEL_MAX_FRAME ({})",
                    h.payload_len, limits.max_payload
                ),
            ));
        }
        Ok(h)
    }
}

/// One node of the pre-order value tree (WIRE-3).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Node {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// Bytes in payload segment `n`.
    Bytes(u32),
    /// A list of the next `n` values.
    List(u32),
    Tuple(u32),
    /// A dict of the next `n` key/value pairs (2n nodes; keys are Str or Int nodes).
    Dict(u32),
    Tensor(TensorNode),
    /// A pickle in payload segment `n`.
    Pickle(u32),
}

/// A tensor's metadata; its contiguous C-order bytes are payload segment `seg`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct TensorNode {
    pub dtype: u8,
    /// 0: CPU, 1: CUDA.
    pub device: u8,
    pub device_index: i32,
    pub shape: Vec<u64>,
    pub seg: u32,
}

/// The archived part of a frame.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Descriptor {
    pub nodes: Vec<Node>,
    pub segments: Vec<u64>,
}

/// What a checked payload segment is.
#[derive(Debug, Clone, PartialEq)]
pub enum SegKind {
    Tensor {
        dtype: DType,
        shape: Vec<usize>,
        device: Device,
    },
    Bytes,
    Pickle,
}

/// A payload segment as announced by a checked descriptor.
#[derive(Debug, Clone, PartialEq)]
pub struct SegInfo {
    pub len: u64,
    pub kind: SegKind,
}

/// Validates archived descriptor bytes and returns the archived view (zero-copy).
pub fn access_descriptor(bytes: &[u8]) -> Result<&ArchivedDescriptor> {
    rkyv::access::<ArchivedDescriptor, RkyvError>(bytes)
        .map_err(|e| protocol("decode", format!("malformed descriptor: {e}")))
}

/// Checks a descriptor's tree against the header and limits; returns its segments in order
/// (WIRE-1, WIRE-3, WIRE-4).
pub fn check_descriptor(
    d: &ArchivedDescriptor,
    h: &Header,
    limits: &Limits,
) -> Result<Vec<SegInfo>> {
    if d.segments.len() != h.nseg as usize {
        return Err(protocol(
            "decode",
            format!(
                "header announces {} segments, descriptor lists {}",
                h.nseg,
                d.segments.len()
            ),
        ));
    }
    let mut total: u64 = 0;
    for s in d.segments.iter() {
        total = total
            .checked_add(s.to_native())
            .ok_or_else(|| protocol("decode", "segment lengths overflow"))?;
    }
    if total != h.payload_len {
        return Err(protocol(
            "decode",
            format!(
                "segments sum to {total} bytes, header announces {}",
                h.payload_len
            ),
        ));
    }
    if d.nodes.is_empty() {
        return Err(protocol("decode", "empty value tree"));
    }
    let mut segs: Vec<SegInfo> = Vec::with_capacity(d.segments.len());
    // Explicit stack of "children still expected" per open container (WIRE-3).
    let mut stack: Vec<(u64, bool)> = Vec::new(); // (remaining nodes, is_dict)
    let mut roots = 0usize;
    for (i, node) in d.nodes.iter().enumerate() {
        if stack.is_empty() {
            roots += 1;
            if roots > 1 {
                return Err(protocol(
                    "decode",
                    format!("value tree has trailing nodes at {i}"),
                ));
            }
        }
        // A dict's key position: even remaining count within a dict means "key expected".
        if let Some((rem, true)) = stack.last()
            && rem % 2 == 0
            && !matches!(node, ArchivedNode::Str(_) | ArchivedNode::Int(_))
        {
            return Err(protocol(
                "decode",
                format!("dict key at node {i} is not a str or int"),
            ));
        }
        if let Some(top) = stack.last_mut() {
            top.0 -= 1;
        }
        let mut seg_of = |seg: u32, kind: SegKind| -> Result<()> {
            if seg as usize != segs.len() || seg as usize >= d.segments.len() {
                return Err(protocol(
                    "decode",
                    format!("node {i} references segment {seg} out of order"),
                ));
            }
            segs.push(SegInfo {
                len: d.segments[seg as usize].to_native(),
                kind,
            });
            Ok(())
        };
        let children: u64 = match node {
            ArchivedNode::List(n) | ArchivedNode::Tuple(n) => u64::from(n.to_native()),
            ArchivedNode::Dict(n) => 2 * u64::from(n.to_native()),
            ArchivedNode::Bytes(s) => {
                seg_of(s.to_native(), SegKind::Bytes)?;
                0
            }
            ArchivedNode::Pickle(s) => {
                seg_of(s.to_native(), SegKind::Pickle)?;
                0
            }
            ArchivedNode::Tensor(t) => {
                let dtype = DType::from_code(t.dtype)
                    .ok_or_else(|| protocol("decode", format!("unknown dtype code {}", t.dtype)))?;
                let device = match t.device {
                    0 => Device::Cpu,
                    1 => Device::Cuda(t.device_index.to_native()),
                    d => return Err(protocol("decode", format!("unknown device kind {d}"))),
                };
                let shape: Vec<usize> = t
                    .shape
                    .iter()
                    .map(|x| usize::try_from(x.to_native()))
                    .collect::<std::result::Result<_, _>>()
                    .map_err(|_| {
                        protocol("decode", "tensor dimension exceeds the address space")
                    })?;
                let want = byte_len(dtype, &shape)?;
                let seg = t.seg.to_native();
                let have = d.segments.get(seg as usize).map(|s| s.to_native());
                if have != Some(want) {
                    return Err(protocol(
                        "decode",
                        format!(
                            "tensor {} {shape:?} needs {want} bytes, its segment has {have:?}",
                            dtype.name()
                        ),
                    ));
                }
                seg_of(
                    seg,
                    SegKind::Tensor {
                        dtype,
                        shape,
                        device,
                    },
                )?;
                0
            }
            _ => 0,
        };
        if children > 0 {
            if stack.len() >= limits.max_depth {
                return Err(protocol(
                    "decode",
                    format!(
                        "value nesting deeper than PARALLEL_MAX_VALUE_DEPTH ({})",
                        limits.max_depth
                    ),
                ));
            }
            if children > d.nodes.len() as u64 {
                return Err(protocol(
                    "decode",
                    format!(
                        "container at node {i} claims {children} children, the tree has {} nodes",
                        d.nodes.len()
                    ),
                ));
            }
            stack.push((children, matches!(node, ArchivedNode::Dict(_))));
        }
        while stack.last().is_some_and(|(rem, _)| *rem == 0) {
            stack.pop();
        }
    }
    if !stack.is_empty() {
        return Err(protocol("decode", "value tree ends inside a container"));
    }
    if segs.len() != d.segments.len() {
        return Err(protocol("decode", "descriptor lists segments no node uses"));
    }
    Ok(segs)
}

/// A received segment, ready to be placed in the value tree.
#[derive(Debug)]
pub enum Filled {
    /// Bytes received into a new buffer.
    Buf(Buf),
    /// The i-th caller-provided output tensor was filled in place.
    Out(usize),
    /// A tensor received into memory of the receiver's choosing (a new CUDA tensor, or a CPU
    /// tensor for a CUDA segment that cannot land on a device here).
    Tensor(Tensor),
}

/// Builds the value from a checked descriptor and its received segments (in order).
pub fn build_value(d: &ArchivedDescriptor, segs: &[SegInfo], filled: Vec<Filled>) -> Result<Value> {
    let mut filled = filled.into_iter();
    let mut seg_i = 0usize;
    // Build bottom-up with an explicit stack of partially built containers (no recursion).
    enum Open {
        List(Vec<Value>, usize),
        Tuple(Vec<Value>, usize),
        Dict(Vec<(Key, Value)>, Option<Key>, usize),
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut result: Option<Value> = None;
    for node in d.nodes.iter() {
        let mut v = match node {
            ArchivedNode::None => Value::None,
            ArchivedNode::Bool(b) => Value::Bool(*b),
            ArchivedNode::Int(i) => Value::Int(i.to_native()),
            ArchivedNode::Float(f) => Value::Float(f.to_native()),
            ArchivedNode::Str(s) => Value::Str(s.as_str().to_string()),
            ArchivedNode::List(n) => {
                stack.push(Open::List(
                    Vec::with_capacity((n.to_native() as usize).min(4096)),
                    n.to_native() as usize,
                ));
                if n.to_native() > 0 {
                    continue;
                } else {
                    let Some(Open::List(l, _)) = stack.pop() else {
                        unreachable!()
                    };
                    Value::List(l)
                }
            }
            ArchivedNode::Tuple(n) => {
                stack.push(Open::Tuple(Vec::new(), n.to_native() as usize));
                if n.to_native() > 0 {
                    continue;
                } else {
                    let Some(Open::Tuple(l, _)) = stack.pop() else {
                        unreachable!()
                    };
                    Value::Tuple(l)
                }
            }
            ArchivedNode::Dict(n) => {
                stack.push(Open::Dict(Vec::new(), None, n.to_native() as usize));
                if n.to_native() > 0 {
                    continue;
                } else {
                    let Some(Open::Dict(l, _, _)) = stack.pop() else {
                        unreachable!()
                    };
                    Value::Dict(l)
                }
            }
            ArchivedNode::Bytes(_) | ArchivedNode::Pickle(_) | ArchivedNode::Tensor(_) => {
                let f = filled
                    .next()
                    .ok_or_else(|| protocol("decode", "missing segment"))?;
                let info = &segs[seg_i];
                seg_i += 1;
                match (f, &info.kind) {
                    (Filled::Out(i), _) => Value::Out(i),
                    (Filled::Tensor(t), SegKind::Tensor { .. }) => Value::Tensor(t),
                    (Filled::Tensor(_), _) => {
                        return Err(protocol("decode", "tensor placed in a bytes segment"));
                    }
                    (Filled::Buf(b), SegKind::Bytes) => Value::Bytes(b),
                    (Filled::Buf(b), SegKind::Pickle) => Value::Pickle(b),
                    (Filled::Buf(b), SegKind::Tensor { dtype, shape, .. }) => {
                        Value::Tensor(Tensor::new(*dtype, shape.clone(), b)?)
                    }
                }
            }
        };
        // Attach v to the innermost open container; close containers that become complete.
        loop {
            match stack.last_mut() {
                None => {
                    result = Some(v);
                    break;
                }
                Some(Open::List(items, want)) | Some(Open::Tuple(items, want)) => {
                    items.push(v);
                    if items.len() < *want {
                        break;
                    }
                }
                Some(Open::Dict(items, key, want)) => {
                    match key.take() {
                        None => {
                            *key = Some(match &mut v {
                                Value::Str(s) => Key::Str(std::mem::take(s)),
                                Value::Int(i) => Key::Int(*i),
                                _ => {
                                    return Err(protocol("decode", "dict key is not a str or int"));
                                }
                            });
                            break;
                        }
                        Some(k) => items.push((k, v)),
                    }
                    if items.len() < *want {
                        break;
                    }
                }
            }
            v = match stack.pop().expect("non-empty") {
                Open::List(l, _) => Value::List(l),
                Open::Tuple(l, _) => Value::Tuple(l),
                Open::Dict(l, _, _) => Value::Dict(l),
            };
        }
    }
    result.ok_or_else(|| protocol("decode", "empty value tree"))
}

/// The path of each tensor of a checked descriptor (list/tuple indices as `Key::Int`, dict keys),
/// in segment order, found with an explicit stack (WIRE-3).
pub fn tensor_paths(d: &ArchivedDescriptor) -> Vec<Vec<Key>> {
    struct Open {
        /// Nodes still to come in this container.
        left: u64,
        dict: bool,
        /// The next child's index (lists, tuples), or the key just read (dicts).
        index: i64,
        key: Option<Key>,
        /// This container's own place in its parent (None for the root).
        at: Option<Key>,
    }
    let mut stack: Vec<Open> = Vec::new();
    let mut paths = Vec::new();
    for node in d.nodes.iter() {
        let mut at = None;
        if let Some(top) = stack.last_mut() {
            top.left = top.left.saturating_sub(1);
            if top.dict && top.left % 2 == 1 {
                top.key = match node {
                    ArchivedNode::Str(s) => Some(Key::Str(s.as_str().to_string())),
                    ArchivedNode::Int(i) => Some(Key::Int(i.to_native())),
                    _ => None,
                };
                continue;
            }
            at = if top.dict {
                top.key.take()
            } else {
                top.index += 1;
                Some(Key::Int(top.index - 1))
            };
        }
        let children = match node {
            ArchivedNode::List(n) | ArchivedNode::Tuple(n) => u64::from(n.to_native()),
            ArchivedNode::Dict(n) => 2 * u64::from(n.to_native()),
            ArchivedNode::Tensor(_) => {
                let mut p: Vec<Key> = stack.iter().filter_map(|o| o.at.clone()).collect();
                p.extend(at.clone());
                paths.push(p);
                0
            }
            _ => 0,
        };
        if children > 0 {
            stack.push(Open {
                left: children,
                dict: matches!(node, ArchivedNode::Dict(_)),
                index: 0,
                key: None,
                at,
            });
        }
        while stack.last().is_some_and(|o| o.left == 0) {
            stack.pop();
        }
    }
    paths
}

/// `value['a'][0]`, as Python indexes it.
pub fn path_str(path: &[Key]) -> String {
    let mut s = String::from("value");
    for k in path {
        match k {
            Key::Int(i) => s.push_str(&format!("[{i}]")),
            Key::Str(k) => s.push_str(&format!("[{}]", format!("{k:?}").replace('"', "'"))),
        }
    }
    s
}

/// For each of a message's tensors (their paths, in segment order), the index of the receiver's
/// tensor at the same path; or why they do not correspond.
pub fn match_paths(
    incoming: &[Vec<Key>],
    outs: &[Vec<Key>],
) -> std::result::Result<Vec<usize>, String> {
    let mut by_path: std::collections::HashMap<&[Key], usize> = std::collections::HashMap::new();
    for (j, p) in outs.iter().enumerate() {
        by_path.insert(p, j);
    }
    let mut order = Vec::with_capacity(incoming.len());
    for p in incoming {
        match by_path.remove(p.as_slice()) {
            Some(j) => order.push(j),
            None => {
                return Err(format!(
                    "the message has a tensor at {}, out= has none there",
                    path_str(p)
                ));
            }
        }
    }
    if let Some(j) = (0..outs.len()).find(|j| by_path.contains_key(outs[*j].as_slice())) {
        return Err(format!(
            "out= has a tensor at {}, the message has none there",
            path_str(&outs[j])
        ));
    }
    Ok(order)
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
    pub desc: AlignedVec,
    pub segs: Vec<OutSeg<'a>>,
    pub payload_len: u64,
}

/// Encodes a value (refusing depth beyond the limit and `Value::Out`, which only receivers make).
pub fn encode<'a>(v: &'a Value, limits: &Limits) -> Result<Encoded<'a>> {
    enum Emit<'a> {
        Val(&'a Value, usize),
        Key(&'a Key),
    }
    let mut d = Descriptor::default();
    let mut segs: Vec<OutSeg<'a>> = Vec::new();
    let mut stack: Vec<Emit<'a>> = vec![Emit::Val(v, 0)];
    while let Some(item) = stack.pop() {
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
    let payload_len = d.segments.iter().sum();
    let desc = rkyv::to_bytes::<RkyvError>(&d).map_err(|e| {
        Error::new(
            ErrorKind::Resource,
            "send",
            format!("cannot archive the descriptor: {e}"),
        )
    })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            max_descriptor: 1 << 20,
            max_payload: 1 << 30,
            max_segments: 1024,
            max_depth: 16,
        }
    }

    fn sample() -> Value {
        Value::Dict(vec![
            (
                Key::Str("a".into()),
                Value::List(vec![
                    Value::Int(-3),
                    Value::Float(2.5),
                    Value::None,
                    Value::Bool(true),
                ]),
            ),
            (
                Key::Int(7),
                Value::Tuple(vec![Value::str("hé"), Value::bytes(vec![1, 2, 3])]),
            ),
            (
                Key::Str("t".into()),
                Value::Tensor(Tensor::from_bytes(DType::F32, vec![2, 2], vec![0u8; 16]).unwrap()),
            ),
            (Key::Str("empty".into()), Value::List(vec![])),
        ])
    }

    #[test]
    fn wire_roundtrip_nested() {
        let v = sample();
        let f = encode_frame(FrameKind::Message, 9, &v, &limits()).unwrap();
        let (h, back) = decode_frame(&f, &limits()).unwrap();
        assert_eq!(h.seq, 9);
        assert!(v.same(&back), "{back:?}");
    }

    #[test]
    fn wire_1_oversize_declarations_refused_before_allocation() {
        let mut f = encode_frame(FrameKind::Message, 0, &sample(), &limits()).unwrap();
        f[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        let e = decode_frame(&f, &limits()).unwrap_err();
        assert!(e.to_string().contains("PARALLEL_MAX_FRAME"), "{e}");
        let mut f = encode_frame(FrameKind::Message, 0, &sample(), &limits()).unwrap();
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(
            decode_frame(&f, &limits())
                .unwrap_err()
                .to_string()
                .contains("PARALLEL_MAX_DESCRIPTOR")
        );
    }

    #[test]
    fn wire_bad_magic_and_version_are_named() {
        let mut f = encode_frame(FrameKind::Message, 0, &Value::None, &limits()).unwrap();
        f[4] = 9;
        assert!(
            decode_frame(&f, &limits())
                .unwrap_err()
                .to_string()
                .contains("wire version 9")
        );
        f[0] = b'G';
        assert!(
            decode_frame(&f, &limits())
                .unwrap_err()
                .to_string()
                .contains("bad magic")
        );
    }

    #[test]
    fn wire_3_depth_limit_both_ways() {
        let mut v = Value::None;
        for _ in 0..20 {
            v = Value::List(vec![v]);
        }
        assert_eq!(
            encode(&v, &limits()).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
        let deep = Limits {
            max_depth: 100,
            ..limits()
        };
        let f = encode_frame(FrameKind::Message, 0, &v, &deep).unwrap();
        assert!(
            decode_frame(&f, &limits())
                .unwrap_err()
                .to_string()
                .contains("PARALLEL_MAX_VALUE_DEPTH")
        );
        assert!(decode_frame(&f, &deep).is_ok());
    }

    #[test]
    fn wire_3_value_100000_deep_encodes_decodes_and_drops_on_a_small_stack() {
        // Nothing on the way recurses on the depth (WIRE-3, VALUE-3): a 128 KiB stack suffices.
        std::thread::Builder::new()
            .stack_size(128 << 10)
            .spawn(|| {
                let deep = Limits {
                    max_depth: 200_000,
                    max_descriptor: 1 << 30,
                    ..limits()
                };
                let mut v = Value::Int(7);
                for i in 0..100_000 {
                    v = if i % 2 == 0 {
                        Value::List(vec![v])
                    } else {
                        Value::Dict(vec![(Key::Int(i), v)])
                    };
                }
                let f = encode_frame(FrameKind::Message, 0, &v, &deep).unwrap();
                let (_, back) = decode_frame(&f, &deep).unwrap();
                assert!(v.same(&back));
                let shallow = Limits {
                    max_descriptor: 1 << 30,
                    ..limits()
                };
                let e = decode_frame(&f, &shallow).unwrap_err();
                assert!(e.to_string().contains("PARALLEL_MAX_VALUE_DEPTH"), "{e}");
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn wire_4_inconsistent_tensor_sizes_refused() {
        let d = Descriptor {
            nodes: vec![Node::Tensor(TensorNode {
                dtype: DType::F64 as u8,
                device: 0,
                device_index: 0,
                shape: vec![1 << 40, 1 << 30],
                seg: 0,
            })],
            segments: vec![8],
        };
        let desc = rkyv::to_bytes::<RkyvError>(&d).unwrap();
        let h = Header {
            kind: FrameKind::Message,
            flags: 0,
            desc_len: desc.len() as u32,
            nseg: 1,
            payload_len: 8,
            seq: 0,
        };
        let a = access_descriptor(&desc).unwrap();
        assert!(check_descriptor(a, &h, &limits()).is_err());
    }

    proptest! {
        #[test]
        fn wire_2_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_frame(&bytes, &limits());
        }

        #[test]
        fn wire_2_decoder_never_panics_on_mutated_frames(idx in 0usize..4096, val in any::<u8>(), cut in 0usize..4096) {
            let mut f = encode_frame(FrameKind::Message, 1, &sample(), &limits()).unwrap();
            let i = idx % f.len();
            f[i] = val;
            f.truncate(cut.max(1).min(f.len()));
            let _ = decode_frame(&f, &limits());
        }

        #[test]
        fn wire_roundtrip_random_scalars(ints in proptest::collection::vec(any::<i64>(), 0..20), s in ".{0,40}", fl in any::<f64>()) {
            let v = Value::Tuple(vec![Value::List(ints.into_iter().map(Value::Int).collect()), Value::Str(s), Value::Float(fl)]);
            let f = encode_frame(FrameKind::Message, 0, &v, &limits()).unwrap();
            let (_, back) = decode_frame(&f, &limits()).unwrap();
            prop_assert!(v.same(&back));
        }
    }
}

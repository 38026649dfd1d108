//! Encoding a value: its descriptor (refusing depth beyond the limit, WIRE-3) and the payload
//! segments to send after it, borrowed from the value where they can be.

use super::descriptor::{Descriptor, Node, TensorNode};
use super::header::Limits;
use crate::buffer::Buf;
use crate::error::{Error, ErrorKind, Result};
use crate::value::{Device, Key, Value};
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;

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
    // Sized for the common small message (a handful of nodes), so that the usual encode
    // allocates each vector once.
    let mut d = Descriptor {
        nodes: Vec::with_capacity(8),
        segments: Vec::with_capacity(4),
    };
    let mut segs: Vec<OutSeg<'a>> = Vec::with_capacity(4);
    let mut stack: Vec<Emit<'a>> = Vec::with_capacity(8);
    stack.push(Emit::Val(v, 0));
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
    let desc =
        rkyv::api::high::to_bytes_in::<_, RkyvError>(&d, AlignedVec::with_capacity(estimate))
            .map_err(|e| {
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

//! The archived part of a frame: the value tree in pre-order with child counts (WIRE-3) and the
//! segment lengths; and the checked view of a segment a receiver works from.

use crate::value::{DType, Device};
use rkyv::{Archive, Deserialize, Serialize};

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

//! Decoding untrusted descriptors: the one choke point that checks a descriptor's tree against
//! the header and the limits (WIRE-1, WIRE-3, WIRE-4), then builds the value from it and its
//! received segments, and finds the tensors' paths; all with explicit stacks, never recursion.

use super::descriptor::{ArchivedDescriptor, ArchivedNode, SegInfo, SegKind};
use super::header::{Header, Limits};
use crate::buffer::Buf;
use crate::error::{Result, protocol};
use crate::value::{DType, Device, Key, Tensor, Value, byte_len};
use rkyv::rancor::Error as RkyvError;

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

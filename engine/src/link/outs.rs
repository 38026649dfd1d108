//! Matching received tensors to a caller's `out` tensors (in order or by path), before a receive
//! (`match_outs`) or after one that read ahead (`into_outs`).

use crate::cuda;
use crate::error::{Error, ErrorKind, Result};
use crate::value::{Key, Tensor, Value};
use crate::wire::{self, SegKind};

/// Moves the tensors of an already received message into the caller's `out` tensors (in order,
/// or by path when `paths` is given, as [`Link::recv_keyed`] matches them), as a receive into
/// `out` would have: they then appear as `Value::Out(i)`. A message whose tensors do not match is
/// a `Mismatch` error (the message is consumed, as in LINK-1).
pub fn into_outs(mut v: Value, out: &mut [Tensor], paths: Option<&[Vec<Key>]>) -> Result<Value> {
    let mut found: Vec<(Vec<Key>, Tensor)> = Vec::new();
    let mut stack: Vec<(Vec<Key>, &mut Value)> = vec![(Vec::new(), &mut v)];
    while let Some((at, x)) = stack.pop() {
        match x {
            Value::List(l) | Value::Tuple(l) => {
                for (i, c) in l.iter_mut().enumerate().rev() {
                    let mut p = at.clone();
                    p.push(Key::Int(i as i64));
                    stack.push((p, c));
                }
            }
            Value::Dict(d) => {
                for (k, c) in d.iter_mut().rev() {
                    let mut p = at.clone();
                    p.push(k.clone());
                    stack.push((p, c));
                }
            }
            Value::Tensor(_) => {
                let Ok(t) = std::mem::replace(x, Value::Out(found.len())).into_tensor() else {
                    unreachable!("matched a tensor")
                };
                found.push((at, t));
            }
            _ => {}
        }
    }
    // Where each found tensor goes: in order, or to the out tensor at the same path.
    let order: Vec<usize> = match paths {
        Some(p) if !out.is_empty() && found.len() == out.len() => {
            let incoming: Vec<Vec<Key>> = found.iter().map(|(at, _)| at.clone()).collect();
            wire::match_paths(&incoming, p).map_err(|m| {
                Error::new(
                    ErrorKind::Mismatch,
                    "recv",
                    format!("{m} (the message was discarded; the connection is still usable)"),
                )
            })?
        }
        _ => (0..found.len()).collect(),
    };
    // The placeholders name the discovery index; renumber them to the out tensor each fills.
    let mut stack: Vec<&mut Value> = vec![&mut v];
    while let Some(x) = stack.pop() {
        match x {
            Value::List(l) | Value::Tuple(l) => stack.extend(l.iter_mut()),
            Value::Dict(d) => stack.extend(d.iter_mut().map(|(_, c)| c)),
            Value::Out(k) => *k = order[*k],
            _ => {}
        }
    }
    let mut got: Vec<Option<Tensor>> = Vec::new();
    got.resize_with(out.len().max(found.len()), || None);
    let n_found = found.len();
    for ((_, t), &j) in found.into_iter().zip(&order) {
        if j < got.len() {
            got[j] = Some(t);
        }
    }
    let got: Vec<Tensor> = got.into_iter().flatten().collect();
    let got_len = n_found;
    let why = if got_len != out.len() {
        Some(format!(
            "the message holds {} tensors but {} were given as out (the message was discarded; the connection is still usable)",
            got_len,
            out.len()
        ))
    } else {
        got.iter().zip(out.iter()).enumerate().find_map(|(i, (g, o))| {
            (g.dtype() != o.dtype() || g.shape() != o.shape() || o.is_cuda() || g.bytes().is_none()).then(|| {
                format!(
                    "tensor {i} of the message is {} {:?} but out[{i}] is {} {:?}{} (the message was discarded; the connection is still usable)",
                    g.dtype().name(),
                    g.shape(),
                    o.dtype().name(),
                    o.shape(),
                    if o.is_cuda() { " on CUDA (this message was read ahead by recv_any into host memory)" } else { "" }
                )
            })
        })
    };
    if let Some(m) = why {
        return Err(Error::new(ErrorKind::Mismatch, "recv", m));
    }
    for (g, o) in got.iter().zip(out.iter_mut()) {
        let src = g.bytes().expect("checked above");
        match out_contiguous_slice(o) {
            Some(d) => d.copy_from_slice(src),
            None => o.scatter_from(src)?,
        }
    }
    Ok(v)
}

/// Checks the caller's `out` tensors against the incoming tensor segments; returns why they do
/// not match, if they do not.
pub(super) fn match_outs(
    segs: &[wire::SegInfo],
    out: &[Tensor],
    order: &[usize],
    name: &dyn Fn(usize) -> String,
) -> Option<String> {
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
    for (i, t) in out.iter().enumerate() {
        if t.is_cuda() && !t.is_contiguous() {
            return Some(format!(
                "out[{i}] is a non-contiguous CUDA tensor: receive into a contiguous one and copy (torch_parallel does this for you) (the message was discarded; the connection is still usable)"
            ));
        }
        if t.is_cuda() && cuda::cuda().is_none() {
            return Some(format!(
                "out[{i}] is a CUDA tensor but this process cannot use CUDA: {} (the message was discarded; the connection is still usable)",
                cuda::unavailable_reason()
            ));
        }
    }
    for (i, ((dtype, shape), j)) in incoming.iter().zip(order).enumerate() {
        let t = &out[*j];
        if **dtype != t.dtype() || **shape != t.shape() {
            return Some(format!(
                "tensor {i} of the message is {} {:?} but {} is {} {:?} (the message was discarded; the connection is still usable)",
                dtype.name(),
                shape,
                name(*j),
                t.dtype().name(),
                t.shape()
            ));
        }
    }
    None
}

pub(super) fn out_contiguous_slice(t: &mut Tensor) -> Option<&mut [u8]> {
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

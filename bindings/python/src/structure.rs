//! Nested values of the Tree's collectives: leaves matched across ranks by structure and key.
//! Just over 600 lines: flattening, signatures and rebuilding share one canonical order.
//!
//! A value is a tensor, a plain number (bool, int, float), or a list, tuple or dict of values.
//! Its leaves are listed in a canonical order: list and tuple items by index, dict items by key
//! (int keys before str keys, ints by value, strs by code points), whatever order a dict was built
//! in, so two ranks whose dicts were filled in different orders match leaf for leaf.
//!
//! Invariants:
//! - STRUCT-1: the leaf order depends only on the value's structure and keys, never on a dict's
//!   insertion order.
//! - STRUCT-2: each collective carries a 64-bit hash of the structure (every leaf's path, kind,
//!   dtype, shape, device kind): ranks whose values differ get a Mismatch on every rank in the
//!   same control pass, before any data moves (TREE-7); only then are the full structures gathered
//!   to name the first differing path and the ranks.
//! - STRUCT-3: plain numbers are reduced as int64 (bool and int) or float64 (float) and returned
//!   in a copy of the value (numbers are immutable); tensors are reduced in place.
//! - STRUCT-4: anything else in a value is a TypeError naming where it is, raised before any
//!   data moves; so is an op that does not apply to a leaf's dtype (avg on integers).

use crate::{attrs, dlpack};
use parallel_collectives::ops::Op;
use parallel_engine::value::{DType, Tensor};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyString, PyTuple};
use std::collections::HashMap;

/// Deepest nesting of a collective's value (the walks below recurse, on the caller's thread).
const MAX_DEPTH: usize = 64;

/// One step of a path: a list/tuple index or an int dict key, or a str dict key. The derived
/// order (Int before Str) is the canonical order of STRUCT-1.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Comp {
    Int(i64),
    Str(String),
}

/// What a leaf is.
#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    Tensor {
        dtype: DType,
        shape: Vec<usize>,
        cuda: bool,
    },
    Int,
    Float,
}

impl Kind {
    fn noun(&self) -> String {
        match self {
            Kind::Tensor { cuda: true, .. } => "a CUDA tensor".into(),
            Kind::Tensor { .. } => "a tensor".into(),
            Kind::Int => "an int".into(),
            Kind::Float => "a float".into(),
        }
    }
}

/// An Unsupported error (a TypeError) of the collective `what`.
fn refuse(what: &'static str, msg: String) -> PyErr {
    crate::errors::to_py(parallel_engine::Error::new(
        parallel_engine::ErrorKind::Unsupported,
        what,
        msg,
    ))
}

/// `value['a'][0]` as Python would index it.
pub fn path_str(path: &[Comp]) -> String {
    let mut s = String::from("value");
    for c in path {
        match c {
            Comp::Int(i) => s.push_str(&format!("[{i}]")),
            Comp::Str(k) => s.push_str(&format!("[{k:?}]").replace('"', "'")),
        }
    }
    s
}

fn shape_str(shape: &[usize]) -> String {
    match shape {
        [d] => format!("({d},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// A value flattened in canonical order (STRUCT-1).
#[derive(Default)]
pub struct Flat {
    pub paths: Vec<Vec<Comp>>,
    pub kinds: Vec<Kind>,
    /// The tensor leaves, in order.
    pub tensors: Vec<Tensor>,
    /// Non-contiguous CUDA views and their contiguous stand-ins, to copy back.
    pub writebacks: Vec<(PyObject, PyObject)>,
    pub ints: Vec<i64>,
    pub floats: Vec<f64>,
    /// Whether there are number leaves (bools count as ints 0/1 and come back as ints).
    has_numbers: bool,
}

impl Flat {
    /// Flattens `value` for the collective `what` (named in errors).
    pub fn collect(value: &Bound<'_, PyAny>, what: &'static str) -> PyResult<Flat> {
        let mut f = Flat::default();
        f.walk(value, &mut Vec::new(), what)?;
        Ok(f)
    }

    fn walk(
        &mut self,
        obj: &Bound<'_, PyAny>,
        path: &mut Vec<Comp>,
        what: &'static str,
    ) -> PyResult<()> {
        if path.len() > MAX_DEPTH {
            return Err(refuse(
                what,
                format!("{} nests deeper than {MAX_DEPTH} levels", path_str(path)),
            ));
        }
        // The common leaf first: a plain torch CPU tensor, read by its attributes (ATTR-1).
        if let Some(t) = attrs::torch_cpu(obj) {
            self.push_tensor(t, path);
            return Ok(());
        }
        let children = |me: &mut Flat,
                        path: &mut Vec<Comp>,
                        items: Vec<(Comp, Bound<'_, PyAny>)>|
         -> PyResult<()> {
            for (c, x) in items {
                path.push(c);
                me.walk(&x, path, what)?;
                path.pop();
            }
            Ok(())
        };
        if let Ok(l) = obj.downcast::<PyList>() {
            return children(
                self,
                path,
                l.iter()
                    .enumerate()
                    .map(|(i, x)| (Comp::Int(i as i64), x))
                    .collect(),
            );
        }
        if let Ok(t) = obj.downcast::<PyTuple>() {
            return children(
                self,
                path,
                t.iter()
                    .enumerate()
                    .map(|(i, x)| (Comp::Int(i as i64), x))
                    .collect(),
            );
        }
        if let Ok(d) = obj.downcast::<PyDict>() {
            let mut items = Vec::with_capacity(d.len());
            for (k, v) in d.iter() {
                items.push((key(&k, path, what)?, v));
            }
            items.sort_by(|a, b| a.0.cmp(&b.0));
            return children(self, path, items);
        }
        let kind = if obj.is_instance_of::<PyBool>() || obj.is_instance_of::<PyInt>() {
            let i = obj.extract::<i64>().map_err(|_| {
                refuse(
                    what,
                    format!("{} is an int that does not fit in 64 bits", path_str(path)),
                )
            })?;
            self.ints.push(i);
            self.has_numbers = true;
            Kind::Int
        } else if let Ok(x) = obj.downcast::<PyFloat>() {
            self.floats.push(x.value());
            self.has_numbers = true;
            Kind::Float
        } else if obj.hasattr("__dlpack__")? {
            let (t, tmp) = dlpack::import_out(obj)?;
            if let Some(tmp) = tmp {
                self.writebacks.push((obj.clone().unbind(), tmp));
            }
            self.push_tensor(t, path);
            return Ok(());
        } else {
            return Err(refuse(
                what,
                format!(
                    "{} is a {}; expected tensors, numbers, or lists/tuples/dicts of them",
                    path_str(path),
                    crate::convert::type_name(obj)
                ),
            ));
        };
        self.paths.push(path.clone());
        self.kinds.push(kind);
        Ok(())
    }

    /// A tensor leaf at `path`.
    fn push_tensor(&mut self, t: Tensor, path: &[Comp]) {
        self.kinds.push(Kind::Tensor {
            dtype: t.dtype(),
            shape: t.shape().to_vec(),
            cuda: t.is_cuda(),
        });
        self.tensors.push(t);
        self.paths.push(path.to_vec());
    }

    pub fn has_numbers(&self) -> bool {
        self.has_numbers
    }

    /// Checks `op` against every leaf's dtype before any data moves (STRUCT-4).
    pub fn check_op(&self, op: &Op, what: &'static str) -> PyResult<()> {
        for (path, kind) in self.paths.iter().zip(&self.kinds) {
            let dtype = match kind {
                Kind::Tensor { dtype, .. } => *dtype,
                Kind::Int => DType::I64,
                Kind::Float => DType::F64,
            };
            check_leaf_op(op, dtype, path, what)?;
        }
        Ok(())
    }

    /// The structure, encoded (gathered from every rank on a mismatch).
    pub fn signature(&self) -> Vec<u8> {
        signature_of(&self.paths, &self.kinds)
    }

    /// The tensors to reduce: the tensor leaves, then one int64 tensor of the int leaves and one
    /// float64 tensor of the float leaves (STRUCT-3), when there are any.
    pub fn leaf_tensors(&mut self) -> Vec<Tensor> {
        let mut out = std::mem::take(&mut self.tensors);
        if !self.ints.is_empty() {
            let b = self.ints.iter().flat_map(|i| i.to_le_bytes()).collect();
            out.push(Tensor::from_bytes(DType::I64, vec![self.ints.len()], b).expect("sized"));
        }
        if !self.floats.is_empty() {
            let b = self.floats.iter().flat_map(|f| f.to_le_bytes()).collect();
            out.push(Tensor::from_bytes(DType::F64, vec![self.floats.len()], b).expect("sized"));
        }
        out
    }

    /// Reads the reduced numbers back from the tensors `leaf_tensors` made (its last ones).
    pub fn numbers_from(&mut self, tensors: &[Tensor]) {
        let mut tail = tensors.iter().rev();
        let read = |t: Option<&Tensor>| -> Vec<[u8; 8]> {
            t.and_then(Tensor::bytes)
                .map(|b| {
                    b.chunks_exact(8)
                        .map(|c| c.try_into().expect("8 bytes"))
                        .collect()
                })
                .unwrap_or_default()
        };
        if !self.floats.is_empty() {
            let v = read(tail.next());
            self.floats = v.into_iter().map(f64::from_le_bytes).collect();
        }
        if !self.ints.is_empty() {
            let v = read(tail.next());
            self.ints = v.into_iter().map(i64::from_le_bytes).collect();
        }
    }

    /// A copy of `value` (same container types and dict order) with the reduced numbers in place
    /// of its numbers and the same tensor objects (STRUCT-3).
    pub fn rebuild(&self, value: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        let py = value.py();
        let mut numbers: HashMap<&[Comp], PyObject> = HashMap::new();
        let (mut ints, mut floats) = (self.ints.iter(), self.floats.iter());
        for (path, kind) in self.paths.iter().zip(&self.kinds) {
            let o = match kind {
                Kind::Int => ints
                    .next()
                    .map(|i| i.into_pyobject(py).map(|x| x.into_any().unbind())),
                Kind::Float => floats
                    .next()
                    .map(|f| f.into_pyobject(py).map(|x| x.into_any().unbind())),
                Kind::Tensor { .. } => None,
            };
            if let Some(o) = o {
                numbers.insert(path, o?);
            }
        }
        copy_with(value, &mut Vec::new(), &numbers)
    }
}

/// The encoding of a structure, leaf by leaf (STRUCT-2).
fn signature_of(paths: &[Vec<Comp>], kinds: &[Kind]) -> Vec<u8> {
    // Sized in advance: one allocation per call (the encoding below, entry by entry).
    let len = 8
        + (paths.iter().zip(kinds))
            .map(|(path, kind)| {
                let comps: usize = (path.iter())
                    .map(|c| match c {
                        Comp::Int(_) => 9,
                        Comp::Str(s) => 5 + s.len(),
                    })
                    .sum();
                4 + comps
                    + match kind {
                        Kind::Tensor { shape, .. } => 7 + 8 * shape.len(),
                        Kind::Int | Kind::Float => 1,
                    }
            })
            .sum::<usize>();
    let mut b = Vec::with_capacity(len);
    b.extend_from_slice(&(paths.len() as u64).to_le_bytes());
    for (path, kind) in paths.iter().zip(kinds) {
        b.extend_from_slice(&(path.len() as u32).to_le_bytes());
        for c in path {
            match c {
                Comp::Int(i) => {
                    b.push(0);
                    b.extend_from_slice(&i.to_le_bytes());
                }
                Comp::Str(s) => {
                    b.push(1);
                    b.extend_from_slice(&(s.len() as u32).to_le_bytes());
                    b.extend_from_slice(s.as_bytes());
                }
            }
        }
        match kind {
            Kind::Tensor { dtype, shape, cuda } => encode_tensor(&mut b, *dtype, shape, *cuda),
            Kind::Int => b.push(1),
            Kind::Float => b.push(2),
        }
    }
    debug_assert_eq!(b.len(), len, "signature length");
    b
}

/// STRUCT-4's check of `op` against one leaf's dtype, naming the leaf.
fn check_leaf_op(op: &Op, dtype: DType, path: &[Comp], what: &'static str) -> PyResult<()> {
    op.check(dtype).map_err(|e| {
        crate::errors::to_py(parallel_engine::Error::new(
            e.kind(),
            what,
            format!("{} (at {})", e.message(), path_str(path)),
        ))
    })
}

/// A tensor leaf's kind in a signature.
fn encode_tensor(b: &mut Vec<u8>, dtype: DType, shape: &[usize], cuda: bool) {
    b.extend_from_slice(&[0, dtype as u8, u8::from(cuda)]);
    b.extend_from_slice(&(shape.len() as u32).to_le_bytes());
    for d in shape {
        b.extend_from_slice(&(*d as u64).to_le_bytes());
    }
}

/// The signature of a value that is one CPU tensor: one entry, at the root path.
fn bare_signature(dtype: DType, shape: &[usize]) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + 4 + 7 + 8 * shape.len());
    b.extend_from_slice(&1u64.to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    encode_tensor(&mut b, dtype, shape, false);
    b
}

/// A value that is one CPU tensor (no container), without flattening it: what
/// [`Flat::collect`] makes of it (the same signature, STRUCT-2; the same op check, STRUCT-4).
pub struct Bare {
    pub tensor: Tensor,
    pub signature: Vec<u8>,
}

impl Bare {
    /// The value itself when it is a plain torch CPU tensor (ATTR-1); None otherwise.
    pub fn of(value: &Bound<'_, PyAny>) -> Option<Bare> {
        let tensor = attrs::torch_cpu(value)?;
        let signature = bare_signature(tensor.dtype(), tensor.shape());
        Some(Bare { tensor, signature })
    }

    pub fn check_op(&self, op: &Op, what: &'static str) -> PyResult<()> {
        check_leaf_op(op, self.tensor.dtype(), &[], what)
    }
}

fn copy_with(
    obj: &Bound<'_, PyAny>,
    path: &mut Vec<Comp>,
    numbers: &HashMap<&[Comp], PyObject>,
) -> PyResult<PyObject> {
    let py = obj.py();
    if let Some(n) = numbers.get(path.as_slice()) {
        return Ok(n.clone_ref(py));
    }
    let child = |path: &mut Vec<Comp>, c: Comp, x: &Bound<'_, PyAny>| -> PyResult<PyObject> {
        path.push(c);
        let r = copy_with(x, path, numbers);
        path.pop();
        r
    };
    if let Ok(l) = obj.downcast::<PyList>() {
        let items = l
            .iter()
            .enumerate()
            .map(|(i, x)| child(path, Comp::Int(i as i64), &x))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(PyList::new(py, items)?.into_any().unbind());
    }
    if let Ok(t) = obj.downcast::<PyTuple>() {
        let items = t
            .iter()
            .enumerate()
            .map(|(i, x)| child(path, Comp::Int(i as i64), &x))
            .collect::<PyResult<Vec<_>>>()?;
        return Ok(PyTuple::new(py, items)?.into_any().unbind());
    }
    if let Ok(d) = obj.downcast::<PyDict>() {
        let out = PyDict::new(py);
        for (k, v) in d.iter() {
            let c = key(&k, path, "")?;
            out.set_item(&k, child(path, c, &v)?)?;
        }
        return Ok(out.into_any().unbind());
    }
    Ok(obj.clone().unbind())
}

fn key(k: &Bound<'_, PyAny>, path: &[Comp], what: &'static str) -> PyResult<Comp> {
    if !k.is_instance_of::<PyBool>() {
        if let Ok(s) = k.downcast::<PyString>() {
            return Ok(Comp::Str(s.to_str()?.to_string()));
        }
        if k.is_instance_of::<PyInt>()
            && let Ok(i) = k.extract::<i64>()
        {
            return Ok(Comp::Int(i));
        }
    }
    Err(refuse(
        what,
        format!(
            "{} has a key of type {}; dict keys must be str or int (64-bit)",
            path_str(path),
            crate::convert::type_name(k)
        ),
    ))
}

/// A decoded signature entry: a leaf's path and kind.
type Entry = (Vec<Comp>, Kind);

/// Decodes a signature (`Flat::signature`); None if malformed.
fn decode(b: &[u8]) -> Option<Vec<Entry>> {
    let mut at = 0usize;
    let mut take = |n: usize| -> Option<&[u8]> {
        let s = b.get(at..at.checked_add(n)?)?;
        at += n;
        Some(s)
    };
    let n = u64::from_le_bytes(take(8)?.try_into().ok()?) as usize;
    let mut out = Vec::with_capacity(n.min(1 << 16));
    for _ in 0..n {
        let np = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let mut path = Vec::with_capacity(np.min(MAX_DEPTH + 1));
        for _ in 0..np {
            path.push(match take(1)?[0] {
                0 => Comp::Int(i64::from_le_bytes(take(8)?.try_into().ok()?)),
                1 => {
                    let l = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                    Comp::Str(String::from_utf8(take(l)?.to_vec()).ok()?)
                }
                _ => return None,
            });
        }
        let kind = match take(1)?[0] {
            0 => {
                let h = take(2)?;
                let (dtype, cuda) = (DType::from_code(h[0])?, h[1] != 0);
                let nd = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
                let mut shape = Vec::with_capacity(nd.min(64));
                for _ in 0..nd {
                    shape.push(u64::from_le_bytes(take(8)?.try_into().ok()?) as usize);
                }
                Kind::Tensor { dtype, shape, cuda }
            }
            1 => Kind::Int,
            2 => Kind::Float,
            _ => return None,
        };
        out.push((path, kind));
    }
    Some(out)
}

/// How two ranks' leaves at the same path differ.
fn difference(a: &Kind, b: &Kind) -> (String, String) {
    match (a, b) {
        (
            Kind::Tensor {
                dtype: da,
                shape: sa,
                cuda: ca,
            },
            Kind::Tensor {
                dtype: db,
                shape: sb,
                cuda: cb,
            },
        ) => {
            if da != db {
                (format!("dtype {}", da.name()), db.name().to_string())
            } else if sa != sb {
                (format!("shape {}", shape_str(sa)), shape_str(sb))
            } else if ca != cb {
                (a.noun(), b.noun())
            } else {
                ("the same".into(), "the same".into())
            }
        }
        _ => (a.noun(), b.noun()),
    }
}

/// Names the first path (in canonical order) where the ranks' structures differ, and the ranks,
/// from every rank's signature in rank order; None if they do not differ or one is malformed.
pub fn first_difference(sigs: &[Vec<u8>]) -> Option<String> {
    let all: Vec<Vec<Entry>> = sigs.iter().map(|s| decode(s)).collect::<Option<_>>()?;
    let longest = all.iter().map(Vec::len).max()?;
    for i in 0..longest {
        let a = all[0].get(i);
        let Some((r, b)) = all
            .iter()
            .enumerate()
            .skip(1)
            .map(|(r, x)| (r, x.get(i)))
            .find(|(_, x)| *x != a)
        else {
            continue;
        };
        return Some(match (a, b) {
            (Some((pa, ka)), Some((pb, kb))) if pa == pb => {
                let (x, y) = difference(ka, kb);
                format!("{}: {x} on rank 0, {y} on rank {r}", path_str(pa))
            }
            (Some((pa, _)), Some((pb, _))) if pa < pb => {
                format!("{}: present on rank 0, missing on rank {r}", path_str(pa))
            }
            (Some(_), Some((pb, _))) | (None, Some((pb, _))) => {
                format!("{}: missing on rank 0, present on rank {r}", path_str(pb))
            }
            (Some((pa, _)), None) => {
                format!("{}: present on rank 0, missing on rank {r}", path_str(pa))
            }
            (None, None) => continue,
        });
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_2_a_bare_tensor_has_the_signature_of_its_flattened_value() {
        for (dtype, shape) in [
            (DType::F32, vec![1024]),
            (DType::I8, vec![]),
            (DType::C128, vec![3, 4, 5]),
        ] {
            let kind = Kind::Tensor {
                dtype,
                shape: shape.clone(),
                cuda: false,
            };
            // What Flat::collect records for a bare tensor: one leaf at the root path.
            assert_eq!(
                signature_of(&[vec![]], &[kind]),
                bare_signature(dtype, &shape)
            );
        }
    }

    #[test]
    fn struct_1_canonical_key_order_is_total() {
        let mut keys = vec![
            Comp::Str("b".into()),
            Comp::Int(10),
            Comp::Str("a".into()),
            Comp::Int(-1),
        ];
        keys.sort();
        assert_eq!(
            keys,
            vec![
                Comp::Int(-1),
                Comp::Int(10),
                Comp::Str("a".into()),
                Comp::Str("b".into())
            ]
        );
    }
}

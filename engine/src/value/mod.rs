//! The value model: what a message carries.
//!
//! None, bool, 64-bit int, float, str, bytes, list, tuple, dict (str or int keys), tensors and
//! opaque pickles (only when both ends opt in, a binding-level decision), nested freely up to
//! `PARALLEL_MAX_VALUE_DEPTH`.
//!
//! Invariants:
//! - VALUE-1: tensors are sent contiguous, in C order: a strided view is gathered into a pooled
//!   buffer by the sender ([`Tensor::contiguous_bytes`]); received tensors are always contiguous.
//! - VALUE-2: a tensor's byte length is `numel * itemsize`, checked for overflow wherever it is
//!   computed from untrusted numbers.
//! - VALUE-3: [`Tensor`] is opaque: safe code builds one only through constructors that check the
//!   buffer holds exactly `numel * itemsize` bytes; a tensor over foreign memory comes only from the
//!   `unsafe` [`Tensor::from_raw`], whose caller vouches for the memory. Safe methods that copy
//!   elements check their slice lengths, so safe code cannot read or write out of bounds.
//! - VALUE-4: nothing that walks a value recurses on its depth: dropping ([`Value`]'s `Drop`) and
//!   comparing ([`Value::same`]) use explicit stacks, like the wire's encoder and decoder, so a
//!   value nested as deep as the configuration allows cannot overflow a thread's stack.
//!
//! Files: `tensor` (element types, devices, the opaque [`Tensor`] and its byte lengths); here
//! the value tree itself.

mod tensor;
#[cfg(test)]
mod tests;

pub use tensor::{DType, Device, Storage, Tensor, byte_len, contiguous_strides};

use crate::buffer::Buf;

/// A dict key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Str(String),
    Int(i64),
}

/// A message value.
#[derive(Debug)]
pub enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Buf),
    List(Vec<Value>),
    Tuple(Vec<Value>),
    Dict(Vec<(Key, Value)>),
    Tensor(Tensor),
    /// A pickled Python object (protocol 5), only produced and accepted when both ends allow it.
    Pickle(Buf),
    /// In a received value: the i-th tensor the caller passed as `out`, filled in place.
    Out(usize),
}

impl Value {
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }
    pub fn bytes(b: impl Into<Vec<u8>>) -> Value {
        Value::Bytes(Buf::from_vec(b.into()))
    }
    pub fn as_str(&self) -> Option<&str> {
        if let Value::Str(s) = self {
            Some(s)
        } else {
            None
        }
    }
    pub fn as_int(&self) -> Option<i64> {
        if let Value::Int(i) = self {
            Some(*i)
        } else {
            None
        }
    }
    /// The tensor of a tensor value (a value is dropped without recursion, VALUE-4, so its
    /// variants cannot be moved out of by a `match`: use this, or `std::mem::take` on `&mut`).
    pub fn into_tensor(self) -> std::result::Result<Tensor, Value> {
        if !matches!(self, Value::Tensor(_)) {
            return Err(self);
        }
        let me = std::mem::ManuallyDrop::new(self);
        match &*me {
            // SAFETY: the tensor is read out exactly once and `me` is never dropped, so it is
            // neither duplicated nor freed twice.
            Value::Tensor(t) => Ok(unsafe { std::ptr::read(t) }),
            _ => unreachable!("checked above"),
        }
    }
    pub fn as_tensor(&self) -> Option<&Tensor> {
        if let Value::Tensor(t) = self {
            Some(t)
        } else {
            None
        }
    }
    /// Looks up a string key in a dict value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        let Value::Dict(items) = self else {
            return None;
        };
        items
            .iter()
            .find(|(k, _)| matches!(k, Key::Str(s) if s == key))
            .map(|(_, v)| v)
    }
    /// Short type name for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Dict(_) => "dict",
            Value::Tensor(_) => "tensor",
            Value::Pickle(_) => "pickle",
            Value::Out(_) => "out tensor",
        }
    }
    /// Structural equality (tensors compare dtype, shape and bytes), without recursion (VALUE-4).
    pub fn same(&self, other: &Value) -> bool {
        let mut stack: Vec<(&Value, &Value)> = vec![(self, other)];
        while let Some((a, b)) = stack.pop() {
            match (a, b) {
                (Value::List(x), Value::List(y)) | (Value::Tuple(x), Value::Tuple(y)) => {
                    if x.len() != y.len() {
                        return false;
                    }
                    stack.extend(x.iter().zip(y));
                }
                (Value::Dict(x), Value::Dict(y)) => {
                    if x.len() != y.len() || x.iter().zip(y).any(|((ka, _), (kb, _))| ka != kb) {
                        return false;
                    }
                    stack.extend(x.iter().zip(y).map(|((_, va), (_, vb))| (va, vb)));
                }
                _ if !a.same_leaf(b) => return false,
                _ => {}
            }
        }
        true
    }

    /// Equality of two non-container values (containers are never equal here).
    fn same_leaf(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::None, Value::None) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Bytes(a), Value::Bytes(b)) | (Value::Pickle(a), Value::Pickle(b)) => {
                a[..] == b[..]
            }
            (Value::Out(a), Value::Out(b)) => a == b,
            (Value::Tensor(a), Value::Tensor(b)) => {
                a.dtype == b.dtype
                    && a.shape == b.shape
                    && a.device == b.device
                    && match (a.contiguous_bytes(), b.contiguous_bytes()) {
                        (Ok(x), Ok(y)) => x[..] == y[..],
                        _ => false,
                    }
            }
            _ => false,
        }
    }
}

impl Value {
    /// True for a list, tuple or dict holding another container (whose drop would recurse).
    fn nests(&self) -> bool {
        let c = |v: &Value| matches!(v, Value::List(_) | Value::Tuple(_) | Value::Dict(_));
        match self {
            Value::List(items) | Value::Tuple(items) => items.iter().any(c),
            Value::Dict(items) => items.iter().any(|(_, v)| c(v)),
            _ => false,
        }
    }

    /// Moves this container's children out (leaving it empty).
    fn take_children(&mut self, into: &mut Vec<Value>) {
        match self {
            Value::List(items) | Value::Tuple(items) => into.append(items),
            Value::Dict(items) => into.extend(items.drain(..).map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// Drops nested containers with an explicit stack (VALUE-4): the compiler's drop glue recurses
/// once per level, which overflows a thread's stack for a value nested some ten thousand deep.
impl Drop for Value {
    fn drop(&mut self) {
        if !self.nests() {
            return;
        }
        let mut stack: Vec<Value> = Vec::new();
        self.take_children(&mut stack);
        while let Some(mut v) = stack.pop() {
            if v.nests() {
                v.take_children(&mut stack);
            }
        }
    }
}

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

use crate::buffer::Buf;
use crate::error::{Error, ErrorKind, Result};
use std::any::Any;
use std::sync::Arc;

/// Element types, with stable wire codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DType {
    Bool = 0,
    U8 = 1,
    I8 = 2,
    I16 = 3,
    I32 = 4,
    I64 = 5,
    F16 = 6,
    BF16 = 7,
    F32 = 8,
    F64 = 9,
    C64 = 10,
    C128 = 11,
    U16 = 12,
    U32 = 13,
    U64 = 14,
}

impl DType {
    pub const ALL: [DType; 15] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::C64,
        DType::C128,
        DType::U16,
        DType::U32,
        DType::U64,
    ];

    pub fn from_code(c: u8) -> Option<DType> {
        DType::ALL
            .get(c as usize)
            .copied()
            .filter(|d| *d as u8 == c)
    }

    pub fn itemsize(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::I16 | DType::F16 | DType::BF16 | DType::U16 => 2,
            DType::I32 | DType::F32 | DType::U32 => 4,
            DType::I64 | DType::F64 | DType::C64 | DType::U64 => 8,
            DType::C128 => 16,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::U8 => "uint8",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::C64 => "complex64",
            DType::C128 => "complex128",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
        }
    }
}

/// Where a tensor's memory lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by index (carried on the wire; CUDA transfers come with the CUDA link kinds).
    Cuda(i32),
}

/// Memory a tensor points into.
pub enum Storage {
    /// Received or gathered bytes owned by the tensor.
    Owned(Buf),
    /// Memory owned elsewhere (a torch tensor, a numpy array), kept alive by `keep`.
    Foreign {
        ptr: *mut u8,
        len: usize,
        keep: Arc<dyn Any + Send + Sync>,
    },
}

// SAFETY: Foreign memory is kept alive by `keep` (itself Send + Sync); the engine only reads it
// while sending and writes it only through `recv_into`, whose caller guarantees exclusivity.
unsafe impl Send for Storage {}
// SAFETY: see above; shared access is read-only.
unsafe impl Sync for Storage {}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Storage::Owned(b) => write!(f, "Owned({} bytes)", b.len()),
            Storage::Foreign { len, .. } => write!(f, "Foreign({len} bytes)"),
        }
    }
}

/// A dense n-dimensional array view.
///
/// Opaque (VALUE-3): the fields are private, so safe code can only build a tensor through a checked
/// constructor ([`Tensor::new`], [`Tensor::from_bytes`], [`Tensor::from_slice`]: the buffer must
/// hold exactly `numel * itemsize` bytes) or through [`Tensor::from_raw`], an `unsafe fn` whose
/// caller vouches for the memory. Every safe method that reads or writes the elements relies on
/// that, so no safe sequence of calls can read or write outside the tensor's memory.
#[derive(Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    /// Strides in elements; `None` means contiguous C order.
    strides: Option<Vec<isize>>,
    device: Device,
    storage: Storage,
}

fn size_mismatch(dtype: DType, shape: &[usize], got: usize, want: u64) -> Error {
    Error::new(
        ErrorKind::Mismatch,
        "tensor",
        format!(
            "{got} bytes given for a {} tensor of shape {shape:?} ({want} bytes): pass a buffer of \
             exactly numel * itemsize bytes",
            dtype.name()
        ),
    )
}

impl Tensor {
    /// A contiguous CPU tensor that owns `data`; an error unless `data` holds exactly
    /// `numel * itemsize` bytes (VALUE-2, VALUE-3). Owned memory is host memory, so the tensor is
    /// always a CPU tensor (a CUDA segment received as bytes is one too).
    pub fn new(dtype: DType, shape: Vec<usize>, data: Buf) -> Result<Tensor> {
        let want = byte_len(dtype, &shape)?;
        if want != data.len() as u64 {
            return Err(size_mismatch(dtype, &shape, data.len(), want));
        }
        Ok(Tensor {
            dtype,
            shape,
            strides: None,
            device: Device::Cpu,
            storage: Storage::Owned(data),
        })
    }

    /// A contiguous CPU tensor that owns `data` (length must be `numel * itemsize`).
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Tensor> {
        Tensor::new(dtype, shape, Buf::from_vec(data))
    }

    /// A contiguous CPU tensor holding a copy of `data` (length must be `numel * itemsize`).
    pub fn from_slice(dtype: DType, shape: Vec<usize>, data: &[u8]) -> Result<Tensor> {
        let want = byte_len(dtype, &shape)?;
        if want != data.len() as u64 {
            return Err(size_mismatch(dtype, &shape, data.len(), want));
        }
        let mut b = Buf::with_len(data.len())?;
        b.copy_from_slice(data);
        Tensor::new(dtype, shape, b)
    }

    /// A tensor over memory owned elsewhere (a torch tensor, a numpy array, a shared arena, a
    /// device allocation).
    ///
    /// # Safety
    /// For as long as `keep` (and so the returned tensor) is alive:
    /// - `ptr` must be valid for reads of every element addressed by `shape`/`strides`
    ///   (`ptr + itemsize * sum(index[d] * strides[d])` for every index, C-order strides when
    ///   `strides` is `None`), and for writes too if the tensor is ever received into
    ///   (`recv_into`, [`Tensor::scatter_from`]);
    /// - `len` must be the span in bytes from `ptr` covering those elements;
    /// - `device` must say where the memory is (host memory for [`Device::Cpu`], memory of that
    ///   CUDA device otherwise);
    /// - nothing else may write that memory while the engine reads it, nor read or write it while
    ///   the engine writes it.
    pub unsafe fn from_raw(
        dtype: DType,
        shape: Vec<usize>,
        strides: Option<Vec<isize>>,
        device: Device,
        ptr: *mut u8,
        len: usize,
        keep: Arc<dyn Any + Send + Sync>,
    ) -> Tensor {
        Tensor {
            dtype,
            shape,
            strides,
            device,
            storage: Storage::Foreign { ptr, len, keep },
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Strides in elements; `None` means contiguous C order.
    pub fn strides(&self) -> Option<&[isize]> {
        self.strides.as_deref()
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// The memory the tensor points into.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.numel() * self.dtype.itemsize()
    }

    /// True when the elements are laid out densely in C order.
    pub fn is_contiguous(&self) -> bool {
        let Some(strides) = &self.strides else {
            return true;
        };
        let mut expect: isize = 1;
        for (d, s) in self.shape.iter().zip(strides).rev() {
            if *d != 1 && *s != expect {
                return false;
            }
            expect *= *d as isize;
        }
        true
    }

    pub fn data_ptr(&self) -> *const u8 {
        match &self.storage {
            Storage::Owned(b) => b.as_ptr(),
            Storage::Foreign { ptr, .. } => *ptr,
        }
    }

    pub fn data_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.storage {
            Storage::Owned(b) => b.as_mut_ptr(),
            Storage::Foreign { ptr, .. } => *ptr,
        }
    }

    /// The contiguous bytes of a contiguous CPU tensor (`None` for device memory).
    pub fn bytes(&self) -> Option<&[u8]> {
        if !self.is_contiguous() || self.is_cuda() {
            return None;
        }
        let n = self.nbytes();
        if n == 0 {
            return Some(&[]);
        }
        // SAFETY: contiguous, so the n bytes from data_ptr are the tensor's elements, valid per the
        // Storage contract (Owned: our buffer of >= n bytes; Foreign: from_raw's safety contract).
        Some(unsafe { std::slice::from_raw_parts(self.data_ptr(), n) })
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self.device, Device::Cuda(_))
    }

    /// The elements gathered into a new contiguous buffer (VALUE-1).
    pub fn contiguous_bytes(&self) -> Result<Buf> {
        if self.is_cuda() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "tensor",
                "a CUDA tensor must be contiguous here (call .contiguous() first)",
            ));
        }
        let item = self.dtype.itemsize();
        let mut out = Buf::with_len(self.nbytes())?;
        if let Some(b) = self.bytes() {
            out.copy_from_slice(b);
            return Ok(out);
        }
        let strides = self
            .strides
            .clone()
            .unwrap_or_else(|| contiguous_strides(&self.shape));
        let base = self.data_ptr();
        let mut i = 0usize;
        for_each_offset(&self.shape, &strides, |off| {
            // SAFETY: `off` addresses an element inside the view (from_raw's contract); `out` has
            // room for numel items and i < numel.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    base.offset(off * item as isize),
                    out.as_mut_ptr().add(i * item),
                    item,
                )
            };
            i += 1;
        });
        Ok(out)
    }

    /// Writes contiguous `src` into this (possibly strided) tensor; an error unless `src` holds
    /// exactly the tensor's `numel * itemsize` bytes (VALUE-3).
    pub fn scatter_from(&mut self, src: &[u8]) -> Result<()> {
        if self.is_cuda() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "tensor",
                "scatter into a CUDA tensor (receive into a contiguous one and copy)",
            ));
        }
        let want = byte_len(self.dtype, &self.shape)?;
        if want != src.len() as u64 {
            return Err(size_mismatch(self.dtype, &self.shape, src.len(), want));
        }
        let item = self.dtype.itemsize();
        let strides = self
            .strides
            .clone()
            .unwrap_or_else(|| contiguous_strides(&self.shape));
        let base = self.data_mut_ptr();
        let mut i = 0usize;
        for_each_offset(&self.shape, &strides, |off| {
            // SAFETY: as in contiguous_bytes, with the roles swapped; src holds numel items.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    src.as_ptr().add(i * item),
                    base.offset(off * item as isize),
                    item,
                )
            };
            i += 1;
        });
        Ok(())
    }
}

/// C-order strides (in elements) of a shape.
pub fn contiguous_strides(shape: &[usize]) -> Vec<isize> {
    let mut s = vec![1isize; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1].max(1) as isize;
    }
    s
}

/// Calls `f` with the element offset of every element of a strided view, in C order.
fn for_each_offset(shape: &[usize], strides: &[isize], mut f: impl FnMut(isize)) {
    if shape.contains(&0) {
        return;
    }
    let nd = shape.len();
    if nd == 0 {
        f(0);
        return;
    }
    let mut idx = vec![0usize; nd];
    let mut off: isize = 0;
    loop {
        f(off);
        let mut d = nd;
        loop {
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            off += strides[d];
            if idx[d] < shape[d] {
                break;
            }
            off -= strides[d] * shape[d] as isize;
            idx[d] = 0;
        }
    }
}

/// `numel * itemsize`, or an error on overflow (VALUE-2).
pub fn byte_len(dtype: DType, shape: &[usize]) -> Result<u64> {
    let mut n: u64 = dtype.itemsize() as u64;
    for d in shape {
        n = n.checked_mul(*d as u64).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "decode",
                format!("tensor shape {shape:?} overflows 64 bits"),
            )
        })?;
    }
    Ok(n)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_1_strided_gather_and_scatter() {
        // 2x3 int32 matrix, viewed transposed (3x2, strides [1, 3]).
        let data: Vec<u8> = (0i32..6).flat_map(|v| v.to_le_bytes()).collect();
        let base = Tensor::from_bytes(DType::I32, vec![2, 3], data).unwrap();
        let ptr = base.data_ptr() as *mut u8;
        let keep: Arc<dyn Any + Send + Sync> = Arc::new(());
        // SAFETY: the view covers the 6 elements of `base`, alive for the test.
        let t = unsafe {
            Tensor::from_raw(
                DType::I32,
                vec![3, 2],
                Some(vec![1, 3]),
                Device::Cpu,
                ptr,
                24,
                keep.clone(),
            )
        };
        assert!(!t.is_contiguous());
        let g = t.contiguous_bytes().unwrap();
        let vals: Vec<i32> = g
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![0, 3, 1, 4, 2, 5]);
        let mut dst_store = vec![0u8; 24];
        // SAFETY: as above, over dst_store.
        let mut dst = unsafe {
            Tensor::from_raw(
                DType::I32,
                vec![3, 2],
                Some(vec![1, 3]),
                Device::Cpu,
                dst_store.as_mut_ptr(),
                24,
                keep,
            )
        };
        dst.scatter_from(&g).unwrap();
        assert_eq!(dst_store, base.bytes().unwrap());
    }

    #[test]
    fn value_4_deep_values_drop_and_compare_without_recursion() {
        // On a 64 KiB stack, recursion over 200000 levels would overflow at once.
        std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(|| {
                let deep = |leaf: i64| {
                    let mut v = Value::Int(leaf);
                    for i in 0..200_000 {
                        v = match i % 3 {
                            0 => Value::List(vec![v]),
                            1 => Value::Tuple(vec![Value::None, v]),
                            _ => Value::Dict(vec![(Key::Int(i), v)]),
                        };
                    }
                    v
                };
                let (a, b, c) = (deep(1), deep(1), deep(2));
                assert!(a.same(&b));
                assert!(!a.same(&c));
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn value_3_checked_constructors_refuse_a_buffer_of_the_wrong_size() {
        // One byte short, one byte over, and an empty buffer for a non-empty shape: all refused,
        // so no safe tensor can claim more elements than its memory holds.
        for (shape, len) in [
            (vec![2, 2], 15),
            (vec![2, 2], 17),
            (vec![3], 0),
            (vec![], 3),
        ] {
            let e = Tensor::from_bytes(DType::F32, shape.clone(), vec![0u8; len]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{shape:?} {len}: {e}");
            assert!(e.to_string().contains("numel * itemsize"), "{e}");
            let e = Tensor::from_slice(DType::F32, shape.clone(), &vec![0u8; len]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
            let e = Tensor::new(DType::F32, shape, Buf::from_vec(vec![0u8; len])).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        }
        // A shape whose byte length overflows is refused, not wrapped to a small length.
        let e = Tensor::from_bytes(DType::F64, vec![usize::MAX, 2], vec![0u8; 0]).unwrap_err();
        assert!(e.to_string().contains("overflows"), "{e}");
        // The exact size is accepted, and the accessors report what was given.
        let t = Tensor::from_slice(DType::I16, vec![3, 1], &[1, 0, 2, 0, 3, 0]).unwrap();
        assert_eq!(
            (t.dtype(), t.shape(), t.device()),
            (DType::I16, &[3, 1][..], Device::Cpu)
        );
        assert!(t.strides().is_none() && matches!(t.storage(), Storage::Owned(_)));
        assert_eq!(t.bytes().unwrap(), &[1, 0, 2, 0, 3, 0]);
        let empty = Tensor::from_bytes(DType::C128, vec![4, 0], Vec::new()).unwrap();
        assert_eq!((empty.nbytes(), empty.bytes().unwrap().len()), (0, 0));
    }

    #[test]
    fn value_3_scatter_refuses_a_source_of_the_wrong_length() {
        let mut t = Tensor::from_bytes(DType::I32, vec![2, 2], vec![0u8; 16]).unwrap();
        for len in [0, 15, 17, 64] {
            let e = t.scatter_from(&vec![9u8; len]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Mismatch, "{len}: {e}");
        }
        assert_eq!(
            t.bytes().unwrap(),
            &[0u8; 16],
            "a refused scatter writes nothing"
        );
        t.scatter_from(&[7u8; 16]).unwrap();
        assert_eq!(t.bytes().unwrap(), &[7u8; 16]);
    }

    #[test]
    fn value_2_byte_len_overflow_is_an_error() {
        assert!(byte_len(DType::F64, &[usize::MAX, 2]).is_err());
        assert_eq!(byte_len(DType::BF16, &[3, 0]).unwrap(), 0);
        assert_eq!(byte_len(DType::C128, &[]).unwrap(), 16);
    }
}

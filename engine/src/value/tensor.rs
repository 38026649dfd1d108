//! Tensors: element types with their wire codes, devices, the memory a tensor points into, and
//! the opaque [`Tensor`] (VALUE-1..3), with the checked byte length of a shape.

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
/// Opaque (VALUE-3): the fields are private (outside `crate::value`, whose `Value::same` reads
/// the dtype, shape and device), so safe code can only build a tensor through a checked
/// constructor ([`Tensor::new`], [`Tensor::from_bytes`], [`Tensor::from_slice`]: the buffer must
/// hold exactly `numel * itemsize` bytes) or through [`Tensor::from_raw`], an `unsafe fn` whose
/// caller vouches for the memory. Every safe method that reads or writes the elements relies on
/// that, so no safe sequence of calls can read or write outside the tensor's memory.
#[derive(Debug)]
pub struct Tensor {
    pub(super) dtype: DType,
    pub(super) shape: Vec<usize>,
    /// Strides in elements; `None` means contiguous C order.
    strides: Option<Vec<isize>>,
    pub(super) device: Device,
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

    /// The contiguous bytes of a contiguous CPU tensor, writable (`None` for device memory or
    /// a strided tensor).
    pub fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        if !self.is_contiguous() || self.is_cuda() {
            return None;
        }
        let n = self.nbytes();
        if n == 0 {
            return Some(&mut []);
        }
        // SAFETY: as in `bytes`, and the slice borrows the tensor exclusively.
        Some(unsafe { std::slice::from_raw_parts_mut(self.data_mut_ptr(), n) })
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

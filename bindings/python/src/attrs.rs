//! The common case without DLPack: a plain, dense, contiguous torch CPU tensor imported by its
//! own attributes (`data_ptr()`, `dtype`, `shape`). torch's `__dlpack__` and
//! `__dlpack_device__` are Python functions that cost about 4 us together, more than a small
//! shared-memory all-reduce; these attributes are C getters of a few tens of ns each.
//!
//! Invariants:
//! - ATTR-1: only an object whose type is exactly `torch.Tensor` (no subclass: those may override
//!   any attribute) on the CPU, with the strided layout, not nested, without the negative or
//!   conjugate bit, contiguous, of a dtype the wire carries, is imported here. Anything else
//!   returns None and takes the DLPack import ([`crate::dlpack`]), whose checks and errors
//!   (DL-4) stay the only ones: this path refuses nothing.
//! - ATTR-2: the imported tensor keeps the torch tensor object alive (in its `keep`) for as long
//!   as the engine may read or write its memory, as DLPack's capsule does (DL-1).
//! - ATTR-3: torch is never imported here: the table of torch's types is read once torch is in
//!   `sys.modules`, so a process without torch (numpy arrays) pays one dict lookup per call.

use parallel_engine::value::{DType, Device, Tensor};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

/// torch's objects the check compares against (by identity).
struct Torch {
    tensor: Py<PyAny>,
    strided: Py<PyAny>,
    /// torch dtype objects and their wire dtypes (those this torch has).
    dtypes: Vec<(Py<PyAny>, DType)>,
}

static TORCH: GILOnceCell<Torch> = GILOnceCell::new();

/// torch dtype names and their wire dtypes (dlpack::WIRED lists the same set).
const DTYPES: [(&str, DType); 15] = [
    ("bool", DType::Bool),
    ("uint8", DType::U8),
    ("int8", DType::I8),
    ("int16", DType::I16),
    ("int32", DType::I32),
    ("int64", DType::I64),
    ("float16", DType::F16),
    ("bfloat16", DType::BF16),
    ("float32", DType::F32),
    ("float64", DType::F64),
    ("complex64", DType::C64),
    ("complex128", DType::C128),
    ("uint16", DType::U16),
    ("uint32", DType::U32),
    ("uint64", DType::U64),
];

/// The table, once torch is imported (ATTR-3); None before.
fn torch(py: Python<'_>) -> PyResult<Option<&'static Torch>> {
    if let Some(t) = TORCH.get(py) {
        return Ok(Some(t));
    }
    let modules = py.import("sys")?.getattr("modules")?;
    let Some(m) = modules.downcast::<PyDict>()?.get_item("torch")? else {
        return Ok(None);
    };
    let mut dtypes = Vec::with_capacity(DTYPES.len());
    for (name, d) in DTYPES {
        if let Ok(o) = m.getattr(name) {
            dtypes.push((o.unbind(), d));
        }
    }
    let t = Torch {
        tensor: m.getattr("Tensor")?.unbind(),
        strided: m.getattr("strided")?.unbind(),
        dtypes,
    };
    Ok(Some(TORCH.get_or_init(py, || t)))
}

/// `obj.name`, truthy or not (an error for a missing attribute).
fn flag(obj: &Bound<'_, PyAny>, name: &Bound<'_, pyo3::types::PyString>) -> PyResult<bool> {
    obj.getattr(name)?.is_truthy()
}

/// `obj.name()`, truthy or not.
fn call_flag(obj: &Bound<'_, PyAny>, name: &Bound<'_, pyo3::types::PyString>) -> PyResult<bool> {
    obj.call_method0(name)?.is_truthy()
}

/// A plain contiguous torch CPU tensor, imported without DLPack (ATTR-1, ATTR-2); None for
/// anything else, and for anything this path cannot read (the caller takes the DLPack import,
/// which says what is wrong).
pub fn torch_cpu(obj: &Bound<'_, PyAny>) -> Option<Tensor> {
    try_torch_cpu(obj).ok().flatten()
}

fn try_torch_cpu(obj: &Bound<'_, PyAny>) -> PyResult<Option<Tensor>> {
    let py = obj.py();
    let Some(t) = torch(py)? else {
        return Ok(None);
    };
    if !obj.get_type().is(&t.tensor) {
        return Ok(None);
    }
    let dt = obj.getattr(intern!(py, "dtype"))?;
    let Some(dtype) = (t.dtypes.iter())
        .find(|(o, _)| o.as_ptr() == dt.as_ptr())
        .map(|(_, d)| *d)
    else {
        return Ok(None);
    };
    if !flag(obj, intern!(py, "is_cpu"))?
        || !obj.getattr(intern!(py, "layout"))?.is(&t.strided)
        || flag(obj, intern!(py, "is_nested"))?
        || call_flag(obj, intern!(py, "is_neg"))?
        // torch sets the conjugate bit only on complex dtypes (TensorImpl asserts it).
        || (matches!(dtype, DType::C64 | DType::C128) && call_flag(obj, intern!(py, "is_conj"))?)
        || !call_flag(obj, intern!(py, "is_contiguous"))?
    {
        return Ok(None);
    }
    let size = obj.getattr(intern!(py, "shape"))?;
    let dims = size.downcast::<PyTuple>()?;
    let mut shape = Vec::with_capacity(dims.len());
    for d in dims.iter() {
        shape.push(d.extract::<usize>()?);
    }
    let ptr = obj
        .call_method0(intern!(py, "data_ptr"))?
        .extract::<usize>()? as *mut u8;
    let len = shape.iter().product::<usize>() * dtype.itemsize();
    if len == 0 || ptr.is_null() {
        // An empty tensor may have no data pointer at all: DLPack's import handles it.
        return Ok(None);
    }
    let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(obj.clone().unbind());
    // SAFETY: a contiguous CPU torch tensor's `numel * itemsize` bytes from `data_ptr()` are its
    // elements in C order, valid while its storage lives; `keep` holds the tensor, and so its
    // storage, for the engine tensor's lifetime (ATTR-2).
    Ok(Some(unsafe {
        Tensor::from_raw(dtype, shape, None, Device::Cpu, ptr, len, keep)
    }))
}

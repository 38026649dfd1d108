//! DLPack: tensors cross between Python and the engine by pointer and metadata, never by linking
//! libtorch. Import reads any object with `__dlpack__` (torch, numpy, cupy, jax...); export hands
//! received tensors to `torch.from_dlpack` / `numpy.from_dlpack` without a copy.
//!
//! Invariants:
//! - DL-1: an imported tensor's producer capsule is kept alive (in the engine tensor's `keep`) for
//!   as long as the engine may read or write its memory.
//! - DL-2: an exported capsule owns its engine tensor until the consumer calls the deleter, or,
//!   if never consumed, until the capsule is destroyed (the standard "used_dltensor" protocol).
//! - DL-4: a tensor the wire cannot carry (sparse, quantized, nested, conjugate or negative bit
//!   set, float8 and other dtypes without a wire code) is refused with the package's Unsupported
//!   error naming its dtype or layout and the fix, checked before `__dlpack__` is called (whose
//!   own errors are torch's or numpy's classes, and are also turned into Unsupported).
//! - DL-3: CUDA tensors are imported with our stream as DLPack's `stream` argument (the producer
//!   orders its work before ours); exported CUDA tensors are complete (our stream was
//!   synchronized), so the consumer may use them on any stream.

use crate::errors::IntoPyResult;
use parallel_engine::value::{DType, Device, Tensor};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::ffi;
use pyo3::prelude::*;
use std::ffi::{CStr, c_void};
use std::os::raw::c_char;
use std::sync::Arc;

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDevice {
    device_type: i32,
    device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct DLDataType {
    code: u8,
    bits: u8,
    lanes: u16,
}

#[repr(C)]
struct DLTensor {
    data: *mut c_void,
    device: DLDevice,
    ndim: i32,
    dtype: DLDataType,
    shape: *mut i64,
    strides: *mut i64,
    byte_offset: u64,
}

#[repr(C)]
struct DLManagedTensor {
    dl_tensor: DLTensor,
    manager_ctx: *mut c_void,
    deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const KDL_CPU: i32 = 1;
const KDL_CUDA: i32 = 2;
const NAME: &CStr = c"dltensor";
const USED: &CStr = c"used_dltensor";

fn dtype_from(dt: DLDataType) -> Option<DType> {
    if dt.lanes != 1 {
        return None;
    }
    Some(match (dt.code, dt.bits) {
        (0, 8) => DType::I8,
        (0, 16) => DType::I16,
        (0, 32) => DType::I32,
        (0, 64) => DType::I64,
        (1, 8) => DType::U8,
        (1, 16) => DType::U16,
        (1, 32) => DType::U32,
        (1, 64) => DType::U64,
        (2, 16) => DType::F16,
        (2, 32) => DType::F32,
        (2, 64) => DType::F64,
        (4, 16) => DType::BF16,
        (5, 64) => DType::C64,
        (5, 128) => DType::C128,
        (6, 8) => DType::Bool,
        _ => return None,
    })
}

fn dtype_to(d: DType) -> DLDataType {
    let (code, bits) = match d {
        DType::I8 => (0, 8),
        DType::I16 => (0, 16),
        DType::I32 => (0, 32),
        DType::I64 => (0, 64),
        DType::U8 => (1, 8),
        DType::U16 => (1, 16),
        DType::U32 => (1, 32),
        DType::U64 => (1, 64),
        DType::F16 => (2, 16),
        DType::F32 => (2, 32),
        DType::F64 => (2, 64),
        DType::BF16 => (4, 16),
        DType::C64 => (5, 64),
        DType::C128 => (5, 128),
        DType::Bool => (6, 8),
    };
    DLDataType {
        code,
        bits,
        lanes: 1,
    }
}

/// The producer's capsule (and object), kept alive while the engine uses the memory (DL-1).
struct Keep {
    _capsule: Py<PyAny>,
    _obj: Py<PyAny>,
}

/// Imports a tensor-like object whose data the engine reads (a send): a non-contiguous CUDA
/// tensor is made contiguous first (on the GPU, by its own library).
pub fn import(obj: &Bound<'_, PyAny>) -> PyResult<Tensor> {
    import_as(obj, false)
}

/// Imports a tensor-like object the engine writes into (`out=`, collectives). A non-contiguous
/// CUDA tensor is replaced by a contiguous copy, returned too: the caller copies it back into the
/// view once the engine is done (`convert::write_back`).
pub fn import_out(obj: &Bound<'_, PyAny>) -> PyResult<(Tensor, Option<PyObject>)> {
    if obj.hasattr("is_cuda")?
        && obj.getattr("is_cuda")?.is_truthy()?
        && !obj.call_method0("is_contiguous")?.is_truthy()?
    {
        let tmp = obj.call_method0("contiguous")?;
        let t = import_as(&tmp, true)?;
        return Ok((t, Some(tmp.unbind())));
    }
    Ok((import_as(obj, true)?, None))
}

/// Imports a tensor-like object through `__dlpack__`. torch tensors that require grad are
/// detached first (we only read or fill their data).
///
/// CUDA (DL-3): the producer is asked, through DLPack's `stream` argument, to order its pending
/// work on the tensor before our stream of that device (torch records an event on its current
/// stream and makes ours wait); our calls synchronize our stream before they return.
fn import_as(obj: &Bound<'_, PyAny>, write: bool) -> PyResult<Tensor> {
    let py = obj.py();
    refuse_unwired(obj)?;
    let mut src = obj.clone();
    if src.hasattr("requires_grad")? && src.getattr("requires_grad")?.is_truthy()? {
        src = src.call_method0("detach")?;
    }
    let (dev_type, dev_id) = if src.hasattr("__dlpack_device__")? {
        src.call_method0("__dlpack_device__")?
            .extract::<(i32, i32)>()
            .unwrap_or((KDL_CPU, 0))
    } else {
        (KDL_CPU, 0)
    };
    let capsule = if dev_type == KDL_CUDA {
        let g = parallel_engine::cuda::require(if write { "recv" } else { "send" }).py()?;
        if src.hasattr("is_contiguous")? && !src.call_method0("is_contiguous")?.is_truthy()? {
            if write {
                return Err(PyValueError::new_err(
                    "a non-contiguous CUDA tensor cannot be filled in place: pass a contiguous tensor and copy it into the view afterwards",
                ));
            }
            src = src.call_method0("contiguous")?;
        }
        let stream = g.stream(dev_id).py()?;
        let kw = pyo3::types::PyDict::new(py);
        kw.set_item("stream", stream)?;
        // torch orders its *current device's* current stream before ours: make the tensor's
        // device current for the call (harmless for other producers).
        // (Without a CUDA-enabled torch, e.g. for a CuPy array, there is nothing to set.)
        let on_device = py
            .import("torch")
            .and_then(|t| t.getattr("cuda")?.getattr("device")?.call1((dev_id,)))
            .ok()
            .filter(|d| d.call_method0("__enter__").is_ok());
        let cap = src.call_method("__dlpack__", (), Some(&kw));
        if let Some(d) = &on_device {
            d.call_method1("__exit__", (py.None(), py.None(), py.None()))?;
        }
        cap.map_err(|e| not_exported(obj, e))?
    } else {
        src.call_method0("__dlpack__")
            .map_err(|e| not_exported(obj, e))?
    };
    // SAFETY: PyCapsule_GetPointer checks the capsule type and name and returns NULL (with an
    // exception set) when they do not match.
    let p = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), NAME.as_ptr()) }
        as *mut DLManagedTensor;
    if p.is_null() {
        return Err(PyErr::take(py).unwrap_or_else(|| {
            PyTypeError::new_err("__dlpack__ did not return a 'dltensor' capsule")
        }));
    }
    // SAFETY: a valid, unconsumed dltensor capsule points at a DLManagedTensor that stays valid
    // while the capsule lives (we keep it, DL-1).
    let t = unsafe { &(*p).dl_tensor };
    let ty = obj
        .get_type()
        .name()
        .map(|n| n.to_string())
        .unwrap_or_default();
    let dtype = dtype_from(t.dtype).ok_or_else(|| {
        refuse(format!(
            "unsupported tensor dtype (DLPack code {}, {} bits, {} lanes) in a {ty}: cast it to one of bool, (u)int8-64, float16, bfloat16, float32, float64, complex64, complex128",
            t.dtype.code, t.dtype.bits, t.dtype.lanes
        ))
    })?;
    let device = match t.device.device_type {
        KDL_CPU => Device::Cpu,
        KDL_CUDA => Device::Cuda(t.device.device_id),
        other => {
            return Err(PyValueError::new_err(format!(
                "tensors on DLPack device type {other} are not supported; move the tensor to the CPU first"
            )));
        }
    };
    let nd = usize::try_from(t.ndim).map_err(|_| PyValueError::new_err("negative ndim"))?;
    // SAFETY: shape has ndim entries (DLPack contract); strides is either NULL or has ndim entries.
    let shape_i: Vec<i64> = if nd == 0 {
        vec![]
    } else {
        // SAFETY: shape has ndim entries (DLPack contract).
        unsafe { std::slice::from_raw_parts(t.shape, nd) }.to_vec()
    };
    let strides_i: Option<Vec<i64>> = if t.strides.is_null() || nd == 0 {
        None
    } else {
        // SAFETY: non-NULL strides have ndim entries (DLPack contract).
        Some(unsafe { std::slice::from_raw_parts(t.strides, nd) }.to_vec())
    };
    let shape: Vec<usize> = shape_i
        .iter()
        .map(|d| usize::try_from(*d))
        .collect::<Result<_, _>>()
        .map_err(|_| PyValueError::new_err("negative dimension"))?;
    let strides: Option<Vec<isize>> = strides_i.map(|s| s.iter().map(|x| *x as isize).collect());
    if strides.as_ref().is_some_and(|s| s.iter().any(|x| *x < 0)) {
        return Err(PyValueError::new_err(format!(
            "tensors with negative strides are not supported (a flipped view?); call .contiguous() on the {ty} first"
        )));
    }
    let item = dtype.itemsize();
    let numel: usize = shape.iter().product();
    let span = if numel == 0 {
        0
    } else {
        match &strides {
            None => numel * item,
            Some(s) => {
                (shape
                    .iter()
                    .zip(s)
                    .map(|(d, st)| (d - 1) * *st as usize)
                    .sum::<usize>()
                    + 1)
                    * item
            }
        }
    };
    // SAFETY: data + byte_offset is the first element per the DLPack contract.
    let ptr = unsafe { (t.data as *mut u8).add(t.byte_offset as usize) };
    let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(Keep {
        _capsule: capsule.unbind(),
        _obj: src.unbind(),
    });
    // SAFETY: the producer guarantees the memory described by (ptr, shape, strides) is valid while
    // its capsule lives; `keep` holds the capsule for the tensor's lifetime (DL-1).
    Ok(unsafe { Tensor::from_raw(dtype, shape, strides, device, ptr, span, keep) })
}

/// The package's Unsupported error for a tensor the wire cannot carry (DL-4).
fn refuse(msg: String) -> PyErr {
    crate::errors::to_py(parallel_engine::Error::new(
        parallel_engine::ErrorKind::Unsupported,
        "tensor",
        msg,
    ))
}

/// `__dlpack__` failed: an Unsupported error naming the tensor and the producer's reason (DL-4).
fn not_exported(obj: &Bound<'_, PyAny>, e: PyErr) -> PyErr {
    let what = obj
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_else(|_| crate::convert::type_name(obj));
    refuse(format!(
        "a {} {what} cannot be exported by DLPack ({e}): make it a dense, contiguous tensor of a plain dtype first (e.g. .to_dense(), .contiguous(), a cast)",
        crate::convert::type_name(obj)
    ))
}

/// The torch dtypes the wire carries (the others, float8 kinds among them, have no wire code).
const WIRED: [&str; 15] = [
    "torch.bool",
    "torch.uint8",
    "torch.int8",
    "torch.int16",
    "torch.int32",
    "torch.int64",
    "torch.float16",
    "torch.bfloat16",
    "torch.float32",
    "torch.float64",
    "torch.complex64",
    "torch.complex128",
    "torch.uint16",
    "torch.uint32",
    "torch.uint64",
];

/// Refuses torch tensors the wire cannot carry, naming the dtype or layout and the fix, before
/// DLPack export is attempted (DL-4). Only torch tensors have these properties.
fn refuse_unwired(obj: &Bound<'_, PyAny>) -> PyResult<()> {
    let ty = obj.get_type();
    if !ty
        .module()
        .is_ok_and(|m| m.to_string().starts_with("torch"))
    {
        return Ok(());
    }
    let flag = |name: &str| -> bool {
        obj.getattr(name)
            .and_then(|v| v.is_truthy())
            .unwrap_or(false)
    };
    let call = |name: &str| -> bool {
        obj.call_method0(name)
            .and_then(|v| v.is_truthy())
            .unwrap_or(false)
    };
    let layout = obj
        .getattr("layout")
        .map(|l| l.to_string())
        .unwrap_or_default();
    let dtype = obj
        .getattr("dtype")
        .map(|d| d.to_string())
        .unwrap_or_default();
    let why = if flag("is_nested") {
        Some("a nested tensor cannot be sent: send t.unbind() (a list of tensors) or t.to_padded_tensor(0)".to_string())
    } else if flag("is_sparse") || (!layout.is_empty() && layout != "torch.strided") {
        Some(format!(
            "a sparse tensor (layout {layout}) cannot be sent: call .to_dense() first"
        ))
    } else if flag("is_quantized") {
        Some(format!(
            "a quantized tensor ({dtype}) cannot be sent: call .dequantize() first, or send .int_repr() with its scale and zero point"
        ))
    } else if call("is_conj") {
        Some(format!(
            "a {dtype} tensor with its conjugate bit set cannot be sent: call .resolve_conj() first"
        ))
    } else if call("is_neg") {
        Some(format!(
            "a {dtype} tensor with its negative bit set cannot be sent: call .resolve_neg() first"
        ))
    } else if !dtype.is_empty() && !WIRED.contains(&dtype.as_str()) {
        Some(format!(
            "a {dtype} tensor cannot be sent (the wire has no code for this dtype): cast it first, e.g. t.to(torch.bfloat16), or send its bytes with t.view(torch.uint8)"
        ))
    } else {
        None
    };
    match why {
        Some(m) => Err(refuse(m)),
        None => Ok(()),
    }
}

/// What an exported capsule owns.
struct Ctx {
    tensor: Tensor,
    shape: Vec<i64>,
    /// Element strides of a strided view (a tensor passed by reference between threads).
    strides: Option<Vec<i64>>,
}

unsafe extern "C" fn deleter(m: *mut DLManagedTensor) {
    if m.is_null() {
        return;
    }
    // SAFETY: m and its manager_ctx were created by `export` with Box::into_raw; the DLPack
    // consumer calls the deleter exactly once.
    unsafe {
        drop(Box::from_raw((*m).manager_ctx as *mut Ctx));
        drop(Box::from_raw(m));
    }
}

unsafe extern "C" fn capsule_destructor(capsule: *mut ffi::PyObject) {
    // SAFETY: called by Python with the capsule; only an unconsumed capsule still owns its tensor
    // (DL-2); a consumed one was renamed "used_dltensor" and its consumer owns the deleter call.
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, NAME.as_ptr()) == 1 {
            let m = ffi::PyCapsule_GetPointer(capsule, NAME.as_ptr()) as *mut DLManagedTensor;
            deleter(m);
        } else {
            ffi::PyErr_Clear();
        }
    }
}

/// Wraps an engine tensor into a new "dltensor" capsule (DL-2).
pub fn export(py: Python<'_>, tensor: Tensor) -> PyResult<PyObject> {
    let shape: Vec<i64> = tensor.shape().iter().map(|d| *d as i64).collect();
    let dtype = dtype_to(tensor.dtype());
    let strides = (!tensor.is_contiguous())
        .then(|| {
            tensor
                .strides()
                .as_ref()
                .map(|s| s.iter().map(|x| *x as i64).collect())
        })
        .flatten();
    let device = tensor.device();
    let mut ctx = Box::new(Ctx {
        tensor,
        shape,
        strides,
    });
    let data = ctx.tensor.data_mut_ptr() as *mut c_void;
    let ndim = ctx.shape.len() as i32;
    let shape_ptr = ctx.shape.as_mut_ptr();
    let strides_ptr = ctx
        .strides
        .as_mut()
        .map_or(std::ptr::null_mut(), |s| s.as_mut_ptr());
    let m = Box::new(DLManagedTensor {
        dl_tensor: DLTensor {
            data,
            device: match device {
                Device::Cpu => DLDevice {
                    device_type: KDL_CPU,
                    device_id: 0,
                },
                Device::Cuda(i) => DLDevice {
                    device_type: KDL_CUDA,
                    device_id: i,
                },
            },
            ndim,
            dtype,
            shape: shape_ptr,
            strides: strides_ptr,
            byte_offset: 0,
        },
        manager_ctx: Box::into_raw(ctx) as *mut c_void,
        deleter: Some(deleter),
    });
    let raw = Box::into_raw(m);
    // SAFETY: creating a capsule over our heap DLManagedTensor with a destructor that frees it
    // unless consumed (DL-2).
    let cap = unsafe {
        ffi::PyCapsule_New(
            raw as *mut c_void,
            NAME.as_ptr() as *const c_char,
            Some(capsule_destructor),
        )
    };
    if cap.is_null() {
        // SAFETY: the capsule was not created, so we still own raw.
        unsafe { deleter(raw) };
        return Err(PyErr::fetch(py));
    }
    // SAFETY: cap is a new strong reference.
    Ok(unsafe { Py::from_owned_ptr(py, cap) })
}

/// Marks a capsule consumed (tests).
#[allow(dead_code)]
pub fn used_name() -> &'static CStr {
    USED
}

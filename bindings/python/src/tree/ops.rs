//! The `op=` argument of the Tree's reductions: a name, a `torch.distributed.ReduceOp`, or a
//! Python callable `f(a, b)` run on torch views of each chunk (host memory, or CUDA tensors for
//! the device form), whose first exception becomes the cause of the error on this rank.

use crate::convert;
use parallel_collectives::ops::{Op, UserReduce};
use parallel_collectives::tree::DeviceReduce;
use parallel_engine::value::{DType, Device, Tensor};
use parallel_engine::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::PyString;
use std::sync::{Arc, Mutex};

/// The first exception a Python reduce function raised in one call, kept to become the cause
/// of the error that call raises on this rank.
pub(super) type Raised = Arc<Mutex<Option<PyErr>>>;

pub(super) fn op_or_sum(
    op: Option<&Bound<'_, PyAny>>,
) -> PyResult<(Op, Option<DeviceReduce>, Raised)> {
    op.map_or(Ok((Op::Sum, None, Raised::default())), make_op)
}

/// The Python exception for a collective's error; when this rank's reduce function raised, its
/// exception becomes the cause (`raise ... from exc`).
pub(super) fn with_cause(py: Python<'_>, err: PyErr, raised: &Raised) -> PyErr {
    if let Some(orig) = raised.lock().unwrap_or_else(|p| p.into_inner()).take() {
        err.set_cause(py, Some(orig));
    }
    err
}

/// A built-in op by name; an unknown name is a ValueError naming what was passed.
fn named_op(name: &str) -> PyResult<Op> {
    Op::parse(name).map_err(|_| {
        pyo3::exceptions::PyValueError::new_err(format!(
            "op={name:?} is not a reduction: expected sum, prod, min, max, avg, band, bor, bxor, \
             a torch.distributed.ReduceOp or a callable f(a, b)"
        ))
    })
}

/// A TypeError unless `obj` is a tensor (DLPack), saying which call and argument wanted one.
pub(super) fn require_tensor(obj: &Bound<'_, PyAny>, call: &str, torch_only: bool) -> PyResult<()> {
    let ok = if torch_only {
        obj.hasattr("tensor_split")? && obj.hasattr("clone")?
    } else {
        obj.hasattr("__dlpack__")?
    };
    if ok {
        return Ok(());
    }
    let wanted = if torch_only {
        "a torch.Tensor"
    } else {
        "a tensor (torch.Tensor, numpy.ndarray or any DLPack object)"
    };
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "{call}(tensor) expects {wanted}, not {}; for numbers or nested values use \
         all_reduce or broadcast",
        convert::type_name(obj)
    )))
}

/// The op's name for a `torch.distributed.ReduceOp` (`ReduceOp.SUM`, a pybind `RedOpType`, or a
/// `ReduceOp` object holding one in `.op`); None for anything else. PREMUL_SUM has no name here
/// and is refused with what to use instead.
fn torch_reduce_op(op: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
    let ty = op.get_type();
    let module: String = ty.getattr("__module__")?.extract().unwrap_or_default();
    let qualname: String = ty.getattr("__qualname__")?.extract().unwrap_or_default();
    if !module.starts_with("torch")
        || !(qualname.ends_with("ReduceOp") || qualname.ends_with("RedOpType"))
    {
        return Ok(None);
    }
    let inner = if qualname.ends_with("ReduceOp") {
        op.getattr("op")?
    } else {
        op.clone()
    };
    let name: String = inner.getattr("name")?.extract()?;
    Ok(Some(match name.as_str() {
        "SUM" => "sum",
        "PRODUCT" => "prod",
        "MIN" => "min",
        "MAX" => "max",
        "AVG" => "avg",
        "BAND" => "band",
        "BOR" => "bor",
        "BXOR" => "bxor",
        other => {
            return Err(pyo3::exceptions::PyValueError::new_err(format!(
                "op=torch.distributed.ReduceOp.{other} is not supported: use SUM, PRODUCT, MIN, \
                 MAX, AVG, BAND, BOR or BXOR (for PREMUL_SUM, scale the tensor first and use SUM)"
            )));
        }
    }))
}

/// Builds the op: a name, or a Python callable applied to torch views of each chunk (host
/// memory) and, for CUDA tensors, to torch CUDA tensors (the device form).
pub(super) fn make_op(op: &Bound<'_, PyAny>) -> PyResult<(Op, Option<DeviceReduce>, Raised)> {
    if let Ok(s) = op.downcast::<PyString>() {
        return Ok((named_op(s.to_str()?)?, None, Raised::default()));
    }
    if let Some(name) = torch_reduce_op(op)? {
        return Ok((named_op(name)?, None, Raised::default()));
    }
    if !op.is_callable() {
        return Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "op must be a name (sum, prod, min, max, avg, band, bor, bxor), a \
             torch.distributed.ReduceOp or a callable f(a, b), not {}",
            convert::type_name(op)
        )));
    }
    let f: Arc<Py<PyAny>> = Arc::new(op.clone().unbind());
    // Calls f(a, b) on two views; copies a returned result into a.
    fn apply(
        py: Python<'_>,
        f: &Py<PyAny>,
        device: Device,
        dtype: DType,
        n: usize,
        dst: *mut u8,
        src: *mut u8,
    ) -> PyResult<()> {
        let wrap = |p: *mut u8| -> PyResult<PyObject> {
            let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(());
            // SAFETY: the view covers exactly the chunk, valid for the duration of this call;
            // the user function must not keep references to it (documented).
            let t = unsafe {
                Tensor::from_raw(dtype, vec![n], None, device, p, n * dtype.itemsize(), keep)
            };
            convert::to_py(py, parallel_engine::Value::Tensor(t), &[], false)
        };
        let a = wrap(dst)?;
        let b = wrap(src)?;
        let r = f.call1(py, (a.clone_ref(py), b))?;
        if !r.is_none(py) && !r.is(&a) {
            check_result(py, a.bind(py), r.bind(py))?;
            a.call_method1(py, "copy_", (r,))?;
        }
        if let Device::Cuda(i) = device {
            // The function queued its work on torch's current stream: finish it before our
            // stream goes on with the result.
            py.import("torch")?
                .getattr("cuda")?
                .call_method1("synchronize", (i,))?;
        }
        Ok(())
    }
    // Keeps the first exception (the cause on this rank); the Tree gets its text (for the others).
    fn raised(py: Python<'_>, e: PyErr, keep: &Raised) -> Error {
        let msg = e.to_string();
        keep.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| e.clone_ref(py));
        Error::new(ErrorKind::Worker, "all_reduce", msg)
    }
    let keep = Raised::default();
    let (fh, kh) = (f.clone(), keep.clone());
    let user: UserReduce = Arc::new(move |dst: &mut [u8], src: &[u8], dtype: DType, n: usize| {
        Python::with_gil(|py| {
            apply(
                py,
                &fh,
                Device::Cpu,
                dtype,
                n,
                dst.as_mut_ptr(),
                src.as_ptr() as *mut u8,
            )
            .map_err(|e| raised(py, e, &kh))
        })
    });
    let kd = keep.clone();
    let device: DeviceReduce = Arc::new(move |dst: u64, src: u64, dtype: DType, n: usize, dev| {
        Python::with_gil(|py| {
            apply(
                py,
                &f,
                Device::Cuda(dev),
                dtype,
                n,
                dst as *mut u8,
                src as *mut u8,
            )
            .map_err(|e| raised(py, e, &kd))
        })
    });
    Ok((Op::User(user), Some(device), keep))
}

/// A reduce function's result must be a tensor like its first argument: `copy_` would otherwise
/// broadcast a wrong shape or cast a wrong dtype without a word.
fn check_result(py: Python<'_>, a: &Bound<'_, PyAny>, r: &Bound<'_, PyAny>) -> PyResult<()> {
    let describe = |x: &Bound<'_, PyAny>| -> PyResult<String> {
        match (x.getattr("shape"), x.getattr("dtype")) {
            (Ok(shape), Ok(dtype)) => {
                let shape = py.import("builtins")?.getattr("tuple")?.call1((shape,))?;
                Ok(format!(
                    "a tensor of shape {} and dtype {}",
                    shape.repr()?,
                    dtype
                ))
            }
            _ => Ok(format!("a {}", x.get_type().name()?)),
        }
    };
    let same = |name: &str| -> bool {
        match (a.getattr(name), r.getattr(name)) {
            (Ok(x), Ok(y)) => x.eq(y).unwrap_or(false),
            _ => false,
        }
    };
    if same("shape") && same("dtype") {
        return Ok(());
    }
    Err(pyo3::exceptions::PyTypeError::new_err(format!(
        "the reduce function returned {}, but its first argument is {}: update the first argument \
         in place (and return it or None) or return a tensor of the same shape and dtype",
        describe(r)?,
        describe(a)?
    )))
}

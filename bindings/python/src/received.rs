//! A received tensor, exported to Python by DLPack without a copy.

use crate::dlpack;
use parallel_engine::value::Tensor;
use pyo3::prelude::*;
use std::sync::Mutex;

/// A received tensor, handed to `torch.from_dlpack` / `numpy.from_dlpack` without a copy.
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Received {
    tensor: Mutex<Option<Tensor>>,
    /// Kept apart: a consumer may ask for the device after `__dlpack__` took the tensor.
    device: parallel_engine::value::Device,
}

impl Received {
    pub fn new(t: Tensor) -> Received {
        Received {
            device: t.device(),
            tensor: Mutex::new(Some(t)),
        }
    }
}

#[pymethods]
impl Received {
    #[pyo3(signature = (stream=None, max_version=None, dl_device=None, copy=None))]
    fn __dlpack__(
        &self,
        py: Python<'_>,
        stream: Option<PyObject>,
        max_version: Option<PyObject>,
        dl_device: Option<PyObject>,
        copy: Option<PyObject>,
    ) -> PyResult<PyObject> {
        let _ = (stream, max_version, dl_device, copy);
        let t = self
            .tensor
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| {
                pyo3::exceptions::PyBufferError::new_err(
                    "this received tensor was already exported",
                )
            })?;
        dlpack::export(py, t)
    }
    fn __dlpack_device__(&self) -> (i32, i32) {
        match self.device {
            parallel_engine::value::Device::Cuda(i) => (2, i),
            parallel_engine::value::Device::Cpu => (1, 0),
        }
    }
}

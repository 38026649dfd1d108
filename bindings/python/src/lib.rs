#![allow(missing_debug_implementations)] // pyclasses present themselves through __repr__
//! torch_parallel._native: the Python face of Parallel's engine.
//!
//! Native classes (Server, Client, Connection, Handle) wrap the engine's endpoints directly; the
//! package's Python files add only the exception classes and small conveniences.
//!
//! Invariants:
//! - PY-1: the GIL is released for every wait ([`wait`]); waits run in slices, and Ctrl-C on the
//!   main thread interrupts a blocking call with KeyboardInterrupt.
//! - PY-2: no transport logic here: every byte moves inside the engine.
//!
//! Files: `conn` (Client, Connection and their Handle), `server`, `received` (a received tensor
//! for DLPack), `dlpack` and `attrs` (tensors in: by DLPack, or a plain torch CPU tensor by its
//! attributes), `functions` (the module's functions), `tree` and `workers`, `callbacks` (Python
//! code on the engine's executor: done callbacks and lanes of Python jobs); here the GIL-free
//! wait every blocking call goes through, and the module's contents.

mod attrs;
mod callbacks;
mod conn;
mod convert;
mod dlpack;
mod errors;
mod functions;
mod logs;
mod received;
mod server;
mod structure;
mod tree;
mod workers;

use parallel_engine::ErrorKind;
use pyo3::prelude::*;
use received::Received;
use std::time::Duration;

pub(crate) fn timeout(t: Option<f64>) -> PyResult<Option<Duration>> {
    match t {
        None => Ok(None),
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s))),
        Some(s) if s.is_infinite() && s > 0.0 => Ok(Some(Duration::from_secs(100 * 365 * 86400))),
        Some(s) => Err(pyo3::exceptions::PyValueError::new_err(format!(
            "timeout must be a non-negative number of seconds, not {s}"
        ))),
    }
}

/// Interrupt check run between wait slices: only the main thread sees KeyboardInterrupt.
fn interrupt_pending() -> bool {
    // SAFETY: plain syscalls without arguments.
    let main = unsafe { libc::gettid() == libc::getpid() };
    if !main {
        return false;
    }
    Python::with_gil(|py| match py.check_signals() {
        Ok(()) => false,
        Err(e) => {
            // Keep the exception pending so the binding re-raises exactly what the handler raised.
            e.restore(py);
            true
        }
    })
}

/// Runs a blocking engine call without the GIL (PY-1).
pub(crate) fn wait<T: Send>(
    py: Python<'_>,
    f: impl FnOnce() -> parallel_engine::Result<T> + Send,
) -> PyResult<T> {
    match py.allow_threads(f) {
        Ok(v) => Ok(v),
        Err(e) if e.kind() == ErrorKind::Cancelled => {
            Err(PyErr::take(py).unwrap_or_else(|| errors::to_py(e)))
        }
        Err(e) => Err(errors::to_py(e)),
    }
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    parallel_engine::runtime::set_interrupt_check(interrupt_pending);
    logs::install();
    m.add_function(wrap_pyfunction!(logs::_log_next, m)?)?;
    m.add_class::<server::Server>()?;
    m.add_class::<conn::Client>()?;
    m.add_class::<conn::Connection>()?;
    m.add_class::<conn::Handle>()?;
    m.add_class::<Received>()?;
    m.add_class::<workers::WorkQueue>()?;
    m.add_class::<tree::Tree_>()?;
    m.add_class::<tree::Work>()?;
    m.add_class::<callbacks::Lane>()?;
    m.add_class::<callbacks::Job>()?;
    m.add_function(wrap_pyfunction!(callbacks::_close_callbacks, m)?)?;
    m.add_function(wrap_pyfunction!(functions::config, m)?)?;
    m.add_function(wrap_pyfunction!(functions::io_backend, m)?)?;
    m.add_function(wrap_pyfunction!(functions::io_backend_reason, m)?)?;
    m.add_function(wrap_pyfunction!(functions::cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(functions::cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(functions::topology, m)?)?;
    m.add_function(wrap_pyfunction!(functions::wait_stats, m)?)?;
    m.add_function(wrap_pyfunction!(functions::cross_memory, m)?)?;
    m.add_function(wrap_pyfunction!(functions::_add_nvrtc_hint, m)?)?;
    m.add_function(wrap_pyfunction!(functions::_set_cuda_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(functions::environment_markdown, m)?)?;
    m.add_function(wrap_pyfunction!(functions::_register_errors, m)?)?;
    m.add_function(wrap_pyfunction!(functions::_set_tensor_factory, m)?)?;
    Ok(())
}

//! The one mapping from engine error kinds to Python exception classes.
//!
//! The classes are defined in Python (torch_parallel/_errors.py) so that they can also subclass
//! the built-ins users catch (TimeoutError, ConnectionError, ValueError, ...); the package
//! registers them here at import. Every engine error kind maps to exactly one class (ERR-2).

use parallel_engine::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyDict;

static CLASSES: GILOnceCell<Py<PyDict>> = GILOnceCell::new();

pub fn register(py: Python<'_>, classes: Py<PyDict>) {
    let _ = CLASSES.set(py, classes);
}

fn kind_key(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::Timeout => "timeout",
        ErrorKind::PeerLost => "peer_lost",
        ErrorKind::Closed => "closed",
        ErrorKind::Protocol => "protocol",
        ErrorKind::Auth => "auth",
        ErrorKind::Mismatch => "mismatch",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Config => "config",
        ErrorKind::Resource => "resource",
        ErrorKind::Cancelled => "cancelled",
        ErrorKind::Worker => "worker",
    }
}

/// Converts an engine error into the registered Python exception (with .kind, .peer, .op).
pub fn to_py(e: Error) -> PyErr {
    Python::with_gil(|py| {
        if e.kind() == ErrorKind::Cancelled {
            // Ctrl-C: the signal handler already ran; surface the KeyboardInterrupt it raised.
            if let Err(err) = py.check_signals() {
                return err;
            }
            return pyo3::exceptions::PyKeyboardInterrupt::new_err(e.to_string());
        }
        let Some(classes) = CLASSES.get(py) else {
            return pyo3::exceptions::PyRuntimeError::new_err(e.to_string());
        };
        let cls = match classes.bind(py).get_item(kind_key(e.kind())) {
            Ok(Some(c)) => c,
            _ => return pyo3::exceptions::PyRuntimeError::new_err(e.to_string()),
        };
        match cls.call1((e.to_string(),)) {
            Ok(inst) => {
                let _ = inst.setattr("kind", kind_key(e.kind()));
                let _ = inst.setattr("peer", e.peer());
                let _ = inst.setattr("op", e.op());
                PyErr::from_value(inst)
            }
            Err(err) => err,
        }
    })
}

/// An `Unsupported` error for values the bindings refuse.
pub fn unsupported(msg: impl Into<String>) -> PyErr {
    to_py(Error::new(ErrorKind::Unsupported, "send", msg))
}

pub trait IntoPyResult<T> {
    fn py(self) -> PyResult<T>;
}

impl<T> IntoPyResult<T> for parallel_engine::Result<T> {
    fn py(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

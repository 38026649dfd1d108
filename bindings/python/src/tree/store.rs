//! A `torch.distributed.Store` as the rendezvous's store: each call takes the GIL only for one
//! store call; waits poll and sleep without it, and see Ctrl-C (PY-1).

use parallel_engine::{Error, ErrorKind};
use pyo3::prelude::*;
use std::time::Duration;

/// A `torch.distributed.Store` (TCPStore, FileStore, HashStore, PrefixStore, or anything with
/// `set(key, bytes)`, `check([key])`, `get(key)` and `delete_key(key)`) as the rendezvous's store. Each call takes
/// the GIL only for one store call; waits sleep without it.
pub(super) struct PyStore {
    obj: Py<PyAny>,
    /// The host of the TCPStore underneath (through PrefixStores), if any.
    host: Option<String>,
}

impl std::fmt::Debug for PyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PyStore(host {:?})", self.host)
    }
}

impl PyStore {
    pub(super) fn new(obj: &Bound<'_, PyAny>) -> PyStore {
        let mut host = None;
        let mut cur = obj.clone();
        for _ in 0..8 {
            if let Ok(h) = cur.getattr("host").and_then(|h| h.extract::<String>()) {
                host = Some(h);
                break;
            }
            match cur.getattr("underlying_store") {
                Ok(inner) if !inner.is_none() => cur = inner,
                _ => break,
            }
        }
        PyStore {
            obj: obj.clone().unbind(),
            host,
        }
    }

    /// The engine's error for an exception a store method raised. A `KeyboardInterrupt` (or
    /// another `BaseException` that is not an `Exception`, such as `SystemExit`) stays pending,
    /// and the error is `Cancelled`, so the binding re-raises it as it was (PY-1).
    fn error(py: Python<'_>, what: &str, key: &str, e: PyErr) -> Error {
        if !e.is_instance_of::<pyo3::exceptions::PyException>(py) {
            let msg = format!("interrupted in the store's {what}({key:?})");
            e.restore(py);
            return Error::new(ErrorKind::Cancelled, "store", msg);
        }
        let name = e
            .get_type(py)
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        let text = e.to_string();
        let kind = if name.contains("Network") {
            ErrorKind::PeerLost
        } else if text.to_ascii_lowercase().contains("timeout")
            || text.to_ascii_lowercase().contains("timed out")
        {
            ErrorKind::Timeout
        } else {
            ErrorKind::Resource
        };
        Error::new(
            kind,
            "store",
            format!("the store's {what}({key:?}) raised {name}: {text}"),
        )
    }
}

impl parallel_collectives::Store for PyStore {
    fn set(&self, key: &str, value: &[u8]) -> parallel_engine::Result<()> {
        Python::with_gil(|py| {
            self.obj
                .call_method1(py, "set", (key, pyo3::types::PyBytes::new(py, value)))
                .map(drop)
                .map_err(|e| PyStore::error(py, "set", key, e))
        })
    }

    fn delete(&self, key: &str) -> parallel_engine::Result<()> {
        Python::with_gil(|py| {
            self.obj
                .call_method1(py, "delete_key", (key,))
                .map(drop)
                .map_err(|e| PyStore::error(py, "delete_key", key, e))
        })
    }

    /// Polls `check([key])` (cheap, and quiet: a TCPStore logs a warning for every `wait` that
    /// times out), backing off to 50 ms, then `get`s it; Ctrl-C is seen between polls.
    fn get(&self, key: &str, timeout: Duration) -> parallel_engine::Result<Vec<u8>> {
        let deadline = std::time::Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let got = Python::with_gil(|py| -> parallel_engine::Result<Option<Vec<u8>>> {
                let there = self
                    .obj
                    .call_method1(py, "check", (vec![key],))
                    .and_then(|v| v.extract::<bool>(py))
                    .map_err(|e| PyStore::error(py, "check", key, e))?;
                if !there {
                    return Ok(None);
                }
                self.obj
                    .call_method1(py, "get", (key,))
                    .and_then(|v| v.extract::<Vec<u8>>(py))
                    .map(Some)
                    .map_err(|e| PyStore::error(py, "get", key, e))
            })?;
            if let Some(v) = got {
                return Ok(v);
            }
            if crate::interrupt_pending() {
                return Err(Error::new(
                    ErrorKind::Cancelled,
                    "store",
                    format!("interrupted while waiting for the key {key:?}"),
                ));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "store",
                    format!("the key {key:?} was not set within {timeout:?}"),
                ));
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn host(&self) -> Option<String> {
        self.host.clone()
    }
}

//! The Python `Server`: listens, hands out `Connection`s, receives from any client, broadcasts.

use crate::conn::{Connection, stats_dict};
use crate::{convert, timeout, wait};
use parallel_engine::Conn;
use parallel_engine::endpoint::ServerStats;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::Arc;

/// A listening server (create it with `torch_parallel.server(host, port)`); clients connect with
/// `torch_parallel.client`. `wait_for(n)` waits for n clients, `recv_any()` takes the next message
/// of any client, `broadcast(value)` sends to all, `clients(n, f)` runs `f(conn)` on n of them.
/// With `PARALLEL_SECRET` set, every client is authenticated (AuthError otherwise).
///
/// Example:
/// ```python
/// import torch_parallel as parallel
/// with parallel.server("127.0.0.1", 0) as server:
///     with parallel.client("127.0.0.1", server.port) as client:
///         client.send("hi")
///         assert server.recv_any(timeout=10) == "hi"
/// ```
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Server {
    server: parallel_engine::Server,
    pickle: bool,
}

impl Server {
    fn wrap(&self, c: Arc<Conn>) -> Connection {
        Connection {
            conn: c,
            pickle: self.pickle,
        }
    }
}

#[pymethods]
impl Server {
    #[new]
    #[pyo3(signature = (host="127.0.0.1", port=0, allow_pickle=false))]
    fn new(py: Python<'_>, host: &str, port: u16, allow_pickle: bool) -> PyResult<Server> {
        let host = host.to_string();
        let server = wait(py, move || parallel_engine::Server::bind(&host, port))?;
        Ok(Server {
            server,
            pickle: allow_pickle,
        })
    }
    /// The port the server listens on (the ephemeral port chosen when created with 0).
    #[getter]
    fn port(&self) -> u16 {
        self.server.port()
    }
    /// The address the server listens on.
    #[getter]
    fn host(&self) -> String {
        self.server.addr().ip().to_string()
    }
    /// Current connections, ordered by id.
    fn connections(&self) -> Vec<Connection> {
        self.server
            .connections()
            .into_iter()
            .map(|c| self.wrap(c))
            .collect()
    }
    /// Blocks until at least `n` clients are connected.
    #[pyo3(signature = (n, timeout=None))]
    fn wait_for(&self, py: Python<'_>, n: usize, timeout: Option<f64>) -> PyResult<()> {
        let t = self::timeout(timeout)?;
        let s = self.server.clone();
        wait(py, move || s.wait_for(n, t))
    }
    /// Waits for `n` clients, then calls fn(conn) for each (with `tag`), ordered by conn.id.
    #[pyo3(signature = (n, f, tag=None, timeout=None))]
    fn clients(
        &self,
        py: Python<'_>,
        n: usize,
        f: &Bound<'_, PyAny>,
        tag: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        self.wait_for(py, n, timeout)?;
        let conns: Vec<_> = self
            .server
            .connections()
            .into_iter()
            .filter(|c| tag.is_none() || c.tag() == tag)
            .collect();
        for c in &conns {
            f.call1((self.wrap(c.clone()),))?;
        }
        Ok(conns.len())
    }
    /// Sends `value` to every client (with `tag`), in id order; returns how many got it. A client
    /// that departed or died is skipped (and dropped), never an error.
    #[pyo3(signature = (value, tag=None, timeout=None))]
    fn broadcast(
        &self,
        py: Python<'_>,
        value: &Bound<'_, PyAny>,
        tag: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let v = convert::to_value(value, self.pickle, 0)?;
        let t = self::timeout(timeout)?;
        let s = self.server.clone();
        wait(py, move || s.broadcast(&v, tag.as_deref(), t))
    }
    /// The next message from whichever client sends first (fairly).
    #[pyo3(signature = (timeout=None, tag=None))]
    fn recv_any(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        tag: Option<String>,
    ) -> PyResult<PyObject> {
        Ok(self.recv_any_from(py, timeout, tag)?.0)
    }
    /// Like recv_any, and also returns the connection it came from.
    #[pyo3(signature = (timeout=None, tag=None))]
    fn recv_any_from(
        &self,
        py: Python<'_>,
        timeout: Option<f64>,
        tag: Option<String>,
    ) -> PyResult<(PyObject, Connection)> {
        let t = self::timeout(timeout)?;
        let s = self.server.clone();
        let (v, c) = wait(py, move || s.recv_any(tag.as_deref(), t))?;
        Ok((convert::to_py(py, v, &[], self.pickle)?, self.wrap(c)))
    }
    /// Traffic of all connections (current and departed) and connection counts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let ServerStats {
            traffic,
            connections,
            accepted,
            refused,
        } = self.server.stats();
        let d = stats_dict(py, &traffic)?;
        d.set_item("connections", connections)?;
        d.set_item("accepted", accepted)?;
        d.set_item("refused", refused)?;
        Ok(d)
    }
    /// True once `close()` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.server.is_closed()
    }
    /// Stops listening and closes every connection (idempotent); blocked calls raise Closed.
    /// Also on `with` exit. Example: `with parallel.server() as s: ...`
    fn close(&self) {
        self.server.close()
    }
    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.server.close();
        false
    }
    fn __repr__(&self) -> String {
        format!(
            "<Server {} with {} connections{}>",
            self.server.addr(),
            self.server.connections().len(),
            if self.server.is_closed() {
                ", closed"
            } else {
                ""
            }
        )
    }
}

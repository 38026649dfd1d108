//! A connection's Python methods, shared by `Client` and `Connection` (`conn_methods!`), and the
//! `Handle` their `*_async` forms return.

use crate::{convert, timeout, wait};
use parallel_engine::Conn;
use parallel_engine::link::Stats;
use parallel_engine::runtime::{Completion, Deadline};
use parallel_engine::value::{Device, Tensor, Value};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};
use std::sync::Arc;

pub(crate) fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes_sent", s.bytes_sent)?;
    d.set_item("bytes_recv", s.bytes_recv)?;
    d.set_item("msgs_sent", s.msgs_sent)?;
    d.set_item("msgs_recv", s.msgs_recv)?;
    d.set_item("send_seconds", s.send_secs)?;
    d.set_item("recv_seconds", s.recv_secs)?;
    d.set_item("send_bandwidth", s.send_bandwidth())?;
    d.set_item("recv_bandwidth", s.recv_bandwidth())?;
    Ok(d)
}

/// Shared implementation of a connection's methods (Client and Connection).
fn do_send(
    py: Python<'_>,
    conn: &Arc<Conn>,
    value: &Bound<'_, PyAny>,
    t: Option<f64>,
    pickle: bool,
) -> PyResult<()> {
    // bytes, the most common small message, skip the general conversion's type tests.
    let v = match value.downcast_exact::<PyBytes>() {
        Ok(b) => Value::bytes(b.as_bytes()),
        Err(_) => convert::to_value(value, pickle, 0)?,
    };
    let t = timeout(t)?;
    // A small message over a shared-memory ring with room is copied in without letting go of
    // the GIL (it cannot wait): releasing and taking it back would cost more than the copy.
    if small(&v) && conn.send_if_room(&v).map_err(crate::errors::to_py)? {
        return Ok(());
    }
    let c = conn.clone();
    wait(py, move || c.send(&v, t))
}

/// At most [`SMALL_BYTES`] of host payload in at most [`SMALL_NODES`] values: a message whose
/// send may hold the GIL ([`do_send`]).
fn small(v: &Value) -> bool {
    const SMALL_BYTES: usize = 16 << 10;
    const SMALL_NODES: usize = 64;
    if let Value::Bytes(b) = v {
        return b.len() <= SMALL_BYTES;
    }
    let (mut bytes, mut nodes) = (0usize, 0usize);
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        nodes += 1;
        bytes += match v {
            Value::Str(s) => s.len(),
            Value::Bytes(b) | Value::Pickle(b) => b.len(),
            Value::Tensor(t) if t.device() == Device::Cpu => t.nbytes(),
            Value::Tensor(_) => return false,
            Value::List(x) | Value::Tuple(x) => {
                stack.extend(x);
                0
            }
            Value::Dict(x) => {
                stack.extend(x.iter().map(|(_, v)| v));
                x.iter()
                    .map(|(k, _)| match k {
                        parallel_engine::value::Key::Str(s) => s.len(),
                        _ => 8,
                    })
                    .sum()
            }
            _ => 0,
        };
        if bytes > SMALL_BYTES || nodes > SMALL_NODES {
            return false;
        }
    }
    true
}

fn do_recv(
    py: Python<'_>,
    conn: &Arc<Conn>,
    t: Option<f64>,
    out: Option<&Bound<'_, PyAny>>,
    pickle: bool,
) -> PyResult<PyObject> {
    let t = timeout(t)?;
    let mut o = match out {
        Some(o) => convert::Outs::collect(o)?,
        None => convert::Outs::default(),
    };
    let c = conn.clone();
    let (mut tensors, paths) = (std::mem::take(&mut o.tensors), o.paths.take());
    let v = wait(py, move || match &paths {
        Some(p) => c.recv_into_keyed(&mut tensors, p, t),
        None => c.recv_into(&mut tensors, t),
    })?;
    convert::write_back(py, &o.writebacks)?;
    convert::to_py(py, v, &o.objs, pickle)
}

fn do_send_async(
    conn: &Arc<Conn>,
    value: &Bound<'_, PyAny>,
    t: Option<f64>,
    pickle: bool,
) -> PyResult<Handle> {
    let v = convert::to_value(value, pickle, 0)?;
    Ok(Handle {
        inner: HandleKind::Send(conn.send_async(v, timeout(t)?)),
        outs: vec![],
        writebacks: vec![],
        pickle,
    })
}

fn do_recv_async(
    conn: &Arc<Conn>,
    t: Option<f64>,
    out: Option<&Bound<'_, PyAny>>,
    pickle: bool,
) -> PyResult<Handle> {
    let o = match out {
        Some(o) => convert::Outs::collect(o)?,
        None => convert::Outs::default(),
    };
    Ok(Handle {
        inner: HandleKind::Recv(conn.recv_async_keyed(o.tensors, o.paths, timeout(t)?)),
        outs: o.objs,
        writebacks: o.writebacks,
        pickle,
    })
}

macro_rules! conn_methods {
    ($ty:ident, { $($extra:item)* }) => {
        #[pymethods]
        impl $ty {
            $($extra)*

            /// Sends a value (None, bool, int, float, str, bytes, list, tuple, dict, tensors).
            #[pyo3(signature = (value, timeout=None))]
            fn send(&self, py: Python<'_>, value: &Bound<'_, PyAny>, timeout: Option<f64>) -> PyResult<()> {
                do_send(py, &self.conn, value, timeout, self.pickle)
            }
            /// Receives the next message; with `out` (a tensor, or lists/tuples/dicts of them), each
            /// tensor lands in place in the `out` tensor at its own path (indices and dict keys).
            #[pyo3(signature = (timeout=None, out=None))]
            fn recv(&self, py: Python<'_>, timeout: Option<f64>, out: Option<&Bound<'_, PyAny>>) -> PyResult<PyObject> {
                do_recv(py, &self.conn, timeout, out, self.pickle)
            }
            /// Starts sending `value` and returns a Handle at once; `handle.wait(timeout)` returns None
            /// when the value is sent and raises what `send` would (Timeout, PeerLost, Unsupported).
            /// Tensors in `value` must not be modified until then. Example:
            /// `h = client.send_async(torch.ones(4)); ...; h.wait(10)`
            #[pyo3(signature = (value, timeout=None))]
            fn send_async(&self, value: &Bound<'_, PyAny>, timeout: Option<f64>) -> PyResult<Handle> {
                do_send_async(&self.conn, value, timeout, self.pickle)
            }
            /// Starts receiving the next message and returns a Handle at once; `handle.wait(timeout)`
            /// returns the value (or `out`, filled in place) and raises what `recv` would.
            /// Example: `h = conn.recv_async(out=buf); ...; h.wait(10)`
            #[pyo3(signature = (timeout=None, out=None))]
            fn recv_async(&self, timeout: Option<f64>, out: Option<&Bound<'_, PyAny>>) -> PyResult<Handle> {
                do_recv_async(&self.conn, timeout, out, self.pickle)
            }
            /// Traffic counters: bytes and messages each way, seconds spent, bandwidth (B/s).
            fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
                let d = stats_dict(py, &self.conn.stats())?;
                d.set_item("link", self.conn.link_kind().name())?;
                d.set_item("peer", self.conn.peer())?;
                Ok(d)
            }
            /// "tcp" or "shm".
            #[getter]
            fn link(&self) -> &'static str {
                self.conn.link_kind().name()
            }
            /// The peer's address and pid.
            #[getter]
            fn peer(&self) -> String {
                self.conn.peer().to_string()
            }
            /// True once this side closed, or the peer closed in an orderly way.
            #[getter]
            fn closed(&self) -> bool {
                self.conn.is_closed()
            }
            /// Closes the connection (idempotent); pending and later calls raise Closed. Also on
            /// `with` exit. Example: `with parallel.client(host, port) as c: c.send(1)`
            fn close(&self) {
                self.conn.close()
            }
            fn __enter__(slf: Py<Self>) -> Py<Self> {
                slf
            }
            #[pyo3(signature = (*_args))]
            fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
                self.conn.close();
                false
            }
            fn __repr__(&self) -> String {
                format!("<{} {} link to {}{}>", stringify!($ty), self.conn.link_kind().name(), self.conn.peer(), if self.conn.is_closed() { ", closed" } else { "" })
            }
        }
    };
}

/// A client connection to a server (create it with `torch_parallel.client(host, port)`).
///
/// `send(value)` / `recv()` exchange values (numbers, strings, bytes, nested lists, tuples and
/// dicts, tensors); `*_async` return a Handle. Every blocking call takes `timeout` (seconds) and
/// raises Timeout, PeerLost or Closed (ConnectionError subclasses) naming the peer.
///
/// Example:
/// ```python
/// import torch_parallel as parallel
/// server = parallel.server("127.0.0.1", 0)
/// client = parallel.client("127.0.0.1", server.port)
/// client.send({"step": 1})
/// assert server.recv_any() == {"step": 1}
/// client.close(); server.close()
/// ```
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Client {
    conn: Arc<Conn>,
    pickle: bool,
}

conn_methods!(Client, {
    #[new]
    #[pyo3(signature = (host="127.0.0.1", port=0, timeout=None, allow_pickle=false))]
    fn new(
        py: Python<'_>,
        host: &str,
        port: u16,
        timeout: Option<f64>,
        allow_pickle: bool,
    ) -> PyResult<Client> {
        let t = self::timeout(timeout)?;
        let host = host.to_string();
        let c = wait(py, move || parallel_engine::Client::connect(&host, port, t))?;
        Ok(Client {
            conn: c.conn().clone(),
            pickle: allow_pickle,
        })
    }
});

/// A server-side connection to one client (from `server.connections()`, `recv_any_from()` or
/// `clients(n, f)`): `send`, `recv` and their `*_async` forms, as on a Client. `id` and `tag`
/// are free for the application (`broadcast(value, tag=...)` and `recv_any(tag=...)` select by tag).
///
/// Example: `value, conn = server.recv_any_from(timeout=10); conn.send(value)`
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Connection {
    pub(crate) conn: Arc<Conn>,
    pub(crate) pickle: bool,
}

conn_methods!(Connection, {
    /// Sort key of the connection (connection order by default); settable.
    #[getter]
    fn get_id(&self) -> i64 {
        self.conn.id()
    }
    #[setter]
    fn set_id(&self, id: i64) {
        self.conn.set_id(id)
    }
    /// A tag to filter clients(), broadcast() and recv_any(); None when unset.
    #[getter]
    fn get_tag(&self) -> Option<String> {
        self.conn.tag()
    }
    #[setter]
    fn set_tag(&self, tag: Option<String>) {
        self.conn.set_tag(tag)
    }
    fn __eq__(&self, other: &Connection) -> bool {
        Arc::ptr_eq(&self.conn, &other.conn)
    }
    fn __hash__(&self) -> u64 {
        Arc::as_ptr(&self.conn) as u64
    }
});

enum HandleKind {
    Send(Completion<()>),
    Recv(Completion<(Value, Vec<Tensor>)>),
}

/// The handle of an asynchronous send or receive.
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Handle {
    inner: HandleKind,
    outs: Vec<PyObject>,
    /// Non-contiguous CUDA `out=` views and their contiguous stand-ins (copied back on wait).
    writebacks: Vec<(PyObject, PyObject)>,
    pickle: bool,
}

#[pymethods]
impl Handle {
    /// True once the operation finished (successfully or not).
    fn done(&self) -> bool {
        match &self.inner {
            HandleKind::Send(c) => c.done(),
            HandleKind::Recv(c) => c.done(),
        }
    }
    /// Calls `fn()` once the operation finished (successfully or not), on the engine's
    /// callback lane; `wait` then returns at once.
    fn add_done_callback(&self, f: PyObject) {
        match &self.inner {
            HandleKind::Send(c) => crate::callbacks::add_done_callback(c, f),
            HandleKind::Recv(c) => crate::callbacks::add_done_callback(c, f),
        }
    }
    /// Waits for the result: None for a send, the value for a receive.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        let d = Deadline::or_default(self::timeout(timeout)?);
        match &self.inner {
            HandleKind::Send(c) => {
                let c = c.clone();
                wait(py, move || c.wait(d, "send_async"))?;
                Ok(py.None())
            }
            HandleKind::Recv(c) => {
                let c = c.clone();
                let (v, _outs) = wait(py, move || c.wait(d, "recv_async"))?;
                convert::write_back(py, &self.writebacks)?;
                convert::to_py(py, v, &self.outs, self.pickle)
            }
        }
    }
}

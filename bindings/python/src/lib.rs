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

mod convert;
mod dlpack;
mod errors;
mod logs;
mod structure;
mod tree;
mod workers;

use errors::IntoPyResult;
use parallel_engine::endpoint::ServerStats;
use parallel_engine::link::Stats;
use parallel_engine::runtime::{Completion, Deadline};
use parallel_engine::value::{Tensor, Value};
use parallel_engine::{Conn, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};
use std::sync::{Arc, Mutex};
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

fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
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

/// Shared implementation of a connection's methods (Client and Connection).
fn do_send(
    py: Python<'_>,
    conn: &Arc<Conn>,
    value: &Bound<'_, PyAny>,
    t: Option<f64>,
    pickle: bool,
) -> PyResult<()> {
    let v = convert::to_value(value, pickle, 0)?;
    let t = timeout(t)?;
    let c = conn.clone();
    wait(py, move || c.send(&v, t))
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
    conn: Arc<Conn>,
    pickle: bool,
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

/// Every effective PARALLEL_* value, as text.
#[pyfunction]
fn config(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let c = parallel_engine::config::try_config().py()?;
    let d = PyDict::new(py);
    for (k, v) in &c.effective {
        d.set_item(*k, v)?;
    }
    Ok(d.unbind())
}

/// Why the I/O backend in use was chosen.
#[pyfunction]
fn io_backend_reason() -> PyResult<String> {
    parallel_engine::runtime::backend_reason().py()
}

/// The I/O backend in use ("io_uring" or "epoll").
#[pyfunction]
fn io_backend() -> PyResult<&'static str> {
    parallel_engine::runtime::backend().map(|b| b.name()).py()
}

/// Whether this process can use CUDA (driver found, PARALLEL_CUDA on).
#[pyfunction]
fn cuda_available() -> bool {
    parallel_engine::cuda::cuda().is_some()
}

/// What CUDA this process uses, or why it has none.
#[pyfunction]
fn cuda_info() -> String {
    match parallel_engine::cuda::cuda() {
        Some(g) => g.describe(),
        None => format!("no CUDA: {}", parallel_engine::cuda::unavailable_reason()),
    }
}

/// This host's topology (engine/src/topology): the probe and why, cores, NUMA nodes, caches, GPUs
/// and NICs with their locality, the reactors' CPUs, and `lines` (key, text) for people.
#[pyfunction]
fn topology(py: Python<'_>) -> PyResult<Py<PyDict>> {
    use parallel_engine::topology::{Device, cpu_list};
    parallel_engine::config::try_config().py()?;
    let t = parallel_engine::topology::topology();
    let d = PyDict::new(py);
    d.set_item("probe", t.probe.name())?;
    d.set_item("reason", &t.reason)?;
    d.set_item("cores", t.cores.len())?;
    d.set_item("logical_cpus", t.logical_cpus())?;
    let nodes = t
        .numa_nodes
        .iter()
        .map(|n| {
            let e = PyDict::new(py);
            e.set_item("id", n.id)?;
            e.set_item("cpus", cpu_list(&n.cpus))?;
            e.set_item("memory_bytes", n.memory_bytes)?;
            Ok(e)
        })
        .collect::<PyResult<Vec<_>>>()?;
    d.set_item("numa_nodes", nodes)?;
    let caches = PyDict::new(py);
    for level in 1..=3 {
        if let Some(b) = t.cache_bytes(level) {
            caches.set_item(format!("L{level}"), b)?;
        }
    }
    d.set_item("caches", caches)?;
    let device = |x: &Device| -> PyResult<Bound<'_, PyDict>> {
        let e = PyDict::new(py);
        e.set_item("name", &x.name)?;
        e.set_item("pci_bus_id", &x.pci_bus_id)?;
        e.set_item("numa", x.numa)?;
        e.set_item("cpus", cpu_list(&x.cpus))?;
        Ok(e)
    };
    d.set_item("gpus", t.gpus().map(device).collect::<PyResult<Vec<_>>>()?)?;
    d.set_item("nics", t.nics().map(device).collect::<PyResult<Vec<_>>>()?)?;
    let share = parallel_engine::topology::reactor_share();
    d.set_item(
        "reactor_cpus",
        format!("{} ({})", cpu_list(&share.cpus), share.why),
    )?;
    d.set_item("lines", t.describe())?;
    Ok(d.unbind())
}

/// Device memory the engine creates (received CUDA tensors, scratch) comes from `f(device,
/// nbytes, stream)`, which returns a tensor owning it and makes our `stream` wait until the
/// memory is free of the allocator's earlier users (the package passes torch's caching
/// allocator, whose blocks are ordered on torch's current stream).
#[pyfunction]
fn _set_cuda_allocator(f: PyObject) {
    let f = Arc::new(f);
    parallel_engine::cuda::set_allocator(Box::new(move |dev: i32, len: usize| {
        let stream = parallel_engine::cuda::require("alloc")?.stream(dev)?;
        Python::with_gil(|py| {
            let t = f.call1(py, (dev, len, stream))?;
            let ptr: u64 = t.call_method0(py, "data_ptr")?.extract(py)?;
            let owner: Box<dyn std::any::Any + Send + Sync> = Box::new(t);
            Ok::<_, PyErr>((ptr, owner))
        })
        .map_err(|e| {
            parallel_engine::Error::new(
                parallel_engine::ErrorKind::Resource,
                "alloc",
                format!("allocating {len} bytes on cuda:{dev} through torch failed: {e}"),
            )
        })
    }));
}

/// A candidate path of libnvrtc (the package registers the NVIDIA wheels next to torch).
#[pyfunction]
fn _add_nvrtc_hint(path: &str) {
    parallel_engine::cuda::nvrtc::add_hint(path);
}

/// The environment-variable table as Markdown (docs/environment.md).
#[pyfunction]
fn environment_markdown() -> String {
    parallel_engine::config::render_markdown()
}

#[pyfunction]
fn _register_errors(py: Python<'_>, classes: Py<PyDict>) {
    errors::register(py, classes);
}

#[pyfunction]
fn _set_tensor_factory(py: Python<'_>, f: PyObject) {
    convert::set_tensor_factory(py, f);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    parallel_engine::runtime::set_interrupt_check(interrupt_pending);
    logs::install();
    m.add_function(wrap_pyfunction!(logs::_log_next, m)?)?;
    m.add_class::<Server>()?;
    m.add_class::<Client>()?;
    m.add_class::<Connection>()?;
    m.add_class::<Handle>()?;
    m.add_class::<Received>()?;
    m.add_class::<workers::WorkQueue>()?;
    m.add_class::<tree::Tree_>()?;
    m.add_class::<tree::Work>()?;
    m.add_function(wrap_pyfunction!(config, m)?)?;
    m.add_function(wrap_pyfunction!(io_backend, m)?)?;
    m.add_function(wrap_pyfunction!(io_backend_reason, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_available, m)?)?;
    m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(topology, m)?)?;
    m.add_function(wrap_pyfunction!(_add_nvrtc_hint, m)?)?;
    m.add_function(wrap_pyfunction!(_set_cuda_allocator, m)?)?;
    m.add_function(wrap_pyfunction!(environment_markdown, m)?)?;
    m.add_function(wrap_pyfunction!(_register_errors, m)?)?;
    m.add_function(wrap_pyfunction!(_set_tensor_factory, m)?)?;
    Ok(())
}

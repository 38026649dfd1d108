//! The Python face of the engine's work queues: `torch_parallel.workqueue(name)`.
//!
//! A `WorkQueue` object wraps an engine [`HostQueue`] handle. As in the original library, the
//! role of a call depends on the thread making it: calls from the thread that created the queue
//! act as its owner (write questions, read answers); calls from any other thread act as a worker
//! (read questions, write answers). A worker thread using the owner's object gets its own engine
//! worker handle, kept in thread-local storage and closed when that thread ends, so the owner's
//! end of queue (HQ-3) still sees when every worker is gone. Objects made by opening an existing
//! name (in a thread or another process) are worker handles in every thread.
//!
//! Invariants:
//! - PYWQ-1: values are converted (copied) at write; tensors are imported by DLPack and move by
//!   reference while the item stays in-process; read tensors are exported without a copy.
//! - PYWQ-2: every blocking call releases the GIL and honours its deadline and Ctrl-C (PY-1).
//! - PYWQ-3: a non-blocking read of an empty queue raises `queue.Empty`; end of queue raises
//!   `Closed` (and ends iteration); a timeout raises `Timeout`; a worker process lost while
//!   holding questions raises `WorkerError` (WQA-3), once.

use crate::errors::IntoPyResult;
use crate::{convert, timeout, wait};
use parallel_engine::Error;
use parallel_engine::value::{DType, Value};
use parallel_workers::HostQueue;
use pyo3::exceptions::PyStopIteration;
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::ThreadId;

thread_local! {
    /// Worker handles this thread took on owners' queue objects (by object id); dropping them at
    /// thread exit closes them, which tells the owner this worker is gone.
    static BORROWED: RefCell<HashMap<u64, Arc<HostQueue>>> = RefCell::new(HashMap::new());
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A named owner <-> workers queue shared by threads and by processes of this host (create or
/// open it with `torch_parallel.workqueue(name)`). The owner `write`s questions and `read`s
/// answers; a worker `read`s questions and `write`s answers. Bounded (writers wait: back-pressure);
/// `close()` ends it. Raises Timeout, Closed, or WorkerError when a worker died holding an item.
///
/// Example:
/// ```python
/// import torch_parallel as parallel
/// q = parallel.workqueue("jobs")          # the owner
/// q.write({"batch": 0})
/// # in a worker thread or process: w = parallel.workqueue("jobs"); job = w.read(); w.write(job)
/// ```
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct WorkQueue {
    id: u64,
    handle: Arc<HostQueue>,
    creator_thread: ThreadId,
    /// False: this object acts as the owner in every thread (not only its creator's).
    bind_thread: bool,
    allow_pickle: bool,
}

fn empty_error(py: Python<'_>) -> PyErr {
    match py.import("queue").and_then(|m| m.getattr("Empty")) {
        Ok(cls) => PyErr::from_type(
            cls.downcast_into()
                .expect("queue.Empty is an exception type"),
            "the work queue is empty",
        ),
        Err(e) => e,
    }
}

impl WorkQueue {
    /// The engine handle that acts for the calling thread.
    fn acting(&self, py: Python<'_>) -> PyResult<Arc<HostQueue>> {
        if !self.handle.is_owner()
            || !self.bind_thread
            || std::thread::current().id() == self.creator_thread
        {
            return Ok(self.handle.clone());
        }
        if let Some(h) = BORROWED.with(|b| b.borrow().get(&self.id).cloned()) {
            return Ok(h);
        }
        let owner = self.handle.clone();
        let h = Arc::new(wait(py, move || owner.worker())?);
        BORROWED.with(|b| b.borrow_mut().insert(self.id, h.clone()));
        Ok(h)
    }

    fn convert_items(&self, values: &Bound<'_, PyTuple>) -> PyResult<Vec<Value>> {
        values
            .iter()
            .map(|v| convert::to_value(&v, self.allow_pickle, 0))
            .collect()
    }

    fn read_value(&self, py: Python<'_>, t: Option<f64>, block: bool) -> PyResult<PyObject> {
        let h = self.acting(py)?;
        let v = if block {
            let t = timeout(t)?;
            wait(py, move || h.read(t))?
        } else {
            match wait(py, move || h.try_read())? {
                Some(v) => v,
                None => return Err(empty_error(py)),
            }
        };
        convert::to_py(py, v, &[], self.allow_pickle)
    }
}

#[pymethods]
impl WorkQueue {
    /// Creates the queue `name` (this object's thread becomes its owner) or opens it (a worker).
    /// `name=None` creates an anonymous queue (it still has a generated name, so it can be handed
    /// to worker processes). `allow_pickle`: objects of other types travel as pickles.
    /// `bind_thread=False`: the creating object is the owner in every thread.
    #[new]
    #[pyo3(signature = (name=None, allow_pickle=false, timeout=None, bind_thread=true))]
    fn new(
        py: Python<'_>,
        name: Option<String>,
        allow_pickle: bool,
        timeout: Option<f64>,
        bind_thread: bool,
    ) -> PyResult<WorkQueue> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // An anonymous queue's name is unguessable (OS generator only), so no other process can
        // bind it first.
        let name = match name {
            Some(n) => n,
            None => format!(
                "anonymous-{}-{id}-{}",
                std::process::id(),
                parallel_engine::link::random_hex::<16>().py()?
            ),
        };
        let t = self::timeout(timeout)?;
        let handle = Arc::new(wait(py, move || HostQueue::open(&name, t))?);
        Ok(WorkQueue {
            id,
            handle,
            creator_thread: std::thread::current().id(),
            bind_thread,
            allow_pickle,
        })
    }

    /// The queue's name (pass it to `workqueue(name)` in another thread or process).
    #[getter]
    fn name(&self) -> String {
        self.handle.name().to_string()
    }
    /// True when this object created the queue (the original's `creator` flag).
    #[getter]
    fn creator(&self) -> bool {
        self.handle.is_owner()
    }
    /// True when calls from the current thread act as the owner.
    #[getter]
    fn owner(&self) -> bool {
        self.handle.is_owner()
            && (!self.bind_thread || std::thread::current().id() == self.creator_thread)
    }
    /// True once another process opened the queue (questions then cross shared memory).
    #[getter]
    fn shared(&self) -> bool {
        self.handle.is_shared()
    }
    /// Items each direction holds before writers wait (PARALLEL_WORKQUEUE_CAPACITY).
    #[getter]
    fn capacity(&self) -> usize {
        self.handle.capacity()
    }
    /// Whether values that are not plain data are pickled (set when the queue was created).
    #[getter]
    fn allow_pickle(&self) -> bool {
        self.allow_pickle
    }
    /// True once this thread's handle was closed.
    #[getter]
    fn closed(&self, py: Python<'_>) -> PyResult<bool> {
        Ok(self.acting(py)?.is_closed())
    }

    /// Writes each value as one item, in order (owner: questions; worker: answers). Up to
    /// `capacity` items land adjacent; more are placed in pieces as readers make room
    /// (back-pressure). `timeout` bounds the whole call; a timeout says how many went in.
    #[pyo3(signature = (*values, timeout=None))]
    fn write(
        &self,
        py: Python<'_>,
        values: &Bound<'_, PyTuple>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let items = self.convert_items(values)?;
        let t = self::timeout(timeout)?;
        let h = self.acting(py)?;
        wait(py, move || h.write(items, t).map_err(Error::from))
    }

    /// Reads the next item (owner: an answer; worker: a question). `block=False` raises
    /// `queue.Empty` when nothing is queued; end of queue raises `Closed`.
    #[pyo3(signature = (timeout=None, block=true))]
    fn read(&self, py: Python<'_>, timeout: Option<f64>, block: bool) -> PyResult<PyObject> {
        self.read_value(py, timeout, block)
    }

    /// Owner: waits until every question written before the call is answered, or was taken by
    /// a worker that closed (or died) without answering it; a worker process that died holding
    /// questions raises `WorkerError` naming it.
    #[pyo3(signature = (timeout=None))]
    fn drain(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = self::timeout(timeout)?;
        let h = self.acting(py)?;
        wait(py, move || h.drain(t))
    }

    /// Closes the calling thread's side: the owner ends the questions (workers then read end of
    /// queue); a worker tells the owner it will write nothing more.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        self.acting(py)?.close();
        Ok(())
    }

    /// Items waiting for the calling thread's role.
    fn __len__(&self, py: Python<'_>) -> PyResult<usize> {
        Ok(self.acting(py)?.len())
    }

    fn __iter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<PyObject> {
        match self.read_value(py, None, true) {
            Err(e) if is_end(py, &e) => Err(PyStopIteration::new_err(())),
            r => r,
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> PyResult<bool> {
        self.close(py)?;
        Ok(false)
    }

    /// Pickles as its name: unpickling opens the queue (as a worker) in that process.
    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<(PyObject, Bound<'py, PyTuple>)> {
        let cls = py.get_type::<WorkQueue>().into_any().unbind();
        let args = PyTuple::new(
            py,
            [
                self.handle.name().into_pyobject(py)?.into_any(),
                pyo3::types::PyBool::new(py, self.allow_pickle)
                    .to_owned()
                    .into_any(),
            ],
        )?;
        Ok((cls, args))
    }

    fn __repr__(&self) -> String {
        format!(
            "<WorkQueue {:?} ({}{})>",
            self.handle.name(),
            if self.handle.is_owner() {
                "created here"
            } else {
                "opened"
            },
            if self.handle.is_shared() {
                ", shared with other processes"
            } else {
                ""
            }
        )
    }

    /// A new CPU tensor in the queue's shared memory (contents unspecified). Writing it passes
    /// it by reference, without a copy, to readers in any process, who see the same memory. Fill
    /// it in place (`t.copy_(src)`, `torch.mul(a, b, out=t)`): pooled shared pages that are
    /// already faulted in are what makes large hand-offs fast.
    #[pyo3(signature = (shape, dtype=None, timeout=None))]
    fn empty(
        &self,
        py: Python<'_>,
        shape: Vec<usize>,
        dtype: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<PyObject> {
        let text = match dtype {
            Some(d) => d.str()?.to_string(),
            None => "float32".to_string(),
        };
        let name = text.strip_prefix("torch.").unwrap_or(&text);
        let dt = DType::ALL
            .into_iter()
            .find(|d| d.name() == name)
            .ok_or_else(|| {
                pyo3::exceptions::PyTypeError::new_err(format!(
                    "unknown dtype {text:?}: use a torch dtype or a name like \"float32\""
                ))
            })?;
        let t = self::timeout(timeout)?;
        let h = self.handle.clone();
        let tensor = wait(py, move || h.empty_tensor(dt, shape, t))?;
        convert::to_py(py, Value::Tensor(tensor), &[], false)
    }

    /// Test hook: kills this process (SIGKILL) while it holds the queue's lock. Only in builds
    /// with the feature `test-hooks` (scripts/setup.sh's development build; never the wheel).
    #[cfg(feature = "test-hooks")]
    fn _die_holding_lock(&self) {
        self.handle.die_holding_lock()
    }
}

/// True for the end-of-queue error (a `Closed` raised by a read).
fn is_end(py: Python<'_>, e: &PyErr) -> bool {
    e.value(py)
        .getattr("kind")
        .ok()
        .and_then(|k| k.extract::<String>().ok())
        .is_some_and(|k| k == "closed")
}

//! `torch_parallel.tree(...)`: the Python face of the collectives' Tree.
//!
//! Tensors (a tensor, or any nesting of lists/tuples/dicts of tensors) are imported by DLPack.
//! This module only flattens Python values into tensors (structure.rs); the fusion per dtype
//! (a single contiguous tensor reduced in place, several fused into one buffer and copied back)
//! is the collectives' (`parallel_collectives::fuse`).
//! A Python reduce function gets torch views of each chunk: `f(a, b)` must leave `a op b` in `a`
//! (in place, like the seed's `a.add_(b)`), or return the result.
//!
//! Over 600 lines: the `Tree` class's Python methods (each collective, its `*_async` form, the
//! store adapter for launchers) are short adapters over `parallel_collectives`; they stay
//! together so the class reads in one place.

use crate::convert;
use crate::dlpack;
use crate::errors::IntoPyResult;
use crate::structure::{self, Flat};
use parallel_collectives::fuse::Leaves;
use parallel_collectives::ops::{Op, UserReduce};
use parallel_collectives::tree::{DeviceReduce, STRUCTURE_DIFFERS};
use parallel_collectives::{Tree, TreeOptions};
use parallel_engine::runtime::{Completion, Deadline, Lane};
use parallel_engine::value::{DType, Device, Tensor};
use parallel_engine::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn secs(t: Option<f64>) -> PyResult<Option<Duration>> {
    crate::timeout(t)
}

/// The first exception a Python reduce function raised in one call, kept to become the cause
/// of the error that call raises on this rank.
type Raised = Arc<Mutex<Option<PyErr>>>;

fn op_or_sum(op: Option<&Bound<'_, PyAny>>) -> PyResult<(Op, Option<DeviceReduce>, Raised)> {
    op.map_or(Ok((Op::Sum, None, Raised::default())), make_op)
}

/// The Python exception for a collective's error; when this rank's reduce function raised, its
/// exception becomes the cause (`raise ... from exc`).
fn with_cause(py: Python<'_>, err: PyErr, raised: &Raised) -> PyErr {
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
fn require_tensor(obj: &Bound<'_, PyAny>, call: &str, torch_only: bool) -> PyResult<()> {
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
fn make_op(op: &Bound<'_, PyAny>) -> PyResult<(Op, Option<DeviceReduce>, Raised)> {
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

/// A value prepared for a collective (STRUCT-1..4): flattened in canonical order, checked
/// against the op, with its structure's signature and hash.
struct Prepared {
    flat: Flat,
    leaves: Leaves,
    sig: Vec<u8>,
    hash: u64,
}

impl Prepared {
    fn new(value: &Bound<'_, PyAny>, what: &'static str, op: Option<&Op>) -> PyResult<Prepared> {
        let mut flat = Flat::collect(value, what)?;
        if let Some(op) = op {
            flat.check_op(op, what)?;
        }
        let sig = flat.signature();
        // FNV-1a; never 0 (which means "no structure").
        let hash = sig
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
            })
            .max(1);
        let empty = [DType::F32, DType::I64]
            .into_iter()
            .find(|d| op.is_none_or(|o| o.check(*d).is_ok()))
            .unwrap_or(DType::U8);
        let leaves = Leaves::new(flat.leaf_tensors(), empty);
        Ok(Prepared {
            flat,
            leaves,
            sig,
            hash,
        })
    }

    /// Refuses number leaves (for the asynchronous collectives, which return the value itself).
    fn no_numbers(&self, what: &'static str) -> PyResult<()> {
        if self.flat.has_numbers() {
            return Err(crate::errors::to_py(Error::new(
                ErrorKind::Unsupported,
                what,
                "plain numbers in the value: only the blocking call returns reduced numbers; pass tensors here",
            )));
        }
        Ok(())
    }

    /// After the collective: copies back, and the value to return (a copy carrying the reduced
    /// numbers when there are any, else `value` itself).
    fn finish<'py>(
        mut self,
        value: Bound<'py, PyAny>,
        leaves: &Leaves,
    ) -> PyResult<Bound<'py, PyAny>> {
        let py = value.py();
        convert::write_back(py, &self.flat.writebacks)?;
        if !self.flat.has_numbers() {
            return Ok(value);
        }
        self.flat.numbers_from(leaves.tensors());
        Ok(self.flat.rebuild(&value)?.into_bound(py))
    }
}

/// Runs the collective(s) of one nested value carrying its structure hash (TREE-7); when the
/// ranks' structures differ, gathers them to name the first differing path and the ranks.
fn structured(
    t: &Tree,
    what: &'static str,
    hash: u64,
    sig: &[u8],
    f: impl FnOnce() -> parallel_engine::Result<()>,
) -> parallel_engine::Result<()> {
    match t.with_structure(hash, f) {
        Err(e) if e.kind() == ErrorKind::Mismatch && e.message().contains(STRUCTURE_DIFFERS) => {
            let named = t.all_gather(sig).ok().and_then(|all| {
                // Every rank takes part in a structure verdict (TREE-7): sorted by rank,
                // the i-th piece is rank i's.
                let sigs: Vec<Vec<u8>> = all.into_iter().map(|(_, b)| b).collect();
                structure::first_difference(&sigs)
            });
            Err(match named {
                Some(m) => Error::new(
                    ErrorKind::Mismatch,
                    what,
                    format!("the values differ in structure across ranks: {m}"),
                ),
                None => e,
            })
        }
        r => r,
    }
}

/// An allreduce tree of processes (create it with `torch_parallel.tree()`): `all_reduce`,
/// `broadcast`, `reduce`, `all_gather`, `reduce_scatter`, `barrier`, their `*_async` forms, and
/// `done()` for uneven endings. `op=` is a name (`"sum"`, `"max"`, ...), a
/// `torch.distributed.ReduceOp` or a callable `f(a, b)` leaving the result in `a`. A failure on
/// any rank raises on every rank, naming the rank (PeerLost, Mismatch, WorkerError).
///
/// Example (run it on every rank, e.g. under torchrun):
/// ```python
/// import torch, torch_parallel as parallel
/// tree = parallel.tree()
/// grads = tree.all_reduce(torch.ones(4), op="sum")   # world_size everywhere
/// print(tree.plan(), tree.stats())
/// ```
#[pyclass(module = "torch_parallel._native", name = "Tree", frozen)]
pub struct Tree_ {
    tree: Arc<Tree>,
    /// Asynchronous collectives run in submission order on the engine's executor (a lane); a
    /// blocking call runs inline on the caller when none is pending, and queues behind them
    /// otherwise (every rank must see the same order).
    lane: Lane,
}

impl Tree_ {
    fn submit(
        &self,
        f: impl FnOnce(&Tree) -> parallel_engine::Result<()> + Send + 'static,
    ) -> PyResult<Completion<()>> {
        let t = self.tree.clone();
        Ok(self.lane.submit(move || f(&t)))
    }

    fn run<T: Send + 'static>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Tree) -> parallel_engine::Result<T> + Send + 'static,
    ) -> PyResult<T> {
        let t = self.tree.clone();
        let lane = self.lane.clone();
        crate::wait(py, move || match lane.try_inline(move || f(&t)) {
            Ok(r) => r,
            Err(f) => lane.submit(f).wait(
                Deadline::after(Duration::from_secs(100 * 365 * 86400)),
                "tree",
            ),
        })
    }

    fn work(
        &self,
        value: Bound<'_, PyAny>,
        writebacks: Vec<(PyObject, PyObject)>,
        f: impl FnOnce(&Tree) -> parallel_engine::Result<()> + Send + 'static,
    ) -> PyResult<Work> {
        Ok(Work {
            done: self.submit(f)?,
            value: value.unbind(),
            writebacks,
            raised: Raised::default(),
        })
    }
}

/// The handle of an asynchronous collective.
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Work {
    done: Completion<()>,
    value: PyObject,
    /// Non-contiguous CUDA views and their contiguous stand-ins (copied back on wait).
    writebacks: Vec<(PyObject, PyObject)>,
    /// What this rank's reduce function raised (the cause of wait's error).
    raised: Raised,
}

#[pymethods]
impl Work {
    /// True once the collective finished (successfully or not).
    fn done(&self) -> bool {
        self.done.done()
    }
    /// Waits for the collective and returns its value (the tensors, filled in place).
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        let c = self.done.clone();
        let d = Deadline::or_default(secs(timeout)?);
        crate::wait(py, move || c.wait(d, "tree")).map_err(|e| with_cause(py, e, &self.raised))?;
        convert::write_back(py, &self.writebacks)?;
        Ok(self.value.clone_ref(py))
    }
}

/// A `torch.distributed.Store` (TCPStore, FileStore, HashStore, PrefixStore, or anything with
/// `set(key, bytes)`, `check([key])`, `get(key)` and `delete_key(key)`) as the rendezvous's store. Each call takes
/// the GIL only for one store call; waits sleep without it.
struct PyStore {
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
    fn new(obj: &Bound<'_, PyAny>) -> PyStore {
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

#[pymethods]
impl Tree_ {
    #[new]
    #[pyo3(signature = (rank=None, world_size=None, root=None, timeout=None, store=None, store_prefix=None))]
    fn new(
        py: Python<'_>,
        rank: Option<usize>,
        world_size: Option<usize>,
        root: Option<String>,
        timeout: Option<f64>,
        store: Option<&Bound<'_, PyAny>>,
        store_prefix: Option<String>,
    ) -> PyResult<Tree_> {
        let store =
            store.map(|s| Arc::new(PyStore::new(s)) as Arc<dyn parallel_collectives::Store>);
        let opts = TreeOptions {
            rank,
            world_size,
            root,
            timeout: secs(timeout)?,
            store,
            store_prefix: store_prefix.unwrap_or_default(),
            ..Default::default()
        };
        let tree = crate::wait(py, move || Tree::new(opts))?;
        Ok(Tree_ {
            tree: Arc::new(tree),
            lane: Lane::new(),
        })
    }
    /// This process's rank, 0 .. world_size - 1 (rank 0 is the root).
    #[getter]
    fn rank(&self) -> usize {
        self.tree.rank()
    }
    /// The number of ranks in the tree.
    #[getter]
    fn world_size(&self) -> usize {
        self.tree.world_size()
    }
    /// How many ranks contributed to the last collective (uneven endings).
    #[getter]
    fn contributors(&self) -> usize {
        self.tree.contributors()
    }
    /// All-reduce in place; returns `value`. `op`: a name or a callable `f(a, b)`.
    ///
    /// `value`: a tensor, a number, or lists/tuples/dicts of them, nested; leaves are matched
    /// across ranks by place and dict key (never insertion order), and a structure that differs
    /// across ranks is a Mismatch on every rank naming the first differing path. Numbers (int,
    /// float, bool) are reduced too: then a copy of `value` carrying them is returned.
    #[pyo3(signature = (value, op=None))]
    fn all_reduce<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
        op: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (op, user, raised) = op_or_sum(op)?;
        let mut p = Prepared::new(&value, "all_reduce", Some(&op))?;
        let mut leaves = std::mem::replace(&mut p.leaves, Leaves::none());
        let (hash, sig) = (p.hash, std::mem::take(&mut p.sig));
        let leaves = self
            .run(py, move |t| {
                structured(t, "all_reduce", hash, &sig, || {
                    t.all_reduce_many(&mut leaves, &op, user.as_ref())
                })?;
                Ok(leaves)
            })
            .map_err(|e| with_cause(py, e, &raised))?;
        p.finish(value, &leaves)
    }
    /// Like all_reduce, without waiting: returns a handle with wait(timeout) and done().
    #[pyo3(signature = (value, op=None))]
    fn all_reduce_async(
        &self,
        value: Bound<'_, PyAny>,
        op: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Work> {
        let (op, user, raised) = op_or_sum(op)?;
        let mut p = Prepared::new(&value, "all_reduce_async", Some(&op))?;
        p.no_numbers("all_reduce_async")?;
        let mut leaves = std::mem::replace(&mut p.leaves, Leaves::none());
        let (hash, sig) = (p.hash, std::mem::take(&mut p.sig));
        let mut w = self.work(value, p.flat.writebacks, move |t| {
            structured(t, "all_reduce", hash, &sig, || {
                t.all_reduce_many(&mut leaves, &op, user.as_ref())
            })
        })?;
        w.raised = raised;
        Ok(w)
    }
    /// Like broadcast, without waiting.
    #[pyo3(signature = (value, root=0))]
    fn broadcast_async(&self, value: Bound<'_, PyAny>, root: usize) -> PyResult<Work> {
        let mut p = Prepared::new(&value, "broadcast_async", None)?;
        p.no_numbers("broadcast_async")?;
        let mut leaves = std::mem::replace(&mut p.leaves, Leaves::none());
        let (hash, sig) = (p.hash, std::mem::take(&mut p.sig));
        self.work(value, p.flat.writebacks, move |t| {
            structured(t, "broadcast", hash, &sig, || {
                t.broadcast_many(&mut leaves, root)
            })
        })
    }
    /// Like barrier, without waiting.
    fn barrier_async(&self, py: Python<'_>) -> PyResult<Work> {
        self.work(py.None().into_bound(py), vec![], |t| {
            t.barrier().map(|_| ())
        })
    }
    /// Broadcast from `root` in place, matched by structure and key like all_reduce; returns
    /// `value` (a copy carrying the root's numbers when it holds numbers).
    #[pyo3(signature = (value, root=0))]
    fn broadcast<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
        root: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let mut p = Prepared::new(&value, "broadcast", None)?;
        let mut leaves = std::mem::replace(&mut p.leaves, Leaves::none());
        let (hash, sig) = (p.hash, std::mem::take(&mut p.sig));
        let leaves = self.run(py, move |t| {
            structured(t, "broadcast", hash, &sig, || {
                t.broadcast_many(&mut leaves, root)
            })?;
            Ok(leaves)
        })?;
        p.finish(value, &leaves)
    }
    /// Reduce to `root` (in place there; other ranks keep their values), matched by structure
    /// and key like all_reduce; returns `value` (a copy carrying the numbers when it holds any).
    #[pyo3(signature = (value, op=None, root=0))]
    fn reduce<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
        op: Option<&Bound<'py, PyAny>>,
        root: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (op, user, raised) = op_or_sum(op)?;
        let mut p = Prepared::new(&value, "reduce", Some(&op))?;
        let mut leaves = std::mem::replace(&mut p.leaves, Leaves::none());
        let (hash, sig) = (p.hash, std::mem::take(&mut p.sig));
        let leaves = self
            .run(py, move |t| {
                structured(t, "reduce", hash, &sig, || {
                    t.reduce_many(&mut leaves, &op, user.as_ref(), root)
                })?;
                Ok(leaves)
            })
            .map_err(|e| with_cause(py, e, &raised))?;
        p.finish(value, &leaves)
    }
    /// All-reduce of a copy of `tensor`, then this rank's part of it along dimension 0 (parts as
    /// `torch.tensor_split` makes them). Returns the part.
    #[pyo3(signature = (tensor, op=None))]
    fn reduce_scatter<'py>(
        &self,
        py: Python<'py>,
        tensor: &Bound<'py, PyAny>,
        op: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        require_tensor(tensor, "reduce_scatter", true)?;
        let copy = tensor.call_method0("clone")?;
        let reduced = self.all_reduce(py, copy, op)?;
        let parts = reduced.call_method1("tensor_split", (self.tree.world_size(),))?;
        parts.get_item(self.tree.rank())
    }
    /// Every rank's tensor, in rank order (shapes may differ between ranks); None for the ranks
    /// that called done() in this epoch.
    fn all_gather(&self, py: Python<'_>, tensor: &Bound<'_, PyAny>) -> PyResult<PyObject> {
        require_tensor(tensor, "all_gather", false)?;
        // CUDA tensors are gathered through host memory and come back on their device.
        let device = tensor
            .getattr("is_cuda")
            .and_then(|c| c.is_truthy())
            .unwrap_or(false)
            .then(|| tensor.getattr("device"))
            .transpose()?;
        let host = match &device {
            Some(_) => tensor.call_method0("cpu")?,
            None => tensor.clone(),
        };
        let t = dlpack::import(&host)?;
        let mut packed = vec![t.dtype() as u8, t.shape().len() as u8];
        for d in t.shape() {
            packed.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        packed.extend_from_slice(&t.contiguous_bytes().py()?);
        let pieces = self.run(py, move |tr| tr.all_gather(&packed))?;
        let out = PyList::new(py, (0..self.tree.world_size()).map(|_| py.None()))?;
        for (rank, p) in pieces {
            let bad = || pyo3::exceptions::PyValueError::new_err("malformed all_gather piece");
            let dtype = DType::from_code(*p.first().ok_or_else(bad)?).ok_or_else(bad)?;
            let nd = *p.get(1).ok_or_else(bad)? as usize;
            let mut shape = Vec::with_capacity(nd);
            for k in 0..nd {
                let b = p.get(2 + 8 * k..10 + 8 * k).ok_or_else(bad)?;
                shape.push(u64::from_le_bytes(b.try_into().map_err(|_| bad())?) as usize);
            }
            let data = p.get(2 + 8 * nd..).ok_or_else(bad)?.to_vec();
            let t = Tensor::from_bytes(dtype, shape, data).py()?;
            let mut o = convert::to_py(py, parallel_engine::Value::Tensor(t), &[], false)?;
            if let Some(d) = &device {
                o = o.call_method1(py, "to", (d,))?;
            }
            out.set_item(rank, o)?;
        }
        Ok(out.into_any().unbind())
    }
    /// Blocks until every rank reached the barrier.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |t| t.barrier().map(|_| ()))
    }
    /// Uneven endings: this rank has no more data for this epoch. It keeps serving the others'
    /// collectives (contributing nothing) until every rank called done(); then the next epoch
    /// starts with every rank. Returns how many collectives it served, one per call the others
    /// made (whatever the number of dtypes in a nested value). `op`: the function the others
    /// call all_reduce with, if any; it never replaces a built-in op. `timeout` bounds each wait
    /// for the others' next collective.
    #[pyo3(signature = (op=None, timeout=None))]
    fn done(
        &self,
        py: Python<'_>,
        op: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let op = op.map(make_op).transpose()?.map(|(op, _, _)| op);
        let timeout = secs(timeout)?;
        self.run(py, move |t| t.done(op.as_ref(), timeout))
    }
    /// The plan: hosts, tree, ring and link kinds.
    fn plan(&self) -> String {
        self.tree.describe()
    }
    /// Traffic per link: peer rank, link kind, bytes and messages each way, seconds spent in
    /// send and receive calls, bandwidth (bytes per second). JSON-serialisable.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for l in self.tree.stats() {
            let d = PyDict::new(py);
            d.set_item("peer_rank", l.peer_rank)?;
            d.set_item("link", l.kind)?;
            d.set_item("bytes_sent", l.stats.bytes_sent)?;
            d.set_item("bytes_recv", l.stats.bytes_recv)?;
            d.set_item("msgs_sent", l.stats.msgs_sent)?;
            d.set_item("msgs_recv", l.stats.msgs_recv)?;
            d.set_item("send_seconds", l.stats.send_secs)?;
            d.set_item("recv_seconds", l.stats.recv_secs)?;
            d.set_item("send_bandwidth", l.stats.send_bandwidth())?;
            d.set_item("recv_bandwidth", l.stats.recv_bandwidth())?;
            out.append(d)?;
        }
        Ok(out)
    }
    fn __repr__(&self) -> String {
        format!(
            "<Tree rank {} of {}>",
            self.tree.rank(),
            self.tree.world_size()
        )
    }
    fn __str__(&self) -> String {
        self.tree.describe()
    }
}

//! `torch_parallel.tree(...)`: the Python face of the collectives' Tree.
//!
//! Tensors (a tensor, or any nesting of lists/tuples/dicts of tensors) are imported by DLPack.
//! Per dtype, a single contiguous tensor is reduced in place in its own memory; several tensors
//! (or a strided one) are fused into one buffer, reduced in one pipeline, and copied back.
//! A Python reduce function gets torch views of each chunk: `f(a, b)` must leave `a op b` in `a`
//! (in place, like the seed's `a.add_(b)`), or return the result.

use crate::convert;
use crate::dlpack;
use crate::errors::IntoPyResult;
use parallel_collectives::ops::{Op, UserReduce};
use parallel_collectives::tree::DeviceReduce;
use parallel_collectives::{Tree, TreeOptions};
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::runtime::{Completion, Deadline};
use parallel_engine::value::{DType, Device, Tensor};
use parallel_engine::{Error, ErrorKind};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

fn secs(t: Option<f64>) -> PyResult<Option<Duration>> {
    crate::timeout(t)
}

fn op_or_sum(op: Option<&Bound<'_, PyAny>>) -> PyResult<(Op, Option<DeviceReduce>)> {
    op.map_or(Ok((Op::Sum, None)), make_op)
}

/// Builds the op: a name, or a Python callable applied to torch views of each chunk (host
/// memory) and, for CUDA tensors, to torch CUDA tensors (the device form).
fn make_op(op: &Bound<'_, PyAny>) -> PyResult<(Op, Option<DeviceReduce>)> {
    if let Ok(s) = op.downcast::<PyString>() {
        return Ok((Op::parse(s.to_str()?).py()?, None));
    }
    if !op.is_callable() {
        return Err(pyo3::exceptions::PyTypeError::new_err(
            "op must be a name (sum, prod, min, max, avg, band, bor, bxor) or a callable f(a, b)",
        ));
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
    fn raised(e: PyErr) -> Error {
        Error::new(
            ErrorKind::Unsupported,
            "all_reduce",
            format!("the reduce function raised: {e}"),
        )
    }
    let fh = f.clone();
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
            .map_err(raised)
        })
    });
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
            .map_err(raised)
        })
    });
    Ok((Op::User(user), Some(device)))
}

/// The tensors of a value, grouped for the collectives.
struct Leaves {
    tensors: Vec<Tensor>,
}

impl Leaves {
    /// The leaves, and the contiguous stand-ins of non-contiguous CUDA views to copy back.
    fn collect(value: &Bound<'_, PyAny>) -> PyResult<(Leaves, Vec<(PyObject, PyObject)>)> {
        let (mut tensors, mut objs, mut wb) = (Vec::new(), Vec::new(), Vec::new());
        convert::flatten_out(value, &mut tensors, &mut objs, &mut wb, 0)?;
        Ok((Leaves { tensors }, wb))
    }

    /// (dtype, device) groups in first-appearance order, each a list of leaf indices.
    fn groups(&self) -> Vec<(DType, Device, Vec<usize>)> {
        let mut g: Vec<(DType, Device, Vec<usize>)> = Vec::new();
        for (i, t) in self.tensors.iter().enumerate() {
            match g
                .iter_mut()
                .find(|(d, dev, _)| *d == t.dtype() && *dev == t.device())
            {
                Some((_, _, v)) => v.push(i),
                None => g.push((t.dtype(), t.device(), vec![i])),
            }
        }
        g
    }

    /// Runs `f` on one contiguous byte buffer per dtype group of CPU tensors: the tensor's own
    /// memory when the group is one contiguous tensor, else a fused copy that is written back
    /// afterwards. Groups of CUDA tensors go to `fdev` (device memory, fused on the device when
    /// there are several), or, without it, are staged through host memory for `f`.
    fn each_group(
        &mut self,
        mut f: impl FnMut(DType, &mut [u8]) -> parallel_engine::Result<()>,
        mut fdev: Option<&mut dyn FnMut(DType, i32, u64, usize) -> parallel_engine::Result<()>>,
    ) -> parallel_engine::Result<()> {
        for (dtype, device, idx) in self.groups() {
            if let Device::Cuda(dev) = device {
                self.cuda_group(dtype, dev, &idx, &mut f, &mut fdev)?;
                continue;
            }
            if idx.len() == 1 && self.tensors[idx[0]].is_contiguous() {
                let t = &mut self.tensors[idx[0]];
                let n = t.nbytes();
                let bytes = if n == 0 {
                    &mut [][..]
                } else {
                    // SAFETY: a contiguous tensor's n bytes from its data pointer are its
                    // elements, kept alive by the DLPack capsule the tensor holds.
                    unsafe { std::slice::from_raw_parts_mut(t.data_mut_ptr(), n) }
                };
                f(dtype, bytes)?;
                continue;
            }
            let mut fused: Vec<u8> =
                Vec::with_capacity(idx.iter().map(|i| self.tensors[*i].nbytes()).sum());
            for i in &idx {
                fused.extend_from_slice(&self.tensors[*i].contiguous_bytes()?);
            }
            f(dtype, &mut fused)?;
            let mut off = 0;
            for i in &idx {
                let t = &mut self.tensors[*i];
                let n = t.nbytes();
                t.scatter_from(&fused[off..off + n])?;
                off += n;
            }
        }
        Ok(())
    }

    /// One group of (contiguous) CUDA tensors on device `dev`.
    fn cuda_group(
        &mut self,
        dtype: DType,
        dev: i32,
        idx: &[usize],
        f: &mut impl FnMut(DType, &mut [u8]) -> parallel_engine::Result<()>,
        fdev: &mut Option<&mut dyn FnMut(DType, i32, u64, usize) -> parallel_engine::Result<()>>,
    ) -> parallel_engine::Result<()> {
        let g = cuda::require("collective")?;
        let deadline = Deadline::or_default(None);
        let total: usize = idx.iter().map(|i| self.tensors[*i].nbytes()).sum();
        let ptrs: Vec<(u64, usize)> = idx
            .iter()
            .map(|i| {
                let t = &mut self.tensors[*i];
                (t.data_mut_ptr() as u64, t.nbytes())
            })
            .collect();
        // Copies between the tensors and one buffer (device or host), in order, then a sync.
        let gather_scatter = |buf: Mem, back: bool| -> parallel_engine::Result<()> {
            let mut off = 0u64;
            for (p, n) in &ptrs {
                let at = match buf {
                    Mem::Dev(b) => Mem::Dev(b + off),
                    Mem::Host(h) => Mem::Host(h.wrapping_add(off as usize)),
                };
                let (dst, src) = if back {
                    (Mem::Dev(*p), at)
                } else {
                    (at, Mem::Dev(*p))
                };
                // SAFETY: each tensor holds n bytes (contiguous, import_out) and the buffer
                // `total` bytes; the tensors stay alive (their capsules) until the sync below.
                unsafe { g.copy(dev, dst, src, *n)? };
                off += *n as u64;
            }
            g.sync(dev, deadline)
        };
        match fdev {
            Some(fd) if ptrs.len() == 1 => fd(dtype, dev, ptrs[0].0, ptrs[0].1),
            Some(fd) => {
                let fused = DeviceAlloc::new(dev, total)?;
                gather_scatter(Mem::Dev(fused.ptr), false)?;
                fd(dtype, dev, fused.ptr, total)?;
                gather_scatter(Mem::Dev(fused.ptr), true)
            }
            None => {
                let mut host = vec![0u8; total];
                gather_scatter(Mem::Host(host.as_mut_ptr()), false)?;
                f(dtype, &mut host)?;
                gather_scatter(Mem::Host(host.as_mut_ptr()), true)
            }
        }
    }
}

/// All-reduce of every group of leaves: CPU groups through the host path, CUDA groups through
/// the Tree's GPU path (reductions on the device).
fn all_reduce_leaves(
    t: &Tree,
    leaves: &mut Leaves,
    op: &Op,
    user: Option<&DeviceReduce>,
) -> parallel_engine::Result<()> {
    let mut on_device = |dt: DType, dev: i32, ptr: u64, len: usize| {
        // SAFETY: `ptr` is a contiguous CUDA tensor (or our fused buffer) of `len` bytes on
        // `dev`, kept alive by its capsule and used by nothing else during the call.
        unsafe { t.all_reduce_cuda(dt, dev, ptr, len, op, user) }.map(|_| ())
    };
    leaves.each_group(
        |dt, b| t.all_reduce(dt, b, op).map(|_| ()),
        Some(&mut on_device),
    )
}

/// Broadcast of every group of leaves: CPU groups through the host path, CUDA groups through the
/// Tree's GPU path (CUDA IPC inside a host).
fn broadcast_leaves(t: &Tree, leaves: &mut Leaves, root: usize) -> parallel_engine::Result<()> {
    let mut on_device = |dt: DType, dev: i32, ptr: u64, len: usize| {
        // SAFETY: as in all_reduce_leaves.
        unsafe { t.broadcast_cuda(dt, dev, ptr, len, root) }
    };
    leaves.each_group(|dt, b| t.broadcast(dt, b, root), Some(&mut on_device))
}

/// An allreduce tree of processes (see `torch_parallel.tree`).
#[pyclass(module = "torch_parallel._native", name = "Tree", frozen)]
pub struct Tree_ {
    tree: Arc<Tree>,
    /// Asynchronous collectives run in submission order on one worker thread; a blocking call
    /// made while some are pending queues behind them (every rank must see the same order).
    queue: Mutex<Option<mpsc::Sender<Job>>>,
    pending: Arc<AtomicUsize>,
}

type Job = Box<dyn FnOnce(&Tree) + Send>;

impl Tree_ {
    fn submit(
        &self,
        f: impl FnOnce(&Tree) -> parallel_engine::Result<()> + Send + 'static,
    ) -> PyResult<Completion<()>> {
        let c = Completion::default();
        let done = c.clone();
        let pending = self.pending.clone();
        pending.fetch_add(1, Ordering::SeqCst);
        let job: Job = Box::new(move |t: &Tree| {
            done.complete(f(t));
            pending.fetch_sub(1, Ordering::SeqCst);
        });
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let tree = self.tree.clone();
            std::thread::Builder::new()
                .name("parallel-tree-async".into())
                .spawn(move || {
                    parallel_engine::runtime::block_signals();
                    while let Ok(job) = rx.recv() {
                        job(&tree);
                    }
                })
                .map_err(|e| {
                    pyo3::exceptions::PyRuntimeError::new_err(format!(
                        "cannot start the collectives thread: {e}"
                    ))
                })?;
            *q = Some(tx);
        }
        if let Err(mpsc::SendError(job)) = q.as_ref().expect("set above").send(job) {
            job(&self.tree);
        }
        Ok(c)
    }

    fn run<T: Send + 'static>(
        &self,
        py: Python<'_>,
        f: impl FnOnce(&Tree) -> parallel_engine::Result<T> + Send + 'static,
    ) -> PyResult<T> {
        if self.pending.load(Ordering::SeqCst) == 0 {
            let t = self.tree.clone();
            return crate::wait(py, move || f(&t));
        }
        let slot: Arc<Mutex<Option<T>>> = Arc::new(Mutex::new(None));
        let out = slot.clone();
        let c = self.submit(move |t| {
            let v = f(t)?;
            *out.lock().unwrap_or_else(|p| p.into_inner()) = Some(v);
            Ok(())
        })?;
        crate::wait(py, move || {
            c.wait(
                Deadline::after(Duration::from_secs(100 * 365 * 86400)),
                "tree",
            )
        })?;
        let v = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
        v.ok_or_else(|| {
            pyo3::exceptions::PyRuntimeError::new_err("collective finished without a result")
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
        crate::wait(py, move || c.wait(d, "tree"))?;
        convert::write_back(py, &self.writebacks)?;
        Ok(self.value.clone_ref(py))
    }
}

#[pymethods]
impl Tree_ {
    #[new]
    #[pyo3(signature = (rank=None, world_size=None, root=None, timeout=None))]
    fn new(
        py: Python<'_>,
        rank: Option<usize>,
        world_size: Option<usize>,
        root: Option<String>,
        timeout: Option<f64>,
    ) -> PyResult<Tree_> {
        let opts = TreeOptions {
            rank,
            world_size,
            root,
            timeout: secs(timeout)?,
            host: None,
        };
        let tree = crate::wait(py, move || Tree::new(opts))?;
        Ok(Tree_ {
            tree: Arc::new(tree),
            queue: Mutex::new(None),
            pending: Arc::new(AtomicUsize::new(0)),
        })
    }
    #[getter]
    fn rank(&self) -> usize {
        self.tree.rank()
    }
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
    #[pyo3(signature = (value, op=None))]
    fn all_reduce<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
        op: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (op, user) = op_or_sum(op)?;
        let (mut leaves, wb) = Leaves::collect(&value)?;
        self.run(py, move |t| {
            all_reduce_leaves(t, &mut leaves, &op, user.as_ref())
        })?;
        convert::write_back(py, &wb)?;
        Ok(value)
    }
    /// Like all_reduce, without waiting: returns a handle with wait(timeout) and done().
    #[pyo3(signature = (value, op=None))]
    fn all_reduce_async(
        &self,
        value: Bound<'_, PyAny>,
        op: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Work> {
        let (op, user) = op_or_sum(op)?;
        let (mut leaves, wb) = Leaves::collect(&value)?;
        self.work(value, wb, move |t| {
            all_reduce_leaves(t, &mut leaves, &op, user.as_ref())
        })
    }
    /// Like broadcast, without waiting.
    #[pyo3(signature = (value, root=0))]
    fn broadcast_async(&self, value: Bound<'_, PyAny>, root: usize) -> PyResult<Work> {
        let (mut leaves, wb) = Leaves::collect(&value)?;
        self.work(value, wb, move |t| broadcast_leaves(t, &mut leaves, root))
    }
    /// Like barrier, without waiting.
    fn barrier_async(&self, py: Python<'_>) -> PyResult<Work> {
        self.work(py.None().into_bound(py), vec![], |t| {
            t.barrier().map(|_| ())
        })
    }
    /// Broadcast from `root` in place; returns `value`.
    #[pyo3(signature = (value, root=0))]
    fn broadcast<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
        root: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (mut leaves, wb) = Leaves::collect(&value)?;
        self.run(py, move |t| broadcast_leaves(t, &mut leaves, root))?;
        convert::write_back(py, &wb)?;
        Ok(value)
    }
    /// Reduce to `root` (in place there; other ranks keep their values); returns `value`.
    #[pyo3(signature = (value, op=None, root=0))]
    fn reduce<'py>(
        &self,
        py: Python<'py>,
        value: Bound<'py, PyAny>,
        op: Option<&Bound<'py, PyAny>>,
        root: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (op, user) = op_or_sum(op)?;
        let (mut leaves, wb) = Leaves::collect(&value)?;
        self.run(py, move |t| {
            let mut on_device = |dt: DType, dev: i32, ptr: u64, len: usize| {
                // SAFETY: as in all_reduce_leaves.
                unsafe { t.reduce_cuda(dt, dev, ptr, len, &op, user.as_ref(), root) }.map(|_| ())
            };
            leaves.each_group(
                |dt, b| t.reduce(dt, b, &op, root).map(|_| ()),
                Some(&mut on_device),
            )
        })?;
        convert::write_back(py, &wb)?;
        Ok(value)
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
        let copy = tensor.call_method0("clone")?;
        let reduced = self.all_reduce(py, copy, op)?;
        let parts = reduced.call_method1("tensor_split", (self.tree.world_size(),))?;
        parts.get_item(self.tree.rank())
    }
    /// Every rank's tensor, in rank order (shapes may differ between ranks).
    fn all_gather(&self, py: Python<'_>, tensor: &Bound<'_, PyAny>) -> PyResult<PyObject> {
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
        let out = PyList::empty(py);
        for p in pieces {
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
            out.append(o)?;
        }
        Ok(out.into_any().unbind())
    }
    /// Blocks until every rank reached the barrier.
    fn barrier(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |t| t.barrier().map(|_| ()))
    }
    /// Uneven endings: this rank has no more data. It keeps serving the others' collectives
    /// (contributing the op's identity) until every rank called done(); returns how many it served.
    #[pyo3(signature = (op=None, timeout=None))]
    fn done(
        &self,
        py: Python<'_>,
        op: Option<&Bound<'_, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<usize> {
        let op = op.map(make_op).transpose()?.map(|(op, _)| op);
        let timeout = secs(timeout)?;
        self.run(py, move |t| t.done(op.as_ref(), timeout))
    }
    /// The plan: hosts, tree, ring and link kinds.
    fn plan(&self) -> String {
        self.tree.describe()
    }
    /// Traffic per link: peer rank, link kind, bytes and messages each way, bandwidth.
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

//! The module's functions: configuration, I/O backend, CUDA, topology, and the hooks the
//! package's Python files install (CUDA allocator, NVRTC hint, error classes, tensor factory).

use crate::errors::IntoPyResult;
use crate::{convert, errors};
use pyo3::prelude::*;
use pyo3::types::PyDict;
use std::sync::Arc;

/// Every effective PARALLEL_* value, as text.
#[pyfunction]
pub(crate) fn config(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let c = parallel_engine::config::try_config().py()?;
    let d = PyDict::new(py);
    for (k, v) in &c.effective {
        d.set_item(*k, v)?;
    }
    Ok(d.unbind())
}

/// Why the I/O backend in use was chosen.
#[pyfunction]
pub(crate) fn io_backend_reason() -> PyResult<String> {
    parallel_engine::runtime::backend_reason().py()
}

/// The I/O backend in use ("io_uring" or "epoll").
#[pyfunction]
pub(crate) fn io_backend() -> PyResult<&'static str> {
    parallel_engine::runtime::backend().map(|b| b.name()).py()
}

/// How this process's waits went under the wait policy (`PARALLEL_SPIN_US`), counted since it
/// started: `spins_started`, `spins_paid` (the awaited event came while spinning),
/// `spins_declined` (waits sent straight to the kernel: for busy cores, which
/// `spins_declined_busy` counts, or skipped after recent spins that did not pay), and
/// `spins_declined_short` (skipped waits whose kernel sleep ended within `PARALLEL_SPIN_US`: a
/// spin would have paid, and the thread soon spins again). `spins_yielding`: spins that gave the
/// CPU away at every step, the process having no CPU to spare beside the waiter (a rank bound
/// to one CPU). A run whose waits are mostly declined pays a kernel wake-up per hand-off.
/// `spread_moves`: times a waiting thread moved off the CPU of the process it waited for;
/// `spread_pairs`: times one moved onto it, every core being busy (`PARALLEL_SPREAD`).
#[pyfunction]
pub(crate) fn wait_stats(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let s = parallel_engine::runtime::spin_stats();
    let d = PyDict::new(py);
    d.set_item("spins_started", s.started)?;
    d.set_item("spins_paid", s.paid)?;
    d.set_item("spins_declined", s.declined)?;
    d.set_item("spins_declined_busy", s.declined_busy)?;
    d.set_item("spins_declined_short", s.declined_short)?;
    d.set_item("spins_yielding", s.yielding)?;
    d.set_item("spread_moves", parallel_engine::runtime::spread::moves())?;
    d.set_item("spread_pairs", parallel_engine::runtime::spread::pairs())?;
    Ok(d.unbind())
}

/// Cross-memory attach here (`PARALLEL_SHM_CMA`): what one 4 MiB copy costs by it and by memcpy
/// (measured once per process), whether `auto` uses it, and whether this process does; `None`
/// (the figures) where the kernel refuses it.
#[pyfunction]
pub(crate) fn cross_memory(py: Python<'_>) -> PyResult<Py<PyDict>> {
    let d = PyDict::new(py);
    let c = parallel_engine::link::sys::cma_cost();
    d.set_item("cma_us", c.map(|c| c.cma.as_secs_f64() * 1e6))?;
    d.set_item("memcpy_us", c.map(|c| c.memcpy.as_secs_f64() * 1e6))?;
    d.set_item("bytes", c.map(|c| c.bytes))?;
    d.set_item("pays", c.is_some_and(|c| c.pays()))?;
    d.set_item("used", parallel_engine::link::sys::cma_wanted())?;
    Ok(d.unbind())
}

/// Whether this process can use CUDA (driver found, PARALLEL_CUDA on).
#[pyfunction]
pub(crate) fn cuda_available() -> bool {
    parallel_engine::cuda::cuda().is_some()
}

/// What CUDA this process uses, or why it has none.
#[pyfunction]
pub(crate) fn cuda_info() -> String {
    match parallel_engine::cuda::cuda() {
        Some(g) => g.describe(),
        None => format!("no CUDA: {}", parallel_engine::cuda::unavailable_reason()),
    }
}

/// This host's topology (engine/src/topology): the probe and why, cores, NUMA nodes, caches, GPUs
/// and NICs with their locality, the reactors' CPUs, and `lines` (key, text) for people.
#[pyfunction]
pub(crate) fn topology(py: Python<'_>) -> PyResult<Py<PyDict>> {
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
pub(crate) fn _set_cuda_allocator(f: PyObject) {
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
pub(crate) fn _add_nvrtc_hint(path: &str) {
    parallel_engine::cuda::nvrtc::add_hint(path);
}

/// The environment-variable table as Markdown (docs/environment.md).
#[pyfunction]
pub(crate) fn environment_markdown() -> String {
    parallel_engine::config::render_markdown()
}

#[pyfunction]
pub(crate) fn _register_errors(py: Python<'_>, classes: Py<PyDict>) {
    errors::register(py, classes);
}

#[pyfunction]
pub(crate) fn _set_tensor_factory(py: Python<'_>, f: PyObject) {
    convert::set_tensor_factory(py, f);
}

//! Python code on the engine's executor: `add_done_callback` of a Handle or a Work, and
//! `Lane`, an ordered lane of Python jobs (the process group's point-to-point sends and
//! receives). No thread of the bindings' own: both run on the engine's lane workers.
//!
//! Invariants:
//! - PY-3: a done callback runs once, after the operation's result is visible to `wait`, on the
//!   process's callback lane (never on the thread that completed the operation: a collective's
//!   lane starts its next job without waiting for the GIL), in completion order.
//! - PY-4: no engine thread takes the GIL once the interpreter starts exiting: the package's
//!   atexit hook closes the gate ([`_close_callbacks`]) and waits, up to its timeout, for the
//!   jobs submitted and the callbacks of operations that completed, and for what those add while
//!   they run (a job's own callbacks); anything else is dropped (a job's wait reports it).
//!   A Python call still inside a blocking engine call when the timeout ends is the one case
//!   left: it may wake while the interpreter finalizes (the same as a daemon thread).

use crate::errors;
use parallel_engine::runtime::{Completion, Deadline, Lane as EngineLane};
use parallel_engine::{Error, ErrorKind};
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Whether Python may still be called from engine threads, and how many such calls run now.
struct Gate {
    state: Mutex<GateState>,
    idle: Condvar,
}

#[derive(Default)]
struct GateState {
    /// Exit began: only what is in flight may still add to it (a finished job's callbacks).
    closed: bool,
    /// Exit's wait ended: nothing more calls Python.
    sealed: bool,
    in_flight: usize,
}

fn gate() -> &'static Gate {
    static GATE: OnceLock<Gate> = OnceLock::new();
    GATE.get_or_init(|| Gate {
        state: Mutex::new(GateState::default()),
        idle: Condvar::new(),
    })
}

/// A place in the gate: Python may be called while it is held (PY-4).
struct Ticket;

impl Ticket {
    /// A ticket, unless exit began and nothing is in flight any more (or exit's wait ended).
    fn take() -> Option<Ticket> {
        let mut s = gate().state.lock().unwrap_or_else(|e| e.into_inner());
        if s.sealed || (s.closed && s.in_flight == 0) {
            return None;
        }
        s.in_flight += 1;
        Some(Ticket)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let g = gate();
        let mut s = g.state.lock().unwrap_or_else(|e| e.into_inner());
        s.in_flight -= 1;
        g.idle.notify_all();
    }
}

/// The lane every done callback runs on (PY-3).
fn callback_lane() -> &'static EngineLane {
    static LANE: OnceLock<EngineLane> = OnceLock::new();
    LANE.get_or_init(EngineLane::new)
}

/// Calls `f()` on the callback lane once `done` completes (PY-3, PY-4). A callback that raises
/// is reported through the package's log (it has no caller to raise to). A callback is in the
/// gate from the moment its operation completes: exit waits for it as for a running one.
pub(crate) fn add_done_callback<T: Send + 'static>(done: &Completion<T>, f: PyObject) {
    done.on_done(move || {
        let Some(ticket) = Ticket::take() else {
            // The interpreter is exiting: do not touch the callable (its reference is left).
            std::mem::forget(f);
            return;
        };
        callback_lane().submit(move || {
            Python::with_gil(move |py| {
                if let Err(e) = f.call0(py) {
                    tracing::error!("a done callback raised: {e}");
                }
                drop(f); // with the GIL held
            });
            drop(ticket);
            Ok(())
        });
    });
}

/// Closes the gate: no engine thread calls Python after this returns (PY-4). Waits up to
/// `timeout` seconds for the calls in flight; returns how many were still running then.
#[pyfunction]
pub(crate) fn _close_callbacks(py: Python<'_>, timeout: f64) -> usize {
    let g = gate();
    let until = Instant::now() + Duration::from_secs_f64(timeout.clamp(0.0, 3600.0));
    py.allow_threads(|| {
        let mut s = g.state.lock().unwrap_or_else(|e| e.into_inner());
        s.closed = true;
        while s.in_flight > 0 {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = g
                .idle
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        s.sealed = true;
        s.in_flight
    })
}

type Outcome = Arc<Mutex<Option<PyResult<PyObject>>>>;

/// Completes a job's handle when dropped: after its outcome is stored, or while unwinding from a
/// panic (then `wait` reports that there is no result).
struct Finish(Completion<()>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.complete(Ok(()));
    }
}

/// An ordered lane of Python jobs on the engine's executor: `submit(fn)` returns a `Job` at
/// once; the jobs run one at a time, in submission order, each holding a lane worker (not a
/// thread of its own) while it runs.
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Lane {
    lane: EngineLane,
}

/// A job submitted to a `Lane`: `wait(timeout)` returns what its function returned (or raises
/// what it raised), `done()` says whether it finished, `add_done_callback(fn)` calls `fn()` on
/// the engine's callback lane once it has.
#[pyclass(module = "torch_parallel._native", frozen)]
pub struct Job {
    done: Completion<()>,
    outcome: Outcome,
}

#[pymethods]
impl Lane {
    #[new]
    fn new() -> Lane {
        Lane {
            lane: EngineLane::new(),
        }
    }
    /// Queues `fn()` behind the lane's earlier jobs.
    fn submit(&self, f: PyObject) -> Job {
        let outcome: Outcome = Arc::default();
        let done = Completion::default();
        let (out, finished) = (outcome.clone(), Finish(done.clone()));
        // The engine lane's own handle is not needed: `finished` completes the job's.
        // The ticket is taken now (exit waits for queued jobs too) and held until the job's done
        // callbacks hold theirs (PY-4: exit cannot slip between a job and its callbacks).
        let ticket = Ticket::take();
        let _ = self.lane.submit(move || {
            let r = match ticket {
                Some(_) => Python::with_gil(move |py| {
                    let r = f.call0(py);
                    drop(f); // with the GIL held
                    r
                }),
                None => Err(PyRuntimeError::new_err(
                    "the interpreter is exiting: a job queued on a torch_parallel lane did not run",
                )),
            };
            *out.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
            drop(finished);
            drop(ticket);
            Ok(())
        });
        Job { done, outcome }
    }
    /// Jobs submitted and not yet finished.
    fn pending(&self) -> usize {
        self.lane.pending()
    }
}

#[pymethods]
impl Job {
    fn done(&self) -> bool {
        self.done.done()
    }
    /// Waits for the job (`timeout` in seconds; None: the default operation timeout) and returns
    /// its result; a job that raised raises the same exception here, every time it is asked.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<PyObject> {
        if !self.done.done() {
            let d = Deadline::or_default(crate::timeout(timeout)?);
            let c = self.done.clone();
            // A concurrent wait may have taken the completion's result: done() then stands.
            crate::wait(py, move || match c.wait(d, "lane job") {
                Err(_) if c.done() => Ok(()),
                r => r,
            })?;
        }
        let g = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        match g.as_ref() {
            Some(Ok(v)) => Ok(v.clone_ref(py)),
            Some(Err(e)) => Err(e.clone_ref(py)),
            // The lane job panicked before storing anything (EXEC-1).
            None => Err(errors::to_py(Error::new(
                ErrorKind::Closed,
                "lane job",
                "the job ended without a result (it panicked; see the log)",
            ))),
        }
    }
    fn add_done_callback(&self, f: PyObject) {
        add_done_callback(&self.done, f);
    }
}

//! Log records of the engine, delivered to Python's `logging` (PARALLEL_LOG).
//!
//! The engine calls the forwarder on whatever thread logged (a reactor, a worker, a thread
//! holding no GIL): taking the GIL there could deadlock against a Python thread that waits on
//! that reactor, so the record is queued (LOG-4) and a Python thread of the package
//! (`torch_parallel._logging`) takes records with [`_log_next`], which waits with the GIL
//! released, and hands them to the `torch_parallel` logger.
//!
//! Invariants:
//! - PYLOG-1: the queue is bounded ([`CAPACITY`] records); when it is full the oldest record is
//!   dropped and counted, and the count is reported as a warning record of its own.

use pyo3::prelude::*;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

const CAPACITY: usize = 10_000;

struct Queue {
    records: VecDeque<(u8, String, String)>,
    dropped: u64,
}

static QUEUE: Mutex<Queue> = Mutex::new(Queue {
    records: VecDeque::new(),
    dropped: 0,
});
static READY: Condvar = Condvar::new();

fn level_number(l: tracing::Level) -> u8 {
    // Python's logging levels (TRACE below DEBUG, as 5).
    match l {
        tracing::Level::ERROR => 40,
        tracing::Level::WARN => 30,
        tracing::Level::INFO => 20,
        tracing::Level::DEBUG => 10,
        _ => 5,
    }
}

/// Registers the forwarder with the engine (at module import, before any configuration read).
pub fn install() {
    parallel_engine::log::set_forwarder(Box::new(|r| {
        let mut q = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        if q.records.len() >= CAPACITY {
            q.records.pop_front();
            q.dropped += 1;
        }
        let rank = r.rank.map_or("-".to_string(), |x| x.to_string());
        q.records.push_back((
            level_number(r.level),
            r.target.replace("::", "."),
            format!("[rank {rank}] {}", r.message),
        ));
        READY.notify_all();
    }));
}

/// The queued records `(level, module, message)`, waiting up to `timeout` seconds for the first
/// (0: don't wait). The GIL is released while it waits.
#[pyfunction]
#[pyo3(signature = (timeout = 0.0))]
pub fn _log_next(py: Python<'_>, timeout: f64) -> Vec<(u8, String, String)> {
    let wait = Duration::from_secs_f64(timeout.clamp(0.0, 60.0));
    py.allow_threads(|| {
        let deadline = Instant::now() + wait;
        let mut q = QUEUE.lock().unwrap_or_else(|p| p.into_inner());
        while q.records.is_empty() && q.dropped == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            q = READY
                .wait_timeout(q, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let mut out: Vec<_> = q.records.drain(..).collect();
        if q.dropped > 0 {
            out.push((
                30,
                "parallel_python.logs".into(),
                format!(
                    "{} log record(s) dropped: more than {CAPACITY} were waiting for Python's logging",
                    q.dropped
                ),
            ));
            q.dropped = 0;
        }
        out
    })
}

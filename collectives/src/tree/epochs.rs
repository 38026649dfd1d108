//! Epochs and uneven endings (TREE-4): a rank that called `done` serves the others'
//! collectives without contributing until every rank has called it; then the epoch ends.

use super::Tree;
use super::pass::Pass;
use crate::control::{Kind, Verdict};
use crate::ops::{self, Op};
use parallel_engine::Result;
use parallel_engine::runtime::Deadline;
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Tree {
    /// Uneven endings (TREE-4): this rank has no more data for this epoch. It keeps answering the
    /// other ranks' collectives without contributing (the op's identity element) until every rank
    /// called `done`; then the epoch ends, this rank takes part again from the next collective
    /// on, and `done` returns how many collectives it served. `op` is needed only for a user
    /// reduce function (a finished rank holding two ranks' data must combine them). `timeout`
    /// bounds each wait for the others' next collective (default: the tree's timeout).
    pub fn done(&self, op: Option<&Op>, timeout: Option<Duration>) -> Result<usize> {
        self.check_usable()?;
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let r = self.serve(op, timeout.unwrap_or(self.timeout));
        // Whether the epoch ended or the tree failed, this rank is no longer serving.
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = false;
        r
    }

    fn serve(&self, op: Option<&Op>, wait: Duration) -> Result<usize> {
        // One per user call: the other passes of a call (dtype groups of one nested value) are
        // marked in their meta; internal passes (status rounds, a second pass) are taken by
        // serve_data.
        let mut served = 0;
        let count = |served: &mut usize| {
            if self.served_call.swap(false, Ordering::SeqCst) {
                *served += 1;
            }
        };
        loop {
            self.check_usable()?;
            self.agreed.store(false, Ordering::SeqCst);
            let v = match self.pass_with(Pass {
                meta: None,
                op,
                data: None,
                carry_data: false,
                contributes: false,
                piece: None,
                failure: None,
                deadline: Deadline::after(wait),
            }) {
                Ok(v) => v,
                // The others' call failed on every rank (a mismatch, their reduce function, a
                // done root): they raise, this rank serves on.
                Err(_) if self.agreed.swap(false, Ordering::SeqCst) => {
                    count(&mut served);
                    continue;
                }
                Err(e) => return Err(self.abort(&e)),
            };
            if v.contributors == 0 {
                return Ok(served);
            }
            count(&mut served);
            if let Err(e) = self.serve_data(&v, op) {
                if self.agreed.swap(false, Ordering::SeqCst) {
                    continue;
                }
                return Err(self.abort(&e));
            }
        }
    }

    /// A finished rank's part in the data phase of the others' collective, if it has one.
    fn serve_data(&self, v: &Verdict, op: Option<&Op>) -> Result<()> {
        let Some(m) = &v.meta else { return Ok(()) };
        // An all-to-all moves nothing to or from a finished rank, which only helps make the
        // full mesh on the first one (TA2A-2, TA2A-3).
        if m.kind == Kind::AllToAll {
            return self.mesh_links(self.deadline()).map(|_| ());
        }
        // The contributing ranks reduce partial results this (root) rank could not combine.
        if !v.parts.is_empty() {
            return self.settle(None, None);
        }
        // Join the device path of a CUDA all-reduce (identity data) or broadcast (relaying),
        // in host memory.
        if m.gpu {
            return match m.kind {
                Kind::AllReduce | Kind::Reduce => self.serve_gpu_all_reduce(m, op, v.contributors),
                Kind::Broadcast => self.serve_gpu_broadcast(m),
                _ => Ok(()),
            };
        }
        // Join a reduce-scatter's ring with the op's identity (its op is always built in).
        if m.kind == Kind::ReduceScatter
            && let Some(dt) = m.dtype
        {
            let builtin = Op::parse(&m.op)?;
            let mut buf = vec![0u8; m.count * dt.itemsize()];
            ops::identity(&builtin, dt, &mut buf);
            let comm = self.comm(self.deadline());
            return crate::algorithms::ring::reduce_scatter(
                &comm,
                &self.plan.ring,
                dt,
                &mut buf,
                &builtin,
                v.contributors,
            );
        }
        // Join the ring part of a large all-reduce without contributing.
        if m.kind == Kind::AllReduce
            && let Some(dt) = m.dtype
            && m.algo != crate::algorithms::Algorithm::Tree
        {
            let mut buf = vec![0u8; m.count * dt.itemsize()];
            match Op::parse(&m.op) {
                // A built-in op: its identity element is a contribution that changes nothing.
                Ok(builtin) => {
                    ops::identity(&builtin, dt, &mut buf);
                    self.large_all_reduce(m.algo, dt, &mut buf, &builtin, v.contributors)?;
                }
                // A user function: the others send the data through the tree instead (no
                // identity element for this rank to contribute in a ring).
                Err(_) => {
                    let again = self.pass(None, op, None, false, false)?;
                    if !again.parts.is_empty() {
                        self.settle(None, None)?;
                    }
                }
            }
        }
        Ok(())
    }
}

//! The collective algorithms, as free functions over a [`Communicator`] (Gloo's habit): each
//! sees links to its peers, a deadline, a pipeline chunk and a reduce kernel, never a socket, a
//! CUDA handle or the Tree's protocol state. The [`Tree`](crate::Tree) runs its control pass
//! (which checks that every rank called the same collective, and counts contributors), then
//! asks [`choose`] which algorithm moves the data and calls it.
//!
//! - [`ring::all_reduce`]: pipelined ring, reduce-scatter then all-gather (large buffers); host
//!   or device memory, the memory brings its reduce kernel and copy engine (`ring::Memory`).
//!   [`ring::reduce_scatter`] and [`ring::all_gather`] run one of its two phases alone, over
//!   equal parts, part r being rank r's (RING-3).
//! - [`hierarchical::all_reduce`]: reduce inside each host, a ring of host leaders, broadcast
//!   inside each host (large buffers across hosts with several ranks each).
//! - [`tree::all_reduce`]: whole tensors up the tree (reduced in rank order) and the root's
//!   result down; host or device memory, the reduce kernel is the caller's (CPU or CUDA).
//! - [`tree::broadcast`]: from any root, up its path to rank 0, then down to every other rank.
//! - [`alltoall::exchange`]: pairwise all-to-all (step k: send to rank + k, receive from
//!   rank - k), pieces of any size per pair, over a full mesh of links made on first use.
//!
//! Small CPU all-reduces, reduces, broadcasts, all-gathers and barriers ride the Tree's control
//! pass itself (the data travel with the control frames up and down the tree), so they have no
//! function of their own here. The barrier in particular is the control pass alone: its tree
//! gather and broadcast already check every rank's call, so a function would only repeat it.
//!
//! Invariants:
//! - ALGO-1: every element is reduced in exactly one place, in a fixed order, then copied, so
//!   every rank ends bitwise identical (TREE-1).
//! - ALGO-2: an algorithm reads or writes the caller's buffer only while it holds its borrow;
//!   asynchronous sends of borrowed bytes go through a [`SendScope`] (SEND-1).
//! - ALGO-3: every receive and send is bounded by the communicator's deadline, and an error
//!   names the peer and the step.

pub mod alltoall;
pub mod hierarchical;
pub mod ring;
pub(crate) mod sends;
pub mod tree;

use crate::plan::{Algo, Plan};
use parallel_engine::endpoint::Conn;
use parallel_engine::runtime::Deadline;
use parallel_engine::value::{Tensor, Value};
use parallel_engine::{Error, ErrorKind, Result};
use std::collections::HashMap;
use std::sync::Arc;

pub(crate) use sends::{SendScope, Sender};

/// Tuning of the collectives, from the environment (engine config) or set by the user.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Buffers of at least this many bytes take the ring (when `algo` is Auto).
    pub ring_threshold: usize,
    /// Pipeline chunk of the ring, in bytes.
    pub chunk: usize,
    /// Largest chunk of the ring over device memory, in bytes ([`DEVICE_CHUNK`] by default):
    /// device segments up to this size move whole (see `docs/cuda.md`). Each chunk is one
    /// message, so it must be the same on every rank (a difference is a Mismatch error).
    pub device_chunk: usize,
    pub algo: Algo,
}

/// The default [`Tuning::device_chunk`]: each device chunk by CUDA IPC costs a mapping and an
/// event round trip (tenths of a millisecond), so the ring moves device segments whole up to
/// this size, which bounds its device scratch.
pub const DEVICE_CHUNK: usize = 64 << 20;

/// Which algorithm moves an all-reduce's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// With the control pass, up and down the tree (small buffers, or forced).
    Tree,
    /// The pipelined ring over every rank.
    Ring,
    /// Host-local reduce, a ring of host leaders, host-local broadcast (TREE-5).
    Hierarchical,
    /// The shared-memory fast path of one host ([`crate::flat`]): never chosen here, nor sent
    /// in a meta; reported by `Tree::last_all_reduce_algorithm` when a call finished there.
    Flat,
}

impl Algorithm {
    /// The algorithm's code in control messages.
    pub(crate) fn code(self) -> u8 {
        match self {
            Algorithm::Tree => 0,
            Algorithm::Ring => 1,
            Algorithm::Hierarchical => 2,
            Algorithm::Flat => 3,
        }
    }

    /// The algorithm's name: "tree", "ring", "hierarchical" or "flat".
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Tree => "tree",
            Algorithm::Ring => "ring",
            Algorithm::Hierarchical => "hierarchical",
            Algorithm::Flat => "flat",
        }
    }

    /// The algorithm of a code in a control message; `None` for an unknown one.
    pub(crate) fn from_code(c: u8) -> Option<Algorithm> {
        [
            Algorithm::Tree,
            Algorithm::Ring,
            Algorithm::Hierarchical,
            Algorithm::Flat,
        ]
        .into_iter()
        .find(|a| a.code() == c)
    }
}

/// The one place that picks an all-reduce algorithm, by size and topology: the tree below the
/// ring threshold (or when forced), else the ring, hierarchical when the plan spans several hosts
/// with several ranks on some.
pub fn choose(plan: &Plan, tuning: &Tuning, nbytes: usize) -> Algorithm {
    let ring = plan.world() > 1
        && match tuning.algo {
            Algo::Ring => true,
            Algo::Tree => false,
            Algo::Auto => nbytes >= tuning.ring_threshold,
        };
    match ring {
        false => Algorithm::Tree,
        true if plan.hierarchical() => Algorithm::Hierarchical,
        true => Algorithm::Ring,
    }
}

/// What an algorithm sees of the tree: this rank, its links, the sender that overlaps sends
/// with receives, a deadline and the pipeline chunk.
pub struct Communicator<'a> {
    rank: usize,
    links: &'a HashMap<usize, Arc<Conn>>,
    sender: &'a Sender,
    deadline: Deadline,
    chunk: usize,
}

impl std::fmt::Debug for Communicator<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut peers: Vec<_> = self.links.keys().collect();
        peers.sort();
        write!(f, "Communicator(rank {}, peers {peers:?})", self.rank)
    }
}

impl<'a> Communicator<'a> {
    pub(crate) fn new(
        rank: usize,
        links: &'a HashMap<usize, Arc<Conn>>,
        sender: &'a Sender,
        deadline: Deadline,
        chunk: usize,
    ) -> Communicator<'a> {
        Communicator {
            rank,
            links,
            sender,
            deadline,
            chunk,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Every operation of this communicator ends by this deadline (ALGO-3).
    pub fn deadline(&self) -> Deadline {
        self.deadline
    }

    /// The pipeline chunk, in bytes.
    pub fn chunk(&self) -> usize {
        self.chunk
    }

    pub(crate) fn sender(&self) -> &Sender {
        self.sender
    }

    /// The link to rank `r`: an error (not a panic) if the plan gave this rank none.
    pub fn link(&self, r: usize) -> Result<&'a Arc<Conn>> {
        self.links.get(&r).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "tree",
                format!("rank {} has no link to rank {r}", self.rank),
            )
        })
    }

    /// Receives rank `from`'s next message straight into `bytes` (a whole message of exactly
    /// that many bytes); `what` names the step in the error.
    pub fn recv_bytes(&self, from: usize, bytes: &mut [u8], what: &str) -> Result<()> {
        // SAFETY: the view is used only by this synchronous receive, during which `bytes` stays
        // exclusively borrowed; nothing keeps the view after it returns.
        let into = unsafe { out_view(bytes) };
        self.link(from)?
            .recv_into(&mut [into], Some(self.deadline.remaining()))
            .map(|_| ())
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    "all_reduce",
                    format!("{what} from rank {from}: {e}"),
                )
            })
    }

    /// Receives rank `from`'s next message, checked against `check` (dtype and shape; never
    /// written), and hands its bytes to `sink` in pieces of whole `grain`-byte elements,
    /// `(offset, bytes)`, each while it is still in the cache ([`Conn::recv_streamed`]).
    pub fn recv_streamed(
        &self,
        from: usize,
        check: &mut Tensor,
        grain: usize,
        what: &str,
        sink: &mut parallel_engine::link::Sink<'_>,
    ) -> Result<()> {
        self.link(from)?
            .recv_streamed(check, grain, Some(self.deadline.remaining()), sink)
            .map_err(|e| {
                Error::new(
                    e.kind(),
                    "all_reduce",
                    format!("{what} from rank {from}: {e}"),
                )
            })
    }

    /// Sends a whole tensor (host or device memory) to rank `to`, synchronously.
    pub fn send_tensor(&self, to: usize, t: &Tensor) -> Result<()> {
        let v = Value::Tensor(alias(t));
        self.link(to)?
            .send(&v, Some(self.deadline.remaining()))
            .map_err(|e| Error::new(e.kind(), "tree", format!("to rank {to}: {e}")))
    }

    /// Receives a whole tensor from rank `from` into `into` (host or device memory).
    pub fn recv_tensor(&self, from: usize, into: &mut Tensor) -> Result<()> {
        let v = self
            .link(from)?
            .recv_into(std::slice::from_mut(into), Some(self.deadline.remaining()))
            .map_err(|e| Error::new(e.kind(), "tree", format!("from rank {from}: {e}")))?;
        match v {
            Value::Out(0) => Ok(()),
            other => Err(Error::new(
                ErrorKind::Protocol,
                "tree",
                format!("rank {from} sent {other:?} where tensor data was expected"),
            )),
        }
    }
}

fn keep() -> Arc<dyn std::any::Any + Send + Sync> {
    Arc::new(())
}

/// A header over `t`'s memory for one synchronous send while `t` is borrowed.
fn alias(t: &Tensor) -> Tensor {
    // SAFETY: the alias is used only by the synchronous send of the caller, which borrows `t`
    // (and so its memory) for the whole send.
    unsafe {
        Tensor::from_raw(
            t.dtype(),
            vec![t.numel()],
            None,
            t.device(),
            t.data_ptr() as *mut u8,
            t.nbytes(),
            keep(),
        )
    }
}

/// A tensor value over `bytes` (not owning them) for sending without a copy.
///
/// # Safety
/// The caller keeps `bytes` alive and unmodified until the send that uses the value completed.
pub(crate) unsafe fn view(bytes: &[u8]) -> Value {
    // SAFETY: delegated to the caller (see above).
    Value::Tensor(unsafe {
        Tensor::from_raw(
            parallel_engine::value::DType::U8,
            vec![bytes.len()],
            None,
            parallel_engine::value::Device::Cpu,
            bytes.as_ptr() as *mut u8,
            bytes.len(),
            keep(),
        )
    })
}

/// An out-tensor over `bytes` for receiving straight into them.
///
/// # Safety
/// The tensor does not borrow `bytes`: the caller uses it only while `bytes` stays exclusively
/// borrowed (a synchronous receive), never for an asynchronous one that may outlive the borrow.
pub(crate) unsafe fn out_view(bytes: &mut [u8]) -> Tensor {
    // SAFETY: delegated to the caller (see above).
    unsafe {
        Tensor::from_raw(
            parallel_engine::value::DType::U8,
            vec![bytes.len()],
            None,
            parallel_engine::value::Device::Cpu,
            bytes.as_mut_ptr(),
            bytes.len(),
            keep(),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests;

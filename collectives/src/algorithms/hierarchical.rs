//! Hierarchical all-reduce across hosts with several ranks each (TREE-5), moved from the Tree
//! unchanged: reduce inside the host up the host's part of the tree, chunk by chunk; a ring of
//! the host leaders across hosts ([`super::ring::all_reduce`]); then a broadcast inside the host
//! down the same tree. Only leaders send across hosts, so each host's network link carries
//! 2(H-1)/H of the data instead of the flat ring's share of every rank's traffic.
//!
//! Invariants:
//! - HIER-1: inside a host, each chunk is reduced at each rank from its children in rank order
//!   (own contribution first), then sent up once; the leaders' ring reduces in ring order; the
//!   broadcast only copies (ALGO-1).
//! - HIER-2: a chunk is written (reduced into) only before its send starts, and not again until
//!   every send of the phase completed (SEND-1).

use super::{Communicator, SendScope, ring};
use crate::ops::{self, Op};
use crate::plan::Plan;
use parallel_engine::Result;
use parallel_engine::buffer::Buf;
use parallel_engine::value::DType;

/// All-reduce of `buf` (elements of `dtype`) with `op` over every rank of `plan`, through the
/// host leaders. `contributors` divides the result of [`Op::Avg`].
pub fn all_reduce(
    comm: &Communicator<'_>,
    plan: &Plan,
    dtype: DType,
    buf: &mut [u8],
    op: &Op,
    contributors: usize,
) -> Result<()> {
    let me = comm.rank();
    let host = plan.host_of[me];
    let leader = plan.hosts[host][0];
    let up = plan.parent[me].filter(|p| plan.host_of[*p] == host);
    let down: Vec<usize> = plan.children[me]
        .iter()
        .copied()
        .filter(|c| plan.host_of[*c] == host)
        .collect();
    let item = dtype.itemsize();
    let chunk = (comm.chunk() / item).max(1) * item;
    let n = buf.len();
    let base = buf.as_mut_ptr();
    let mut scratch = Buf::with_len(chunk.min(n.max(1)))?;
    // 1. Reduce inside the host, chunk by chunk, up the host's tree. The sends go through a
    // scope (SEND-1), ended before phase 2 writes buf, and on every early return.
    SendScope::run(comm, |sends| {
        for a in (0..n.max(1)).step_by(chunk) {
            let b = (a + chunk).min(n);
            // SAFETY: [a, b) lies in buf, and the chunks are disjoint; a chunk is written (reduced
            // into) only before its send starts, and not again until the scope ended (HIER-2).
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(a), b - a) };
            for &c in &down {
                let s = &mut scratch[..b - a];
                comm.recv_bytes(c, s, "host reduce")?;
                ops::reduce_into(op, dtype, dst, s)?;
            }
            if let Some(p) = up {
                sends.send(comm.link(p)?, dst);
            }
        }
        sends.wait_all("all_reduce")
    })?;
    // 2. The leaders all-reduce across hosts (the leaders' ring divides an average; the others
    // receive the divided result).
    if me == leader {
        let leaders: Vec<usize> = plan.hosts.iter().map(|h| h[0]).collect();
        ring::all_reduce(comm, &leaders, dtype, buf, op, contributors)?;
    }
    // 3. Broadcast inside the host, chunk by chunk, down the host's tree.
    SendScope::run(comm, |sends| {
        for a in (0..n.max(1)).step_by(chunk) {
            let b = (a + chunk).min(n);
            // SAFETY: [a, b) lies in buf; no send of it is in flight while we receive into it.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(a), b - a) };
            if let Some(p) = up {
                comm.recv_bytes(p, dst, "host broadcast")?;
            }
            for &c in &down {
                sends.send(comm.link(c)?, dst);
            }
        }
        sends.wait_all("all_reduce")
    })
}

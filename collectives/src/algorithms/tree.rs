//! Whole-tensor tree algorithms, for host or device memory: the caller brings the reduce kernel
//! (SIMD on the CPU, NVRTC on a GPU) and the links move the bytes (CUDA IPC between processes of
//! a host, staged through pinned host memory across hosts), so one algorithm serves both.
//!
//! Invariants:
//! - TALG-1: [`all_reduce`] applies contributions in a fixed order (own, then children in the
//!   order given, which the plan keeps in rank order), and every rank receives the root's bytes:
//!   the result is bitwise the same on every rank (ALGO-1, GPU-1).
//! - TALG-2: [`broadcast`] sends each rank the root's bytes exactly once, over tree links only.

use super::Communicator;
use crate::plan::Plan;
use parallel_engine::Result;
use parallel_engine::value::Tensor;

/// All-reduce of `mine` over the tree given by this rank's `parent` and `children`: receive each
/// child's tensor into `scratch` and `reduce(mine, scratch)` it, send the result to the parent,
/// receive the root's result back into `mine`, and pass it on to the children (TALG-1).
pub fn all_reduce(
    comm: &Communicator<'_>,
    parent: Option<usize>,
    children: &[usize],
    mut mine: Tensor,
    scratch: &mut Tensor,
    mut reduce: impl FnMut(&mut Tensor, &Tensor) -> Result<()>,
) -> Result<()> {
    for &child in children {
        comm.recv_tensor(child, scratch)?;
        reduce(&mut mine, scratch)?;
    }
    if let Some(parent) = parent {
        comm.send_tensor(parent, &mine)?;
        comm.recv_tensor(parent, &mut mine)?;
    }
    for &child in children {
        comm.send_tensor(child, &mine)?;
    }
    Ok(())
}

/// Moves `root`'s tensor to every rank of `plan`'s tree: up the path from `root` to rank 0 (the
/// ranks on it hold the data after this phase), then down from each rank to its children off
/// that path (TALG-2). `mine` is the data on `root` and is overwritten everywhere else.
pub fn broadcast(
    comm: &Communicator<'_>,
    plan: &Plan,
    root: usize,
    mut mine: Tensor,
) -> Result<()> {
    let me = comm.rank();
    // The ranks whose subtree holds `root`: root, its parent, ..., rank 0.
    let mut on_path = vec![false; plan.world()];
    let mut r = Some(root);
    while let Some(x) = r {
        on_path[x] = true;
        r = plan.parent[x];
    }
    let children = &plan.children[me];
    if on_path[me] {
        if me != root
            && let Some(&c) = children.iter().find(|c| on_path[**c])
        {
            comm.recv_tensor(c, &mut mine)?;
        }
        if let Some(parent) = plan.parent[me] {
            comm.send_tensor(parent, &mine)?;
        }
    } else if let Some(parent) = plan.parent[me] {
        comm.recv_tensor(parent, &mut mine)?;
    }
    for &c in children.iter().filter(|c| !on_path[**c]) {
        comm.send_tensor(c, &mine)?;
    }
    Ok(())
}

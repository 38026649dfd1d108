//! Fusion of many tensors into few pipelines: the tensors of one call (a model's gradients, the
//! leaves of a nested value) are grouped by dtype and device in first-appearance order, and each
//! group runs as one collective over one contiguous buffer: the tensor's own memory when the
//! group is a single contiguous tensor, else a fused copy (host memory, or device memory for
//! CUDA tensors) that is written back afterwards. Rust users and the Python bindings share it
//! (the bindings only flatten Python structures into the tensor list).
//!
//! Invariants:
//! - FUSE-1: every rank that passes tensors of the same dtypes, devices and sizes in the same
//!   order runs the same collectives in the same order (one per group, groups in order of first
//!   appearance), so the ranks stay in step; a call without tensors still takes part in one
//!   empty collective of dtype `empty`.
//! - FUSE-2: a fused buffer is laid out as the group's tensors back to back, in list order, and
//!   each tensor gets back exactly its own bytes.

use crate::Tree;
use crate::ops::Op;
use crate::tree::DeviceReduce;
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::runtime::Deadline;
use parallel_engine::value::{DType, Device, Tensor};
use parallel_engine::{Error, ErrorKind, Result};

/// A collective on one group of CUDA memory: `(dtype, device, pointer, bytes)`.
pub type OnDevice<'a> = &'a mut dyn FnMut(DType, i32, u64, usize) -> Result<()>;

/// The tensors of one call, grouped for the collectives (FUSE-1).
#[derive(Debug)]
pub struct Leaves {
    tensors: Vec<Tensor>,
    /// The dtype of the empty collective a call without tensors still takes part in.
    empty: DType,
}

/// A contiguous CPU tensor's elements, as bytes.
fn tensor_bytes(t: &mut Tensor) -> &mut [u8] {
    let n = t.nbytes();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: a contiguous tensor's n bytes from its data pointer are its elements, kept alive
    // by the tensor's storage (borrowed mutably for the slice's lifetime).
    unsafe { std::slice::from_raw_parts_mut(t.data_mut_ptr(), n) }
}

impl Leaves {
    /// The tensors of one call; `empty`: the dtype of the empty collective taken when there are
    /// none (one the op accepts).
    pub fn new(tensors: Vec<Tensor>, empty: DType) -> Leaves {
        Leaves { tensors, empty }
    }

    /// No tensors (a placeholder).
    pub fn none() -> Leaves {
        Leaves::new(Vec::new(), DType::F32)
    }

    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }

    /// (dtype, device) groups in first-appearance order, each a list of leaf indices.
    pub fn groups(&self) -> Vec<(DType, Device, Vec<usize>)> {
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
    pub fn each_group(
        &mut self,
        mut f: impl FnMut(DType, &mut [u8]) -> Result<()>,
        mut fdev: Option<OnDevice<'_>>,
    ) -> Result<()> {
        // One contiguous CPU tensor (the common call): its own memory, without grouping.
        if let [t] = &mut self.tensors[..]
            && t.device() == Device::Cpu
            && t.is_contiguous()
        {
            return f(t.dtype(), tensor_bytes(t));
        }
        let groups = self.groups();
        if groups.is_empty() {
            return f(self.empty, &mut []);
        }
        for (dtype, device, idx) in groups {
            if let Device::Cuda(dev) = device {
                self.cuda_group(dtype, dev, &idx, &mut f, &mut fdev)?;
                continue;
            }
            if idx.len() == 1 && self.tensors[idx[0]].is_contiguous() {
                f(dtype, tensor_bytes(&mut self.tensors[idx[0]]))?;
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
        f: &mut impl FnMut(DType, &mut [u8]) -> Result<()>,
        fdev: &mut Option<OnDevice<'_>>,
    ) -> Result<()> {
        // The copies below take `nbytes` from each tensor's data pointer: only a contiguous
        // tensor's bytes are its elements (a view's are not, and may run past its storage).
        if let Some(i) = idx.iter().find(|i| !self.tensors[**i].is_contiguous()) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "collective",
                format!(
                    "CUDA tensor {i} of the call is not contiguous: pass a contiguous copy and \
                     copy the result back"
                ),
            ));
        }
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
        let gather_scatter = |buf: Mem, back: bool| -> Result<()> {
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
                // `total` bytes; the tensors stay alive (their storage) until the sync below.
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

impl Tree {
    /// All-reduce of every group of `leaves` in place (FUSE-1): CPU groups through the host
    /// path, CUDA groups through the GPU path (reductions on the device; a user op needs `user`).
    pub fn all_reduce_many(
        &self,
        leaves: &mut Leaves,
        op: &Op,
        user: Option<&DeviceReduce>,
    ) -> Result<()> {
        let mut on_device = |dt: DType, dev: i32, ptr: u64, len: usize| {
            // SAFETY: `ptr` is a contiguous CUDA tensor (or our fused buffer) of `len` bytes on
            // `dev`, kept alive by its storage and used by nothing else during the call.
            unsafe { self.all_reduce_cuda(dt, dev, ptr, len, op, user) }.map(|_| ())
        };
        leaves.each_group(
            |dt, b| self.all_reduce(dt, b, op).map(|_| ()),
            Some(&mut on_device),
        )
    }

    /// Broadcast of every group of `leaves` from `root` (FUSE-1).
    pub fn broadcast_many(&self, leaves: &mut Leaves, root: usize) -> Result<()> {
        let mut on_device = |dt: DType, dev: i32, ptr: u64, len: usize| {
            // SAFETY: as in all_reduce_many.
            unsafe { self.broadcast_cuda(dt, dev, ptr, len, root) }
        };
        leaves.each_group(|dt, b| self.broadcast(dt, b, root), Some(&mut on_device))
    }

    /// Reduce of every group of `leaves` to `root` (FUSE-1): only `root`'s tensors change.
    pub fn reduce_many(
        &self,
        leaves: &mut Leaves,
        op: &Op,
        user: Option<&DeviceReduce>,
        root: usize,
    ) -> Result<()> {
        let mut on_device = |dt: DType, dev: i32, ptr: u64, len: usize| {
            // SAFETY: as in all_reduce_many.
            unsafe { self.reduce_cuda(dt, dev, ptr, len, op, user, root) }.map(|_| ())
        };
        leaves.each_group(
            |dt, b| self.reduce(dt, b, op, root).map(|_| ()),
            Some(&mut on_device),
        )
    }
}

#[cfg(test)]
mod tests;

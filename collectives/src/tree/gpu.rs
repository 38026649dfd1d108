//! The Tree's GPU path: all-reduce of CUDA tensors with reductions on the device.
//!
//! After the usual control pass (which checks that every rank called the same collective on the
//! same kind of memory, TREE-2), a large all-reduce runs the pipelined ring with device memory
//! ([`ring`]: the same ring as host memory, chosen on the same terms). Otherwise (small
//! all-reduces, reduce, broadcast) the data go up the tree and come back down as whole CUDA tensors
//! over the tree's links: between processes of one host by CUDA IPC (the parent copies the
//! child's tensor device to device, then reduces it into its own with an NVRTC-compiled kernel),
//! across hosts staged through pinned host memory (the links' pipeline). Ranks that called
//! `done()` take part with the op's identity in host memory (uneven endings, TREE-4).
//!
//! Invariants:
//! - GPU-1: contributions are applied in the same order as on the CPU path (own, then children
//!   in rank order), and every rank receives the root's bytes: the result is bitwise the same on
//!   every rank.
//! - GPU-2: when `all_reduce_cuda` returns, the result is complete in the caller's memory (our
//!   stream is synchronized, CUDA-2); the caller's producer stream was ordered before our work
//!   by the caller (DLPack's stream argument in the bindings).

use super::{Kind, Meta, Tree};
use crate::algorithms;
use crate::cuda_ops;
use crate::ops::{self, Op};
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::value::{DType, Device, Tensor};
use parallel_engine::{Error, ErrorKind, Result};
use std::sync::Arc;

mod ring;

/// A user reduce function on device memory: `f(dst, src, dtype, elements, device)` must leave
/// `dst = dst op src` and be complete on the device when it returns.
pub type DeviceReduce = Arc<dyn Fn(u64, u64, DType, usize, i32) -> Result<()> + Send + Sync>;

/// A tensor header over memory the caller keeps alive for the duration of one send or receive.
fn alias(dtype: DType, n: usize, device: Device, ptr: *mut u8, len: usize) -> Tensor {
    // SAFETY: used only for one synchronous send/receive while the memory is alive (callers).
    unsafe { Tensor::from_raw(dtype, vec![n], None, device, ptr, len, Arc::new(())) }
}

impl Tree {
    /// All-reduce of `len` bytes of CUDA memory at `ptr` on device `dev`, in place; returns how
    /// many ranks contributed. `user` applies a user op on the device (needed for `Op::User`).
    ///
    /// # Safety
    /// `ptr` is device memory on `dev` of `len` bytes (whole elements of `dtype`), valid and not
    /// used by anything else until this returns (GPU-2).
    pub unsafe fn all_reduce_cuda(
        &self,
        dtype: DType,
        dev: i32,
        ptr: u64,
        len: usize,
        op: &Op,
        user: Option<&DeviceReduce>,
    ) -> Result<usize> {
        // SAFETY: the caller's contract.
        unsafe { self.reduce_on_device(Kind::AllReduce, dtype, dev, ptr, len, op, user, 0) }
    }

    /// All-reduce of one tensor in place, CPU or CUDA (a safe front for Rust users: the tensor's
    /// storage keeps its memory alive); returns how many ranks contributed. A CUDA tensor must be
    /// contiguous; a user op on CUDA memory needs `user`.
    pub fn all_reduce_tensor(
        &self,
        t: &mut Tensor,
        op: &Op,
        user: Option<&DeviceReduce>,
    ) -> Result<usize> {
        if !t.is_contiguous() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "all_reduce",
                "a non-contiguous tensor: reduce a contiguous copy and copy it back",
            ));
        }
        let len = t.nbytes();
        match t.device() {
            Device::Cuda(dev) => {
                let ptr = t.data_mut_ptr() as u64;
                // SAFETY: `t` is a contiguous CUDA tensor of `len` bytes, exclusively borrowed
                // (nothing else uses it during the call) and kept alive by its storage.
                unsafe { self.all_reduce_cuda(t.dtype(), dev, ptr, len, op, user) }
            }
            Device::Cpu => {
                let dtype = t.dtype();
                let bytes: &mut [u8] = if len == 0 {
                    &mut []
                } else {
                    // SAFETY: a contiguous CPU tensor's `len` bytes from its data pointer are
                    // its elements, exclusively borrowed.
                    unsafe { std::slice::from_raw_parts_mut(t.data_mut_ptr(), len) }
                };
                self.all_reduce(dtype, bytes, op)
            }
        }
    }

    /// Reduce of CUDA memory to `root`: only `root`'s tensor receives the result (the others
    /// keep theirs); returns how many ranks contributed. Reductions on the device, as
    /// [`Tree::all_reduce_cuda`] (whose path it takes on a copy).
    ///
    /// # Safety
    /// As [`Tree::all_reduce_cuda`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn reduce_cuda(
        &self,
        dtype: DType,
        dev: i32,
        ptr: u64,
        len: usize,
        op: &Op,
        user: Option<&DeviceReduce>,
        root: usize,
    ) -> Result<usize> {
        self.check_root(root)?;
        // SAFETY: the caller's contract.
        unsafe { self.reduce_on_device(Kind::Reduce, dtype, dev, ptr, len, op, user, root) }
    }

    /// The GPU path of all-reduce (in place) and reduce (into a copy; the root keeps the result).
    ///
    /// # Safety
    /// As [`Tree::all_reduce_cuda`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn reduce_on_device(
        &self,
        kind: Kind,
        dtype: DType,
        dev: i32,
        ptr: u64,
        len: usize,
        op: &Op,
        user: Option<&DeviceReduce>,
        root: usize,
    ) -> Result<usize> {
        let what = kind.name();
        op.check(dtype)?;
        let g = cuda::require(what)?;
        if !self.active() {
            return Err(Error::new(
                ErrorKind::Config,
                what,
                "this rank called done(): it has no more data to reduce",
            ));
        }
        if matches!(op, Op::User(_)) && user.is_none() {
            return Err(Error::new(
                ErrorKind::Unsupported,
                what,
                "a user op on CUDA tensors needs its device form (all_reduce_cuda's `user`)",
            ));
        }
        let count = len / dtype.itemsize();
        let meta = Meta {
            root,
            gpu: true,
            ..Meta::new(
                kind,
                op.name(),
                Some(dtype),
                count,
                self.gpu_algorithm(kind, len),
            )
        };
        self.run(|| {
            let v = self.pass(Some(&meta), Some(op), None, false, true)?;
            if self.gpu_ring(&meta, v.contributors) {
                // SAFETY: the caller's contract.
                return unsafe {
                    self.ring_on_device(&meta, dev, ptr, len, op, user, v.contributors)
                };
            }
            let deadline = self.deadline();
            let mut scratch = self.scratch(dev, len)?;
            // Reduce works on a copy (only the root's tensor changes), and so does a user
            // function (one that fails on any rank changes no tensor, TREE-6).
            let copy = match (kind, op) {
                (Kind::Reduce, _) | (_, Op::User(_)) => Some(DeviceAlloc::new(dev, len)?),
                _ => None,
            };
            let work = copy.as_ref().map_or(ptr, |c| c.ptr);
            let mut failed: Option<Error> = None;
            let r = (|| {
                if let Some(c) = &copy {
                    // SAFETY: our fresh allocation and the caller's tensor, `len` bytes each.
                    unsafe { g.copy(dev, Mem::Dev(c.ptr), Mem::Dev(ptr), len)? };
                }
                let mine = alias(dtype, count, Device::Cuda(dev), work as *mut u8, len);
                let mut tmp = alias(dtype, count, Device::Cuda(dev), scratch.ptr as *mut u8, len);
                let comm = self.comm(deadline);
                let (parent, children) =
                    (self.plan.parent[self.rank], &self.plan.children[self.rank]);
                algorithms::tree::all_reduce(
                    &comm,
                    parent,
                    children,
                    mine,
                    &mut tmp,
                    |_, _| match (op, user) {
                        // A failing user function is recorded, not returned: the data keeps moving
                        // and the status round below fails every rank together (TREE-6).
                        (Op::User(_), Some(f)) => {
                            g.sync(dev, deadline)?;
                            if failed.is_none()
                                && let Err(e) = f(work, scratch.ptr, dtype, count, dev)
                            {
                                failed = Some(e);
                            }
                            Ok(())
                        }
                        // SAFETY: our working tensor and scratch, `count` elements each on `dev`,
                        // both untouched until the stream is synchronized below.
                        _ => unsafe {
                            cuda_ops::reduce_device(op, dtype, work, scratch.ptr, count, dev)
                        },
                    },
                )?;
                if matches!(op, Op::Avg) {
                    // SAFETY: as above.
                    unsafe { cuda_ops::divide_device(dtype, work, count, v.contributors, dev)? };
                }
                g.sync(dev, deadline)
            })();
            if r.is_err() {
                // Nothing of ours may still write the caller's tensor or the scratch we keep.
                g.drain(dev);
            }
            self.keep_scratch(&mut scratch);
            r?;
            if matches!(op, Op::User(_)) {
                self.settle(Some(&meta), failed)?;
            }
            if copy.is_some() && (kind == Kind::AllReduce || self.rank == root) {
                // SAFETY: the caller's tensor and our copy, `len` bytes each; synchronized here.
                let r = unsafe { g.copy(dev, Mem::Dev(ptr), Mem::Dev(work), len) }
                    .and_then(|_| g.sync(dev, deadline));
                if r.is_err() {
                    g.drain(dev);
                }
                r?;
            }
            if kind == Kind::AllReduce {
                self.ran(algorithms::Algorithm::Tree);
            }
            Ok(v.contributors)
        })
    }

    /// A finished rank's part in a CUDA all-reduce: the op's identity, in host memory (links
    /// stage between host and device as needed).
    pub(super) fn serve_gpu_all_reduce(
        &self,
        m: &Meta,
        op: Option<&Op>,
        contributors: usize,
    ) -> Result<()> {
        if self.gpu_ring(m, contributors) {
            return self.serve_gpu_ring(m, contributors);
        }
        let dtype = m.dtype.ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "done",
                "a CUDA all-reduce without dtype",
            )
        })?;
        let op = match m.reducing_op(op) {
            Some(op) => op,
            None if self.plan.children[self.rank].is_empty() => Op::Sum,
            None => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "done",
                    "the others reduce with a user function: pass it to done(op) so this rank can combine its children's data",
                ));
            }
        };
        let len = m.count * dtype.itemsize();
        let mut buf = vec![0u8; len];
        ops::identity(&op, dtype, &mut buf);
        let mut tmp = vec![0u8; len];
        let mine = alias(dtype, m.count, Device::Cpu, buf.as_mut_ptr(), len);
        let mut scratch = alias(dtype, m.count, Device::Cpu, tmp.as_mut_ptr(), len);
        let (bp, tp) = (buf.as_mut_ptr(), tmp.as_ptr());
        let (guarded, failed) = super::guard(&op);
        let comm = self.comm(self.deadline());
        let (parent, children) = (self.plan.parent[self.rank], &self.plan.children[self.rank]);
        algorithms::tree::all_reduce(&comm, parent, children, mine, &mut scratch, |_, _| {
            // SAFETY: both buffers hold `len` bytes and live until the end of this function.
            let (d, s) = unsafe {
                (
                    std::slice::from_raw_parts_mut(bp, len),
                    std::slice::from_raw_parts(tp, len),
                )
            };
            ops::reduce_into(&guarded, dtype, d, s)
        })?;
        // The others ran a user function: the status round of TREE-6.
        if Op::parse(&m.op).is_err() {
            self.settle(None, super::take(&failed))?;
        }
        Ok(())
    }

    /// Broadcast of `len` bytes of CUDA memory at `ptr` on device `dev` from rank `root`, in
    /// place: from `root` up the tree to rank 0 along the one path that leads there, then down to
    /// every other rank, whole tensors over the tree's links (CUDA IPC inside a host).
    ///
    /// # Safety
    /// As [`Tree::all_reduce_cuda`].
    pub unsafe fn broadcast_cuda(
        &self,
        dtype: DType,
        dev: i32,
        ptr: u64,
        len: usize,
        root: usize,
    ) -> Result<()> {
        self.check_root(root)?;
        let g = cuda::require("broadcast")?;
        let count = len / dtype.itemsize();
        let meta = Meta {
            root,
            gpu: true,
            ..Meta::new(
                Kind::Broadcast,
                "copy",
                Some(dtype),
                count,
                crate::algorithms::Algorithm::Tree,
            )
        };
        self.run(|| {
            self.pass(Some(&meta), None, None, false, self.rank == root)?;
            let deadline = self.deadline();
            let mine = alias(dtype, count, Device::Cuda(dev), ptr as *mut u8, len);
            let comm = self.comm(deadline);
            let r = algorithms::tree::broadcast(&comm, &self.plan, root, mine)
                .and_then(|_| g.sync(dev, deadline));
            if r.is_err() {
                g.drain(dev);
            }
            r
        })
    }

    /// A finished rank's part in a CUDA broadcast: it relays the data through host memory.
    pub(super) fn serve_gpu_broadcast(&self, m: &Meta) -> Result<()> {
        let dtype = m.dtype.ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "done",
                "a CUDA broadcast without dtype",
            )
        })?;
        let len = m.count * dtype.itemsize();
        let mut buf = vec![0u8; len];
        let mine = alias(dtype, m.count, Device::Cpu, buf.as_mut_ptr(), len);
        algorithms::tree::broadcast(&self.comm(self.deadline()), &self.plan, m.root, mine)
    }

    /// A device buffer of at least `len` bytes on `dev` (the tree keeps the last one).
    fn scratch(&self, dev: i32, len: usize) -> Result<DeviceAlloc> {
        let mut s = self.gpu_scratch.lock().unwrap_or_else(|p| p.into_inner());
        match s.take() {
            Some(a) if a.dev == dev && a.len >= len => Ok(a),
            _ => DeviceAlloc::new(dev, len),
        }
    }

    fn keep_scratch(&self, a: &mut DeviceAlloc) {
        let taken = std::mem::replace(
            a,
            DeviceAlloc {
                ptr: 0,
                len: 0,
                dev: a.dev,
                owner: None,
            },
        );
        *self.gpu_scratch.lock().unwrap_or_else(|p| p.into_inner()) = Some(taken);
    }
}

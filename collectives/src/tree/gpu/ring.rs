//! The ring for CUDA all-reduces: the one ring algorithm ([`ring::all_reduce_in`]) over device
//! memory. What differs from host memory is only the [`Memory`] given to it: chunks are
//! combined by the NVRTC device kernels ([`cuda_ops::reduce_device`]) or the user's device
//! function, and move over the links as device memory (CUDA IPC inside a host, each chunk
//! copied device to device by the receiver; staged through pinned host memory across hosts or
//! without IPC, as the links do for every CUDA tensor).
//!
//! Invariants:
//! - GRING-1: every device range the ring touches is checked against the buffer (and the
//!   scratch) before an address is formed from it; an address is never computed by unchecked
//!   arithmetic.
//! - GRING-2: all our device work runs on the engine's stream of the device (CUDA-2), in the
//!   order it is issued: the kernel that reduces a chunk is queued before the send of that chunk
//!   starts (the sender's copy or IPC event is queued after it), and a chunk received into the
//!   scratch is reduced before the next receive into the scratch is queued. A user function runs
//!   on its own stream: our stream is synchronized before each call, and the function is
//!   complete on the device when it returns (the bindings synchronize it).
//! - GRING-3: a user function works on a copy of the tensor, which replaces the tensor only
//!   after the status round found no rank's function failed (TREE-6): a failure leaves every
//!   rank's tensor as it was.
//! - GRING-4: when the ring fails, our stream is drained before the scratch is kept for reuse or
//!   the call returns, so no copy or kernel of ours still writes memory the caller reuses.

use super::{DeviceReduce, Kind, Meta, Tree, alias};
use crate::algorithms::ring::{self, Chunking, Host, Memory, too_long};
use crate::algorithms::{Algorithm, Communicator, SendScope};
use crate::cuda_ops;
use crate::ops::{self, Op};
use parallel_engine::cuda::{self, DeviceAlloc, Gpu, Mem};
use parallel_engine::endpoint::Conn;
use parallel_engine::runtime::Deadline;
use parallel_engine::value::{DType, Device, Value};
use parallel_engine::{Error, ErrorKind, Result};
use std::ops::Range;
use std::sync::Arc;

/// Device memory for the ring: the buffer (`len` bytes at `ptr` on `dev`), the scratch a chunk
/// is received into before it is reduced, and the op (a built-in kernel or the user's device
/// function, whose first failure is recorded for the status round).
struct DeviceRing<'a> {
    g: &'static dyn Gpu,
    dev: i32,
    ptr: u64,
    len: usize,
    dtype: DType,
    op: &'a Op,
    user: Option<&'a DeviceReduce>,
    scratch: DeviceAlloc,
    failed: Option<Error>,
    deadline: Deadline,
}

impl DeviceRing<'_> {
    /// The device address of byte `r.start`, once `r` is checked to lie in the buffer (GRING-1).
    fn at(&self, r: &Range<usize>) -> Result<u64> {
        if r.start > r.end || r.end > self.len {
            return Err(Error::new(
                ErrorKind::Protocol,
                "all_reduce",
                format!(
                    "ring range {r:?} outside the {}-byte CUDA buffer (a bug: please report it)",
                    self.len
                ),
            ));
        }
        self.ptr.checked_add(r.start as u64).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "all_reduce",
                format!("device address {:#x} + {} overflows", self.ptr, r.start),
            )
        })
    }

    /// A byte tensor over `n` bytes of device memory at `at` (for one send or receive while the
    /// memory is alive: the ring's contract).
    fn bytes(&self, at: u64, n: usize) -> parallel_engine::value::Tensor {
        alias(DType::U8, n, Device::Cuda(self.dev), at as *mut u8, n)
    }
}

impl Memory for DeviceRing<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn dtype(&self) -> DType {
        self.dtype
    }

    fn prepare(&mut self, chunk: usize) -> Result<()> {
        if self.scratch.len < chunk || self.scratch.dev != self.dev {
            // Nothing of ours is queued yet: the old scratch may go.
            self.scratch = DeviceAlloc::new(self.dev, chunk)?;
        }
        Ok(())
    }

    unsafe fn send(
        &self,
        sends: &mut SendScope<'_>,
        to: &Arc<Conn>,
        r: Range<usize>,
    ) -> Result<()> {
        let v = Value::Tensor(self.bytes(self.at(&r)?, r.len()));
        // SAFETY: `r` lies in the buffer (checked), which the caller of the ring keeps alive
        // until it returns (all_reduce_cuda's contract), and the ring writes none of it until
        // the scope ended (its contract). The chunk's producing kernel is queued on our stream
        // before this send queues its copy or records its IPC event (GRING-2).
        unsafe { sends.send_value(to, v) };
        Ok(())
    }

    unsafe fn recv(
        &mut self,
        comm: &Communicator<'_>,
        from: usize,
        r: Range<usize>,
        reduce: bool,
    ) -> Result<()> {
        let n = r.len();
        let at = self.at(&r)?;
        if !reduce {
            // The link copies into the device (IPC device to device, or from pinned staging)
            // and synchronizes our stream before it returns.
            return comm.recv_tensor(from, &mut self.bytes(at, n));
        }
        if n > self.scratch.len {
            return Err(too_long(n, self.scratch.len));
        }
        let src = self.scratch.ptr;
        comm.recv_tensor(from, &mut self.bytes(src, n))?;
        let count = n / self.dtype.itemsize();
        if count == 0 {
            // Nothing to combine (a user function never sees an empty chunk, as on the host).
            return Ok(());
        }
        match (self.op, self.user) {
            // A failing user function is recorded, not returned: the data keep moving and the
            // status round fails every rank together (TREE-6).
            (Op::User(_), Some(f)) => {
                self.g.sync(self.dev, self.deadline)?;
                if self.failed.is_none()
                    && let Err(e) = f(at, src, self.dtype, count, self.dev)
                {
                    self.failed = Some(e);
                }
                Ok(())
            }
            (Op::User(_), None) => Err(Error::new(
                ErrorKind::Unsupported,
                "all_reduce",
                "a user op on CUDA tensors needs its device form (all_reduce_cuda's `user`)",
            )),
            // SAFETY: `at` and the scratch hold `n` bytes each on `dev` (checked), distinct
            // buffers, and nothing else touches them before our stream is synchronized (the
            // next receive and send of them are queued on the same stream, GRING-2).
            _ => unsafe { cuda_ops::reduce_device(self.op, self.dtype, at, src, count, self.dev) },
        }
    }

    fn finish(&mut self, r: Range<usize>, contributors: usize) -> Result<()> {
        if !matches!(self.op, Op::Avg) {
            return Ok(());
        }
        let at = self.at(&r)?;
        let count = r.len() / self.dtype.itemsize();
        // SAFETY: `r` lies in the buffer (checked); no send of it is in flight (the ring calls
        // this between steps), and the sends that follow are queued after it on our stream.
        unsafe { cuda_ops::divide_device(self.dtype, at, count, contributors, self.dev) }
    }
}

impl Tree {
    /// The algorithm a CUDA collective of `kind` over `nbytes` names in its meta: an all-reduce
    /// takes the ring on the same terms as host memory ([`crate::algorithms::choose`]); where
    /// host memory would go hierarchical, device memory takes the flat ring over every rank
    /// (the hierarchical algorithm is host memory only). Other kinds take the tree.
    pub(in crate::tree) fn gpu_algorithm(&self, kind: Kind, nbytes: usize) -> Algorithm {
        // Device memory never takes the host's flat region: the choice by size and topology.
        match (
            kind,
            crate::algorithms::choose(&self.plan, &self.tuning, nbytes),
        ) {
            (Kind::AllReduce, Algorithm::Ring | Algorithm::Hierarchical) => Algorithm::Ring,
            _ => Algorithm::Tree,
        }
    }

    /// Whether a CUDA all-reduce described by `m`, whose pass counted `contributors`, moves its
    /// data by the ring (else the tree): the meta's algorithm, except that a user function
    /// needs every rank to contribute (a finished rank has no identity element to give it), as
    /// on the host path. Contributing and finished ranks decide alike from the same verdict.
    pub(in crate::tree) fn gpu_ring(&self, m: &Meta, contributors: usize) -> bool {
        let user = Op::parse(&m.op).is_err();
        m.kind == Kind::AllReduce
            && m.algo != Algorithm::Tree
            && (!user || contributors == self.world_size())
    }

    /// The data phase of a CUDA all-reduce by the ring, after the control pass; returns
    /// `contributors`.
    ///
    /// # Safety
    /// As [`Tree::all_reduce_cuda`].
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn ring_on_device(
        &self,
        meta: &Meta,
        dev: i32,
        ptr: u64,
        len: usize,
        op: &Op,
        user: Option<&DeviceReduce>,
        contributors: usize,
    ) -> Result<usize> {
        let g = cuda::require("all_reduce")?;
        let deadline = self.deadline();
        let dtype = meta.dtype.unwrap_or(DType::U8);
        let user_op = matches!(op, Op::User(_));
        // GRING-3: a user function reduces a copy.
        let copy = match user_op {
            true => Some(DeviceAlloc::new(dev, len)?),
            false => None,
        };
        let mut mem = DeviceRing {
            g,
            dev,
            ptr: copy.as_ref().map_or(ptr, |c| c.ptr),
            len,
            dtype,
            op,
            user,
            scratch: self.scratch(dev, 0)?,
            failed: None,
            deadline,
        };
        let r = (|| {
            if let Some(c) = &copy {
                // SAFETY: our fresh allocation and the caller's tensor, `len` bytes each.
                unsafe { g.copy(dev, Mem::Dev(c.ptr), Mem::Dev(ptr), len)? };
            }
            let comm = self.comm(deadline);
            let chunking = Chunking::Device(self.tuning.device_chunk);
            ring::all_reduce_in(&comm, &self.plan.ring, &mut mem, chunking, contributors)?;
            g.sync(dev, deadline)
        })();
        if r.is_err() {
            g.drain(dev); // GRING-4
        }
        self.keep_scratch(&mut mem.scratch);
        r?;
        if let Some(c) = &copy {
            self.settle(Some(meta), mem.failed.take())?;
            // SAFETY: the caller's tensor and our copy, `len` bytes each; synchronized below.
            let r = unsafe { g.copy(dev, Mem::Dev(ptr), Mem::Dev(c.ptr), len) }
                .and_then(|_| g.sync(dev, deadline));
            if r.is_err() {
                g.drain(dev);
            }
            r?;
        }
        self.ran(Algorithm::Ring);
        Ok(contributors)
    }

    /// A finished rank's part in a CUDA all-reduce by the ring: the op's identity in host
    /// memory, through the same ring (the links move bytes between its host memory and the
    /// others' device memory).
    pub(super) fn serve_gpu_ring(&self, m: &Meta, contributors: usize) -> Result<()> {
        let (Some(dtype), Ok(op)) = (m.dtype, Op::parse(&m.op)) else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "done",
                format!("a CUDA all-reduce by the ring without a dtype or built-in op: {m:?}"),
            ));
        };
        let mut buf = vec![0u8; m.count * dtype.itemsize()];
        ops::identity(&op, dtype, &mut buf);
        let comm = self.comm(self.deadline());
        let mut mem = Host::new(&mut buf, dtype, &op);
        // Cut like the others' device memory: each chunk is one message.
        let chunking = Chunking::Device(self.tuning.device_chunk);
        ring::all_reduce_in(&comm, &self.plan.ring, &mut mem, chunking, contributors)
    }
}

//! The CUDA link kind: CUDA tensors between two processes of one host by CUDA IPC (the receiver
//! maps the sender's allocation and copies device to device), riding a shared-memory link whose
//! two ends both offered it (HS-3); small messages, and links without IPC, stage through pinned
//! host memory (CUDA-4). The sender's memory stays valid until the receiver's acknowledgement
//! (SHM-7 gates the frame).

use super::kinds::{Cost, End, Kind, Policy};
use super::outs::out_contiguous_slice;
use super::{Link, LinkKind, RecvGuard};
use crate::buffer::Buf;
use crate::config::config;
use crate::cuda;
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::Deadline;
use crate::value::{Device, Tensor};
use crate::wire;
use std::sync::atomic::{AtomicBool, Ordering};

/// The CUDA IPC kind: viable where shared memory is, between two ends that both see a GPU, when
/// allowed (KIND-3). Its latency (opening the peer's mapping, an event round trip) exceeds the
/// ring's, so small messages stay on the ring, as `PARALLEL_CUDA_IPC_THRESHOLD` does per send.
#[derive(Debug, Clone, Copy)]
pub struct CudaIpc;

impl Kind for CudaIpc {
    fn id(&self) -> LinkKind {
        LinkKind::CudaIpc
    }
    fn probe(&self, a: &End<'_>, b: &End<'_>, policy: &Policy) -> Option<Cost> {
        let ring = super::shm::Shm.probe(a, b, policy)?;
        (policy.cuda_ipc && a.gpus && b.gpus).then_some(Cost {
            latency: ring.latency + std::time::Duration::from_micros(50),
            // Device to device, no host copy: far above the ring's host-memory bandwidth.
            bytes_per_sec: 1e11,
        })
    }
}

/// One record per device segment of a frame, with the event its receiver waits on.
pub(super) type IpcExport = Vec<(cuda::IpcRecord, Option<cuda::Event>)>;

impl Link {
    /// Staged send of device memory (CUDA-4): the device-to-host copy of chunk k+1.. overlaps
    /// the send of chunk k; `PARALLEL_CUDA_STAGING` pinned buffers of `PARALLEL_CUDA_CHUNK` bytes.
    pub(super) fn send_device(
        &self,
        ptr: u64,
        len: usize,
        dev: i32,
        deadline: Deadline,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cuda::Stage {
            g,
            chunk,
            nchunks,
            bufs,
        } = cuda::Stage::plan("send", len, true)?;
        let nb = bufs.len();
        let mut events: std::collections::VecDeque<cuda::Event> = Default::default();
        let n_of = |k: usize| chunk.min(len - k * chunk);
        let issue = |k: usize, events: &mut std::collections::VecDeque<cuda::Event>| {
            // SAFETY: the chunk lies inside the sender's tensor (kept alive by the caller until
            // send returns) and inside staging buffer k % nb (ours; the buffer's previous chunk
            // was written out before it is reused).
            unsafe {
                g.copy(
                    dev,
                    cuda::Mem::Host(bufs[k % nb].0),
                    cuda::Mem::Dev(ptr + (k * chunk) as u64),
                    n_of(k),
                )?
            };
            events.push_back(g.record(dev, false)?);
            Ok::<(), Error>(())
        };
        let r = (|| {
            for k in 0..nb {
                issue(k, &mut events)?;
            }
            for k in 0..nchunks {
                let ev = events.pop_front().expect("one event per issued chunk");
                g.wait_event(ev, deadline)?;
                // SAFETY: the copy into this buffer completed (its event); n_of(k) <= chunk.
                let b = unsafe { std::slice::from_raw_parts(bufs[k % nb].0, n_of(k)) };
                self.write_bytes(&[b], deadline, "a CUDA tensor")?;
                if k + nb < nchunks {
                    issue(k + nb, &mut events)?;
                }
            }
            Ok(())
        })();
        if r.is_err() {
            // Copies still in flight must not land in buffers a later transfer reuses.
            for ev in events.drain(..) {
                g.release_event(ev);
            }
            g.drain(dev);
        }
        r
    }

    /// CUDA IPC export of a frame's device segments (HS-3): one record (and the event the
    /// receiver waits on) per device segment, or `None` when the frame is staged instead.
    pub(super) fn export_ipc(&self, segs: &[wire::OutSeg<'_>]) -> Result<Option<IpcExport>> {
        let has_dev = segs.iter().any(wire::OutSeg::is_device);
        // CUDA IPC: export every device segment first; if any cannot be exported (memory from a
        // pool allocator, say), the whole frame is staged instead.
        // Small messages are staged: no mapping to open, and `send` need not wait for the peer.
        let dev_bytes: u64 = segs
            .iter()
            .filter(|g| g.is_device())
            .map(|g| g.len() as u64)
            .sum();
        if !(has_dev && self.cuda_ipc && dev_bytes >= config().cuda_ipc_threshold) {
            return Ok(None);
        }
        {
            let g = cuda::require("send").map_err(|e| self.err(e))?;
            let mut recs = Vec::new();
            let mut ok = true;
            for seg in segs {
                match seg {
                    // Nothing to map: an empty record.
                    wire::OutSeg::Device { len: 0, .. } => recs.push((
                        cuda::IpcRecord {
                            mem: [0; 64],
                            event: [0; 64],
                            offset: 0,
                            len: 0,
                        },
                        None,
                    )),
                    wire::OutSeg::Device { ptr, len, dev } => {
                        match g.ipc_export(*dev, *ptr, *len) {
                            Ok((r, ev)) => recs.push((r, Some(ev))),
                            Err(e) => {
                                // Said once at info (PARALLEL_LOG=info), then at debug.
                                static SAID: AtomicBool = AtomicBool::new(false);
                                if SAID.swap(true, Ordering::Relaxed) {
                                    tracing::debug!(
                                        "CUDA IPC export failed ({e}); staging this message"
                                    );
                                } else {
                                    tracing::info!(
                                        peer = %self.peer,
                                        "CUDA IPC export failed ({e}); staging through pinned host memory instead (said once)"
                                    );
                                }
                                ok = false;
                                break;
                            }
                        }
                    }
                    _ => {}
                }
            }
            if ok {
                return Ok(Some(recs));
            }
            for ev in recs.into_iter().filter_map(|r| r.1) {
                g.release_event(ev);
            }
            Ok(None)
        }
    }
}

impl RecvGuard<'_> {
    /// Receives the next segment into tensor `t` (CPU or CUDA, contiguous or strided CPU).
    pub(super) fn fill_tensor(
        &mut self,
        t: &mut Tensor,
        len: usize,
        via_cma: bool,
        via_ipc: bool,
        src_dev: Option<i32>,
        deadline: Deadline,
    ) -> Result<()> {
        if via_ipc {
            let rec = self.read_ipc_record(len, deadline)?;
            if len == 0 {
                return Ok(());
            }
            let g = cuda::require("recv")?;
            let dev = match (t.device(), src_dev) {
                (Device::Cuda(i), _) => i,
                (Device::Cpu, Some(i)) if (i as usize) < g.device_count() => i,
                (Device::Cpu, _) => 0,
            };
            let link = self.link;
            let src = g.ipc_import(dev, &rec).map_err(|e| {
                // LINK-3: a sender that died with the frame in flight, not a resource problem.
                match link.shm.as_ref() {
                    Some(s) if s.peer_process_gone() || link.peer_hung_up() => Error::new(
                        ErrorKind::PeerLost,
                        "recv",
                        format!("the sending process went away in the middle of a message ({e})"),
                    ),
                    _ => e,
                }
            })?;
            let mut copy = || -> Result<()> {
                match t.device() {
                    Device::Cuda(_) => {
                        // SAFETY: the exporter keeps its memory until our ack; `t` is
                        // contiguous (match_outs) and holds `len` bytes.
                        unsafe {
                            g.copy(
                                dev,
                                cuda::Mem::Dev(t.data_mut_ptr() as u64),
                                cuda::Mem::Dev(src),
                                len,
                            )?
                        };
                        g.sync(dev, deadline)
                    }
                    Device::Cpu => {
                        // Straight into a contiguous tensor; a strided one through a buffer.
                        let mut tmp = if t.is_contiguous() {
                            None
                        } else {
                            Some(Buf::with_len(len)?)
                        };
                        let host = match (&mut tmp, out_contiguous_slice(t)) {
                            (Some(b), _) => b.as_mut_ptr(),
                            (None, Some(d)) => d.as_mut_ptr(),
                            (None, None) => unreachable!("contiguous"),
                        };
                        // SAFETY: as above; `host` holds `len` bytes (the out tensor or tmp).
                        unsafe { g.copy(dev, cuda::Mem::Host(host), cuda::Mem::Dev(src), len)? };
                        g.sync(dev, deadline)?;
                        if let Some(b) = &tmp {
                            t.scatter_from(b)?;
                        }
                        Ok(())
                    }
                }
            };
            let r = copy();
            if r.is_err() {
                // The sender frees its memory once we acknowledge: finish reading it first.
                g.drain(dev);
            }
            g.ipc_done(&rec);
            return r;
        }
        if let Device::Cuda(dev) = t.device() {
            let dst = t.data_mut_ptr() as u64;
            if via_cma {
                let mut tmp = Buf::with_len(len)?;
                self.fill(&mut tmp, true, deadline)?;
                // SAFETY: `t` is a contiguous CUDA tensor of `len` bytes (match_outs).
                return unsafe {
                    cuda::copy_sync(
                        dev,
                        cuda::Mem::Dev(dst),
                        cuda::Mem::Host(tmp.as_mut_ptr()),
                        len,
                    )
                };
            }
            return self.recv_device(dst, len, dev, deadline);
        }
        if let Some(dst) = out_contiguous_slice(t) {
            self.fill(dst, via_cma, deadline)
        } else {
            let mut tmp = Buf::with_len(len)?;
            self.fill(&mut tmp, via_cma, deadline)?;
            t.scatter_from(&tmp)
        }
    }

    /// Staged receive into device memory (CUDA-4): the host-to-device copy of chunk k overlaps
    /// the receive of chunk k+1.
    fn recv_device(&mut self, dst: u64, len: usize, dev: i32, deadline: Deadline) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cuda::Stage {
            g,
            chunk,
            nchunks,
            bufs,
        } = cuda::Stage::plan("recv", len, false)?;
        let nb = bufs.len();
        let mut events: std::collections::VecDeque<cuda::Event> = Default::default();
        let r = (|| {
            for k in 0..nchunks {
                if k >= nb {
                    // Buffer k % nb is free once the copy of chunk k - nb finished.
                    let ev = events.pop_front().expect("one event per chunk in flight");
                    g.wait_event(ev, deadline)?;
                }
                let n = chunk.min(len - k * chunk);
                // SAFETY: staging buffer k % nb holds `chunk` >= n bytes and no copy reads it.
                let b = unsafe { std::slice::from_raw_parts_mut(bufs[k % nb].0, n) };
                self.link.read_in_frame(b, deadline, "a CUDA tensor")?;
                // SAFETY: `dst` holds `len` bytes (the caller's contiguous CUDA tensor or our
                // allocation); the staging buffer stays untouched until the copy's event.
                unsafe {
                    g.copy(
                        dev,
                        cuda::Mem::Dev(dst + (k * chunk) as u64),
                        cuda::Mem::Host(b.as_mut_ptr()),
                        n,
                    )?
                };
                events.push_back(g.record(dev, false)?);
            }
            for ev in events.drain(..) {
                g.release_event(ev);
            }
            g.sync(dev, deadline)
        })();
        if r.is_err() {
            for ev in events.drain(..) {
                g.release_event(ev);
            }
            g.drain(dev);
        }
        r
    }

    /// Reads the CUDA IPC record standing in for a device segment of `len` bytes.
    pub(super) fn read_ipc_record(
        &mut self,
        len: usize,
        deadline: Deadline,
    ) -> Result<cuda::IpcRecord> {
        let mut b = [0u8; cuda::IPC_RECORD_LEN];
        self.link
            .read_in_frame(&mut b, deadline, "a CUDA IPC record")?;
        let rec = cuda::IpcRecord::decode(&b);
        if rec.len != len as u64 {
            return Err(protocol(
                "recv",
                format!(
                    "CUDA IPC record of {} bytes for a {len}-byte tensor",
                    rec.len
                ),
            ));
        }
        Ok(rec)
    }
}

//! Writing frames: header, descriptor and payload segments, with the cross-memory (SHM-4/7) and
//! CUDA IPC (HS-3) substitutions for large segments; LINK-2 on a failure part way.

use super::Link;
use crate::config::config;
use crate::cuda;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Deadline;
use crate::value::Value;
use crate::wire::{self, FLAG_CMA, FLAG_CUDA_IPC, FrameKind, HEADER_LEN, Header};
use std::sync::atomic::Ordering;
use std::time::Instant;

/// How a message's large host segments may cross a shared-memory link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carry {
    /// Segments of at least `PARALLEL_SHM_CMA_THRESHOLD` bytes are read by the receiver straight
    /// from the sender's memory (cross-memory attach) when the link allows it: one copy.
    Any,
    /// Every host byte goes through the link's stream (two copies through a shared ring): for a
    /// message the receiver takes piece by piece where it lies in the ring
    /// (`RecvGuard::recv_streamed`), to which a cross-memory copy would add one. Device
    /// segments go as with `Any`.
    Stream,
}

/// One piece of an outgoing frame.
pub(super) enum Part<'a> {
    Host(&'a [u8]),
    /// (address, length, device) of a CUDA tensor to stage.
    Device(u64, usize, i32),
}

impl Link {
    /// Sends a user message.
    /// Writes host parts in as few calls as possible and streams device parts through pinned
    /// staging buffers.
    fn write_parts(&self, parts: &[Part<'_>], deadline: Deadline) -> Result<()> {
        let mut pending: Vec<&[u8]> = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Part::Host(b) => pending.push(b),
                Part::Device(ptr, len, dev) => {
                    if !pending.is_empty() {
                        self.write_bytes(&pending, deadline, "a message")?;
                        pending.clear();
                    }
                    self.send_device(*ptr, *len, *dev, deadline)?;
                }
            }
        }
        if pending.is_empty() {
            Ok(())
        } else {
            self.write_bytes(&pending, deadline, "a message")
        }
    }

    pub fn send(&self, v: &Value, deadline: Deadline) -> Result<()> {
        self.send_frame(FrameKind::Message, v, deadline)
    }

    /// [`Link::send`], its large host segments carried as `carry` says.
    pub fn send_carried(&self, v: &Value, deadline: Deadline, carry: Carry) -> Result<()> {
        self.frame(
            FrameKind::Message,
            v,
            deadline,
            false,
            Instant::now(),
            carry,
        )
        .map(|_| ())
    }

    /// Sends a collective's control message: a frame of its own kind, which only
    /// [`Link::recv_control`] takes (a user receive refuses it, and the reverse).
    pub fn send_control(&self, v: &Value, deadline: Deadline) -> Result<()> {
        self.send_frame(FrameKind::Control, v, deadline)
    }

    /// Tells the peer that what the two ends were doing is abandoned, and why: its pending or
    /// next receive fails with `PeerLost` carrying `reason`, whatever it expected.
    pub fn send_abort(&self, reason: &str, deadline: Deadline) -> Result<()> {
        let v = Value::Dict(vec![(
            crate::value::Key::Str("reason".into()),
            Value::str(reason),
        )]);
        self.send_frame(FrameKind::Abort, &v, deadline)
    }

    /// Bytes a TCP write can surely take without waiting: half the socket's send buffer (the
    /// kernel doubles the size asked for, to account for its own overhead) less what is queued
    /// and not yet acknowledged; 0 when either cannot be read.
    fn tcp_room(&self) -> u64 {
        use std::os::fd::AsRawFd;
        let fd = self.sock.as_raw_fd();
        let mut buf: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid descriptor, an int-sized out-parameter and its length.
        let got = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&mut buf as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int: the bytes not yet acknowledged.
        let q = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
        if got != 0 || q != 0 || buf <= 0 || queued < 0 {
            return 0;
        }
        (buf as u64 / 2).saturating_sub(queued as u64)
    }

    pub(crate) fn send_frame(&self, kind: FrameKind, v: &Value, deadline: Deadline) -> Result<()> {
        self.frame(kind, v, deadline, false, Instant::now(), Carry::Any)
            .map(|_| ())
    }

    /// [`Link::send`] for a caller that read the clock as it began (`start`, also the start of
    /// `deadline`): the send's time in the link's statistics is counted from there.
    pub fn send_started(&self, v: &Value, deadline: Deadline, start: Instant) -> Result<()> {
        self.frame(FrameKind::Message, v, deadline, false, start, Carry::Any)
            .map(|_| ())
    }

    /// Sends the message `v` now, on the caller's thread, if that cannot wait for the peer:
    /// room for the whole frame (a shared-memory link's outgoing ring; a TCP socket's send
    /// buffer, counted at half its size for the kernel's overhead: [`Link::tcp_room`]), no
    /// segment that the peer reads in place (cross-memory or CUDA IPC, whose send waits for the
    /// peer's acknowledgement) and no device segment, and no other send holding the link.
    /// `Ok(false)`: nothing was written (send it the usual way); `Ok(true)`: sent, as
    /// [`Link::send`] would have.
    ///
    /// The ring's sends go through here first (collectives' SendScope): a chunk that fits is
    /// written by the thread that has it, instead of waking another thread of ours to write it
    /// while this one waits for the peer, on a machine whose cores the two ranks already fill.
    pub fn send_now(&self, v: &Value) -> Result<bool> {
        self.send_now_carried(v, Carry::Any)
    }

    /// [`Link::send_now`], its large host segments carried as `carry` says (with
    /// [`Carry::Stream`], a large segment that fits the ring is written now too).
    pub fn send_now_carried(&self, v: &Value, carry: Carry) -> Result<bool> {
        let t0 = Instant::now();
        self.frame(
            FrameKind::Message,
            v,
            Deadline::starting(t0, Some(std::time::Duration::from_secs(1))),
            true,
            t0,
            carry,
        )
    }

    /// Writes one frame; with `now`, only if it can be written without waiting (`send_now`),
    /// else `Ok(false)` before anything is written or numbered.
    fn frame(
        &self,
        kind: FrameKind,
        v: &Value,
        deadline: Deadline,
        now: bool,
        start: Instant,
        carry: Carry,
    ) -> Result<bool> {
        let enc = wire::encode(v, &self.limits).map_err(|e| self.err(e))?;
        let mut st = if now {
            match self.send.try_lock() {
                Ok(g) => g,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return Ok(false),
            }
        } else {
            self.send.lock().unwrap_or_else(|e| e.into_inner())
        };
        if self.closed_locally.load(Ordering::SeqCst) {
            return Err(self.err(Error::new(
                ErrorKind::Closed,
                "send",
                "the connection was closed locally",
            )));
        }
        if let Some(p) = &st.poisoned {
            return Err(self.err(Error::new(
                ErrorKind::Closed,
                "send",
                format!("the connection is unusable: {p}"),
            )));
        }
        if self.peer_lost.load(Ordering::SeqCst) {
            return Err(self.err(Error::new(
                ErrorKind::PeerLost,
                "send",
                "the peer went away (an earlier receive found it gone); nothing was sent",
            )));
        }
        let cma = self.shm.as_ref().filter(|s| {
            carry == Carry::Any
                && s.cma_send
                && enc
                    .segs
                    .iter()
                    .any(|g| !g.is_device() && g.len() as u64 >= s.cma_threshold)
        });
        if now {
            let in_place = cma.is_some() || enc.segs.iter().any(|g| g.is_device());
            let frame = (HEADER_LEN + enc.desc.len()) as u64 + enc.payload_len;
            let fits = match &self.shm {
                Some(s) => s.has_room(frame),
                None => frame <= self.tcp_room(),
            };
            if in_place || !fits {
                return Ok(false);
            }
        }
        let ipc = self.export_ipc(&enc.segs)?;
        st.seq += 1;
        let h = Header {
            kind,
            flags: if cma.is_some() { FLAG_CMA } else { 0 }
                | if ipc.is_some() { FLAG_CUDA_IPC } else { 0 },
            desc_len: enc.desc.len() as u32,
            nseg: enc.segs.len() as u32,
            payload_len: enc.payload_len,
            seq: st.seq,
        };
        let hb = h.encode();
        // Records standing in for cross-memory segments: (address, length); none without.
        let records: Vec<[u8; 16]> = enc
            .segs
            .iter()
            .take(if cma.is_some() { usize::MAX } else { 0 })
            .map(|g| {
                let b = g.bytes();
                let mut r = [0u8; 16];
                r[..8].copy_from_slice(&(b.as_ptr() as u64).to_le_bytes());
                r[8..].copy_from_slice(&(b.len() as u64).to_le_bytes());
                r
            })
            .collect();
        let ipc_records: Vec<[u8; cuda::IPC_RECORD_LEN]> =
            ipc.iter().flatten().map(|(r, _)| r.encode()).collect();
        let mut parts: Vec<Part<'_>> = Vec::with_capacity(2 + enc.segs.len());
        parts.push(Part::Host(&hb));
        parts.push(Part::Host(&enc.desc));
        let mut ipc_i = 0usize;
        for (i, g) in enc.segs.iter().enumerate() {
            match (g, cma) {
                (wire::OutSeg::Device { ptr, len, dev }, _) => {
                    if ipc.is_some() {
                        parts.push(Part::Host(&ipc_records[ipc_i]));
                        ipc_i += 1;
                    } else {
                        parts.push(Part::Device(*ptr, *len, *dev));
                    }
                }
                (_, Some(s)) if g.len() as u64 >= s.cma_threshold => {
                    parts.push(Part::Host(&records[i]))
                }
                _ => parts.push(Part::Host(g.bytes())),
            }
        }
        // Frames whose memory the receiver reads in place are numbered before the first byte
        // leaves, so that a failure part way can cancel them (SHM-7).
        let gated = match (cma.is_some() || ipc.is_some(), self.shm.as_ref()) {
            (true, Some(s)) => Some((s, s.note_cma_sent())),
            _ => None,
        };
        let r = self
            .write_parts(&parts, deadline)
            .and_then(|_| match gated {
                Some((s, n)) => s.wait_cma_ack(n, deadline),
                None => Ok(()),
            });
        if let Err(e) = &r {
            // We cannot know how much of the frame left: the stream is no longer framed (LINK-2).
            st.poisoned = Some(format!("a send failed part way ({e})"));
        }
        drop(st);
        if let Err(e) = &r {
            self.shutdown();
            // The caller may free or reuse its buffers once we return: cancel the frame, or
            // wait for a receiver already reading them (SHM-7).
            if let Some((s, n)) = gated
                && !s.abandon_cma(n, config().frame_timeout)
            {
                tracing::error!(
                    "{self:?}: a send failed ({e}) and the shared ring's gate held a value no receiver writes (the peer corrupted it); the receiver may still read this message's buffers"
                );
            }
        }
        if let Some(recs) = ipc
            && let Some(g) = cuda::cuda()
        {
            for ev in recs.into_iter().filter_map(|r| r.1) {
                g.release_event(ev);
            }
        }
        if let Err(e) = r {
            return Err(self.err(e));
        }
        self.counters.bytes_sent.fetch_add(
            HEADER_LEN as u64 + enc.desc.len() as u64 + enc.payload_len,
            Ordering::Relaxed,
        );
        self.counters.msgs_sent.fetch_add(1, Ordering::Relaxed);
        self.counters
            .send_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(true)
    }
}

//! Shared-memory rings between two processes of one host.
//!
//! One memfd holds two single-producer single-consumer byte rings, one per direction. Each side
//! writes one ring and reads the other. Doorbells are eventfds (one "data" and one "space" per
//! ring), rung only when the other side announced that it is parked, so a busy stream costs no
//! system calls. The TCP socket the link was set up over stays open as the liveness channel: it
//! reads EOF when the peer process dies, which wakes a parked waiter.
//!
//! Invariants:
//! - SHM-1: the memory is a memfd (anonymous): nothing is left in /dev/shm, whatever kills us.
//! - SHM-2: indices read from shared memory are untrusted: `tail <= head <= tail + capacity` is
//!   checked (against our own copy of the index we own) before every copy; a violation is a
//!   protocol error on this link, never an out-of-bounds access.
//! - SHM-3: park protocol: a waiter stores its parked flag, then re-reads the index (both SeqCst);
//!   a producer stores the index, then reads the flag (SeqCst): one of them sees the other, so a
//!   wake-up cannot be lost. Waits are sliced anyway (runtime RT-1).
//! - SHM-4: a segment sent by cross-memory attach stays valid until the receiver acknowledges it
//!   (`cma_done`); the sender's `send` does not return before that.
//! - SHM-5: the ring capacity is a positive multiple of 4096 bytes, so both control blocks are
//!   page aligned (their u64 atomics aligned); a configured size is rounded up
//!   ([`Mapping::ring_bytes`]), a peer's other size is refused.
//! - SHM-6 (a peer cannot crash us): the memfd is sealed against any change of size before it
//!   is shared, and the receiving side checks the seals and the exact size before it maps
//!   (`sys::check_sealed`, SEAL-1/2). Nothing the peer does to the file or to the bytes in it
//!   can fault our accesses; garbage in the control words is SHM-2's protocol error, on this
//!   link only.
//! - SHM-7 (a send that gave up is never delivered): a frame whose segments the receiver reads
//!   from the sender's memory (cross-memory attach, CUDA IPC) passes a gate word in the ring's
//!   control block. The receiver claims frame n (`2n + 1`) before it reads the sender's memory;
//!   a sender whose send failed after writing part or all of frame n cancels it (`2n`) unless it
//!   was claimed, and then waits for the receiver's acknowledgement before returning, so the
//!   caller can reuse its buffers at once. One compare-and-swap decides, so a cancelled frame is
//!   never read. A claimed frame is read whole before the failing send returns (so a send error
//!   does not prove the peer got nothing); when the reader takes longer than
//!   PARALLEL_FRAME_TIMEOUT, the sender revokes the claim (`2n + 1` to `2n`) and returns, and
//!   the reader, which checks the gate after its last read and before it delivers, discards
//!   the frame: a message read from reused buffers is never delivered.
//! - SHM-8: each side stores the CPU it runs on with the index it publishes (`writer_cpu` with
//!   `head`, `reader_cpu` with `tail`, on the same line); a waiter that spinning did not serve
//!   reads the other side's to move off a CPU they share (SPREAD-1/2). Only compared.

use super::kinds::{Cost, End, Kind, Policy};
use super::{LinkKind, sys};
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::{Deadline, Interest, spread, wait_once};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

/// Bytes before each ring's data area (its control block).
pub(crate) const CTRL: usize = 4096;
/// Ring capacities are multiples of this (SHM-5).
pub(crate) const RING_ALIGN: usize = 4096;

#[repr(C)]
struct Ctrl {
    head: AtomicU64,       // bytes ever written (writer-owned)
    writer_cpu: AtomicU32, // the CPU the writer last published from (SPREAD-1; only compared)
    _p0: [u8; 52],
    reader_parked: AtomicU32,
    closed: AtomicU32, // writer closed the ring in an orderly way
    _p1: [u8; 56],
    tail: AtomicU64,       // bytes ever read (reader-owned)
    cma_done: AtomicU64,   // cross-memory messages the reader finished (reader-owned)
    cma_gate: AtomicU64,   // SHM-7: 2n + 1 the reader claimed frame n, 2n the writer cancelled it
    reader_cpu: AtomicU32, // the CPU the reader last gave room back from (SPREAD-1; compared)
    _p2: [u8; 36],
    writer_parked: AtomicU32,
}

// The layout both ends of a ring agree on: the writer's line, the reader's line, the parked
// flags on lines of their own.
const _: () = assert!(std::mem::offset_of!(Ctrl, reader_parked) == 64);
const _: () = assert!(std::mem::offset_of!(Ctrl, tail) == 128);
const _: () = assert!(std::mem::offset_of!(Ctrl, writer_parked) == 192);
const _: () = assert!(std::mem::offset_of!(Ctrl, writer_cpu) == 8);
const _: () = assert!(std::mem::offset_of!(Ctrl, reader_cpu) == 152);
const _: () = assert!(std::mem::size_of::<Ctrl>() <= CTRL);

/// The shared mapping (both rings), accessed only through atomics (control) and through byte
/// copies into ranges that the SPSC protocol gives to exactly one side at a time. The mapping
/// itself is memmap2's (it unmaps on drop); what is mapped is checked first (SHM-5/6).
pub(crate) struct Mapping {
    map: memmap2::MmapRaw,
    pub cap: usize,
    _fd: OwnedFd,
}

impl Mapping {
    pub fn total_len(cap: usize) -> usize {
        2 * (CTRL + cap)
    }

    /// The ring size used for a configured `PARALLEL_SHM_RING`: rounded up to a whole number of
    /// pages (SHM-5), so that both control blocks stay page aligned whatever size was written
    /// (`4MB` is 4,000,000 bytes, not a multiple of 4096).
    pub fn ring_bytes(configured: usize) -> usize {
        configured.div_ceil(RING_ALIGN) * RING_ALIGN
    }

    /// Maps a memfd of `total_len(cap)` bytes, checking it first (SHM-5, SEAL-2): `cap` is a
    /// whole number of pages, the file is a memfd of exactly that size whose size is sealed.
    pub fn map(fd: OwnedFd, cap: usize) -> Result<Mapping> {
        if cap == 0 || cap % RING_ALIGN != 0 {
            return Err(protocol(
                "shm",
                format!("ring capacity {cap} is not a positive multiple of {RING_ALIGN} bytes"),
            ));
        }
        let len = Self::total_len(cap);
        sys::check_sealed(fd.as_raw_fd(), Some(len), "shm")?;
        // Shared, read-write, exactly `len` bytes of a file whose size is sealed at `len`: no
        // access inside the mapping can fault (SHM-6).
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_raw(&fd)
            .map_err(|e| Error::os("shm", "mmap(memfd)", e))?;
        if cap >= 2 << 20 {
            let _ = map.advise(memmap2::Advice::HugePage);
        }
        // Fault the rings in now (both ends; MADV_POPULATE_WRITE, Linux 5.14+), so the first
        // passes of a new link do not pay a page fault per 4 KiB. Failure only costs those faults.
        let _ = map.advise(memmap2::Advice::PopulateWrite);
        Ok(Mapping { map, cap, _fd: fd })
    }

    fn ctrl(&self, ring: usize) -> &Ctrl {
        // SAFETY: ring < 2; the control block lies inside the mapping, is page aligned, and is
        // only accessed through atomics.
        unsafe { &*(self.map.as_mut_ptr().add(ring * (CTRL + self.cap)) as *const Ctrl) }
    }

    fn data(&self, ring: usize) -> *mut u8 {
        // SAFETY: inside the mapping.
        unsafe { self.map.as_mut_ptr().add(ring * (CTRL + self.cap) + CTRL) }
    }
}

/// Eventfds of one ring.
pub(crate) struct Bells {
    pub data: OwnedFd,
    pub space: OwnedFd,
}

/// One end of a shared-memory link.
pub(crate) struct ShmEnd {
    pub map: Mapping,
    pub tx: usize, // ring we write
    pub bells: [Bells; 2],
    pub liveness: RawFd,
    pub peer_pid: i32,
    pub spin: Duration,
    /// We may send large segments by cross-memory attach (the peer verified it can read us).
    pub cma_send: bool,
    /// Segments this end sends by cross-memory attach are at least this long (ours).
    pub cma_threshold: u64,
    /// ... and those it receives so, the peer's own setting (exchanged at set-up).
    pub peer_cma_threshold: u64,
    head: AtomicU64, // our writer position (mirror)
    tail: AtomicU64, // our reader position (mirror)
    /// The reader position last stored in the shared control block: reads of one frame give
    /// their room back once, not once per piece ([`ShmEnd::publish_reads`]).
    tail_shared: AtomicU64,
    /// The reader's position as this writer last read it: room is counted from it, and the
    /// shared word (a cache line the reader writes) is read again only when that room is too
    /// small for what is to be written.
    tail_seen: AtomicU64,
    cma_sent: AtomicU64,
    /// Cross-memory frames this end received and acknowledged (SHM-7's n, reader side).
    cma_recv: AtomicU64,
}

impl ShmEnd {
    pub fn new(
        map: Mapping,
        tx: usize,
        bells: [Bells; 2],
        liveness: RawFd,
        peer_pid: i32,
        spin: Duration,
    ) -> ShmEnd {
        ShmEnd {
            map,
            tx,
            bells,
            liveness,
            peer_pid,
            spin,
            cma_send: false,
            cma_threshold: u64::MAX,
            peer_cma_threshold: u64::MAX,
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            tail_shared: AtomicU64::new(0),
            tail_seen: AtomicU64::new(0),
            cma_sent: AtomicU64::new(0),
            cma_recv: AtomicU64::new(0),
        }
    }

    fn rx(&self) -> usize {
        1 - self.tx
    }

    /// Initialises both control blocks (the creator does this once, before sharing).
    pub fn init(map: &Mapping) {
        for r in 0..2 {
            let c = map.ctrl(r);
            c.head.store(0, Ordering::SeqCst);
            c.tail.store(0, Ordering::SeqCst);
            c.cma_done.store(0, Ordering::SeqCst);
            c.cma_gate.store(0, Ordering::SeqCst);
            c.reader_parked.store(0, Ordering::SeqCst);
            c.writer_parked.store(0, Ordering::SeqCst);
            c.closed.store(0, Ordering::SeqCst);
            c.writer_cpu.store(0, Ordering::SeqCst);
            c.reader_cpu.store(0, Ordering::SeqCst);
        }
    }

    /// The CPU word the peer stored with its last write to this side's incoming ring
    /// (SHM-8; only compared).
    pub fn writer_cpu(&self) -> u32 {
        self.map.ctrl(self.rx()).writer_cpu.load(Ordering::Relaxed)
    }

    /// True when the incoming ring has unread bytes.
    pub fn has_data(&self) -> bool {
        self.map.ctrl(self.rx()).head.load(Ordering::Acquire) != self.tail.load(Ordering::Relaxed)
    }

    /// Marks the reader parked and returns the fds to wait on (SHM-3); `unpark` must follow.
    pub fn park_fds(&self) -> [(RawFd, Interest); 2] {
        self.map
            .ctrl(self.rx())
            .reader_parked
            .store(1, Ordering::SeqCst);
        [
            (self.bells[self.rx()].data.as_raw_fd(), Interest::Read),
            (self.liveness, Interest::Read),
        ]
    }

    pub fn unpark(&self) {
        self.map
            .ctrl(self.rx())
            .reader_parked
            .store(0, Ordering::SeqCst);
        sys::eventfd_drain(self.bells[self.rx()].data.as_raw_fd());
    }

    /// The peer ended the link: Closed if it closed its ring in order, PeerLost otherwise.
    fn gone(&self, what: &str) -> Error {
        if self.map.ctrl(self.rx()).closed.load(Ordering::SeqCst) != 0 {
            Error::new(
                ErrorKind::Closed,
                "recv",
                format!("the peer closed the connection (while waiting for {what})"),
            )
        } else {
            Error::new(
                ErrorKind::PeerLost,
                "recv",
                format!("the peer process went away without closing (while waiting for {what})"),
            )
        }
    }

    /// Spin, then park until `ready()` or the deadline (SHM-3).
    #[allow(clippy::too_many_arguments)] // one private helper shared by the four wait sites
    fn wait(
        &self,
        deadline: Deadline,
        op: &'static str,
        what: &str,
        parked: &AtomicU32,
        peer_cpu: &AtomicU32,
        bell: RawFd,
        spin: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        // Spins only while a core is free (runtime::spin), then parks on the doorbell, holding
        // the spin until the park ends (SPIN-3 learns from its length).
        let held = match crate::runtime::spin_until(spin, &mut ready) {
            crate::runtime::Spun::Ready => return Ok(()),
            crate::runtime::Spun::Sleep(s) => s,
        };
        if held.unpaid() {
            // SPREAD-2: the peer may be waiting for this very CPU.
            spread::after_unpaid_spin([peer_cpu.load(Ordering::Relaxed)]);
        }
        loop {
            parked.store(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if ready() {
                parked.store(0, Ordering::SeqCst);
                return Ok(());
            }
            if sys::readable_now(self.liveness) {
                parked.store(0, Ordering::SeqCst);
                if ready() {
                    return Ok(());
                }
                return Err(self.gone(what).with_op(op));
            }
            let slice = match deadline.slice(op, what) {
                Ok(s) => s,
                Err(e) => {
                    parked.store(0, Ordering::SeqCst);
                    return Err(e);
                }
            };
            let r = wait_once(
                &[(bell, Interest::Read), (self.liveness, Interest::Read)],
                slice,
            );
            parked.store(0, Ordering::SeqCst);
            sys::eventfd_drain(bell);
            r?;
        }
    }

    /// Whether a write of `want` bytes fits without waiting for the reader: counted from the
    /// reader position last seen, then (when that is short) from the shared one. Only the
    /// writer, under the link's send lock, takes room; the reader only gives it back.
    pub fn has_room(&self, want: u64) -> bool {
        let head = self.head.load(Ordering::Relaxed);
        let (_, used) = self.used_for(self.map.ctrl(self.tx), head, want);
        (self.map.cap as u64)
            .checked_sub(used)
            .is_some_and(|room| room >= want)
    }

    /// Room for `want` bytes counted from the reader position last read, else from the shared
    /// one read now: `(tail, used)`; `used` is `u64::MAX` for indices that cannot be (SHM-2).
    fn used_for(&self, c: &Ctrl, head: u64, want: u64) -> (u64, u64) {
        let cap = self.map.cap as u64;
        let seen = self.tail_seen.load(Ordering::Relaxed);
        if let Some(used) = head.checked_sub(seen)
            && used <= cap
            && cap - used >= want
        {
            return (seen, used);
        }
        let tail = c.tail.load(Ordering::Acquire);
        self.tail_seen.store(tail, Ordering::Relaxed);
        (tail, head.checked_sub(tail).unwrap_or(u64::MAX))
    }

    /// Writes all bytes of `bufs` into the outgoing ring.
    pub fn write_all(&self, bufs: &[&[u8]], deadline: Deadline, what: &str) -> Result<()> {
        let cap = self.map.cap as u64;
        let c = self.map.ctrl(self.tx);
        let data = self.map.data(self.tx);
        let step = (cap / 4).max(4096);
        let mut head = self.head.load(Ordering::Relaxed);
        // Bytes are published (the shared head stored, a parked reader rung) once per call, or
        // every `step` bytes, or before a wait for space: a reader spinning on a small frame
        // then sees it whole at once, not header, descriptor and payload one by one.
        let mut published = head;
        let publish = |head: u64| {
            c.writer_cpu.store(spread::cpu_word(), Ordering::Relaxed);
            c.head.store(head, Ordering::SeqCst);
            self.head.store(head, Ordering::Relaxed);
            if c.reader_parked.load(Ordering::SeqCst) != 0 {
                sys::eventfd_signal(self.bells[self.tx].data.as_raw_fd());
            }
        };
        for b in bufs {
            let mut off = 0usize;
            while off < b.len() {
                let want = ((b.len() - off) as u64).min(step);
                let (tail, used) = self.used_for(c, head, want);
                // SHM-2: the reader's tail never passes our head (indices start at 0 and
                // would take centuries to reach 2^64), and never falls a ring behind.
                if used > cap {
                    return Err(protocol(
                        "send",
                        format!("shared ring indices corrupted (head {head}, tail {tail})"),
                    ));
                }
                if used == cap {
                    if published != head {
                        publish(head);
                        published = head;
                    }
                    let bell = self.bells[self.tx].space.as_raw_fd();
                    self.wait(
                        deadline,
                        "send",
                        what,
                        &c.writer_parked,
                        &c.reader_cpu,
                        bell,
                        self.spin,
                        || c.tail.load(Ordering::Acquire) != tail,
                    )?;
                    continue;
                }
                let n = ((cap - used).min(step) as usize).min(b.len() - off);
                let pos = (head % cap) as usize;
                let first = n.min(self.map.cap - pos);
                // SAFETY: [pos, pos+first) and [0, n-first) lie in the data area; the SPSC
                // protocol gives the free region (cap - used bytes from head) to the writer alone.
                unsafe {
                    std::ptr::copy_nonoverlapping(b.as_ptr().add(off), data.add(pos), first);
                    std::ptr::copy_nonoverlapping(b.as_ptr().add(off + first), data, n - first);
                }
                head += n as u64;
                off += n;
                if head - published >= step {
                    publish(head);
                    published = head;
                }
            }
        }
        if published != head {
            publish(head);
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes. The room they free is given back to the writer before
    /// any wait, every quarter ring, and by [`ShmEnd::publish_reads`] (the link's receive lock
    /// calls it when released), so that the pieces of one frame (header, descriptor, payload)
    /// cost one shared store and one look at the writer's doorbell, not one each.
    pub fn read_exact(&self, buf: &mut [u8], deadline: Deadline, what: &str) -> Result<()> {
        self.read_exact_with(buf, deadline, what, false)
    }

    /// [`ShmEnd::read_exact`]; with `streaming`, the bytes go to `buf` with stores that bypass
    /// the caches ([`crate::buffer::copy_streaming`]: a destination larger than the caches,
    /// written once).
    pub fn read_exact_with(
        &self,
        buf: &mut [u8],
        deadline: Deadline,
        what: &str,
        streaming: bool,
    ) -> Result<()> {
        let cap = self.map.cap as u64;
        let rx = self.rx();
        let c = self.map.ctrl(rx);
        let data = self.map.data(rx);
        let mut tail = self.tail.load(Ordering::Relaxed);
        let mut got = 0usize;
        while got < buf.len() {
            let avail = self.readable(c, tail)?;
            if avail == 0 {
                // The writer may be waiting for the room this frame's reads freed.
                self.publish_reads();
                let bell = self.bells[rx].data.as_raw_fd();
                self.wait(
                    deadline,
                    "recv",
                    what,
                    &c.reader_parked,
                    &c.writer_cpu,
                    bell,
                    self.spin,
                    || c.head.load(Ordering::Acquire) != tail,
                )?;
                continue;
            }
            let n = (avail as usize).min(buf.len() - got);
            let pos = (tail % cap) as usize;
            let first = n.min(self.map.cap - pos);
            if streaming {
                // SAFETY: the ranges lie in the data area; [tail, head) belongs to the reader
                // (SHM-2 checked avail <= cap).
                let (a, b) = unsafe {
                    (
                        std::slice::from_raw_parts(data.add(pos) as *const u8, first),
                        std::slice::from_raw_parts(data as *const u8, n - first),
                    )
                };
                crate::buffer::copy_streaming(&mut buf[got..got + first], a);
                crate::buffer::copy_streaming(&mut buf[got + first..got + n], b);
            } else {
                // SAFETY: the ranges lie in the data area; [tail, head) belongs to the reader
                // (SHM-2 checked avail <= cap).
                unsafe {
                    std::ptr::copy_nonoverlapping(data.add(pos), buf.as_mut_ptr().add(got), first);
                    std::ptr::copy_nonoverlapping(
                        data,
                        buf.as_mut_ptr().add(got + first),
                        n - first,
                    );
                }
            }
            tail += n as u64;
            got += n;
            self.consumed(tail);
        }
        Ok(())
    }

    /// Bytes readable from `tail` in the incoming ring whose control block is `c`: SHM-2
    /// checks the writer's index against ours before any of them is touched.
    fn readable(&self, c: &Ctrl, tail: u64) -> Result<u64> {
        let head = c.head.load(Ordering::Acquire);
        let avail = head.checked_sub(tail).unwrap_or(u64::MAX);
        if avail > self.map.cap as u64 {
            return Err(protocol(
                "recv",
                format!("shared ring indices corrupted (head {head}, tail {tail})"),
            ));
        }
        Ok(avail)
    }

    /// Moves our reader position to `tail` (everything before it read); the room is given back
    /// to the writer every quarter ring, else by [`ShmEnd::publish_reads`].
    fn consumed(&self, tail: u64) {
        self.tail.store(tail, Ordering::Relaxed);
        let step = (self.map.cap as u64 >> 2).max(4096); // a quarter ring
        if tail.wrapping_sub(self.tail_shared.load(Ordering::Relaxed)) >= step {
            self.publish_reads();
        }
    }

    /// Hands the next `len` bytes to `f` where they lie in the incoming ring, `(offset, bytes)`,
    /// instead of copying them out: in pieces of at most `most` bytes, each a whole number of
    /// `grain`-byte units (1 to 16; the last piece may be shorter when `len` is not a multiple),
    /// with no alignment beyond the byte. A unit that the ring's end cuts in two, or that has
    /// not fully arrived, goes through a small buffer. A piece's room is given back to the
    /// writer only after `f` returned, so the writer cannot overwrite what `f` reads; the bytes
    /// are the peer's all the same (a hostile peer may still change them under `f`, as it may
    /// change what a copy would read: garbage values, never an access outside the ring).
    /// An error of `f` ends the call with the bytes of its piece unread (the link then has to
    /// be poisoned by the caller: its framing is lost).
    pub fn read_lent(
        &self,
        len: usize,
        grain: usize,
        most: usize,
        deadline: Deadline,
        what: &str,
        f: &mut super::Sink<'_>,
    ) -> Result<()> {
        debug_assert!((1..=16).contains(&grain) && most >= grain);
        let cap = self.map.cap as u64;
        let rx = self.rx();
        let c = self.map.ctrl(rx);
        let data = self.map.data(rx);
        let mut unit = [0u8; 16];
        let mut got = 0usize;
        while got < len {
            let tail = self.tail.load(Ordering::Relaxed);
            let avail = self.readable(c, tail)?;
            let pos = (tail % cap) as usize;
            let n = (avail as usize)
                .min(len - got)
                .min(self.map.cap - pos)
                .min(most);
            let n = if n == len - got { n } else { n - n % grain };
            if n == 0 {
                // Nothing here yet, or a unit across the ring's end: read_exact waits for it.
                let k = grain.min(len - got);
                self.read_exact(&mut unit[..k], deadline, what)?;
                f(got, &unit[..k])?;
                got += k;
                continue;
            }
            // SAFETY: [pos, pos + n) lies in the data area (n <= cap - pos) and in [tail, head),
            // which the SPSC protocol gives to the reader alone until the tail passes it (SHM-2
            // checked avail <= cap); it stays mapped while `self` lives.
            let piece = unsafe { std::slice::from_raw_parts(data.add(pos) as *const u8, n) };
            f(got, piece)?;
            self.consumed(tail + n as u64);
            got += n;
        }
        Ok(())
    }

    /// Offers `f` the unread bytes that lie contiguous in the incoming ring (up to its end); when
    /// it returns `(value, n)`, the first `n` of them are consumed. `None` (nothing consumed)
    /// when there are none, or the indices are corrupt (the next read reports it, SHM-2). The
    /// bytes are the peer's: `f` copies what it keeps (a hostile peer may change them under it:
    /// garbage values, never an access outside the ring).
    pub fn take_contiguous<T>(&self, f: impl FnOnce(&[u8]) -> Option<(T, usize)>) -> Option<T> {
        let cap = self.map.cap as u64;
        let rx = self.rx();
        let tail = self.tail.load(Ordering::Relaxed);
        let avail = self.readable(self.map.ctrl(rx), tail).ok()?;
        let pos = (tail % cap) as usize;
        let n = (avail as usize).min(self.map.cap - pos);
        if n == 0 {
            return None;
        }
        // SAFETY: [pos, pos + n) lies in the data area (n <= cap - pos) and in [tail, head), which
        // the SPSC protocol gives to the reader alone until the tail passes it (SHM-2 checked
        // avail <= cap); it stays mapped while `self` lives.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.map.data(rx).add(pos) as *const u8, n) };
        let (v, used) = f(bytes)?;
        self.consumed(tail + used.min(n) as u64);
        Some(v)
    }

    /// Gives the room of everything read so far back to the writer (the shared reader
    /// position), and rings the writer if it waits for room. Cheap when there is nothing new.
    pub fn publish_reads(&self) {
        let tail = self.tail.load(Ordering::Relaxed);
        if self.tail_shared.load(Ordering::Relaxed) == tail {
            return;
        }
        self.tail_shared.store(tail, Ordering::Relaxed);
        let rx = self.rx();
        let c = self.map.ctrl(rx);
        c.reader_cpu.store(spread::cpu_word(), Ordering::Relaxed);
        c.tail.store(tail, Ordering::SeqCst);
        if c.writer_parked.load(Ordering::SeqCst) != 0 {
            sys::eventfd_signal(self.bells[rx].space.as_raw_fd());
        }
    }

    /// Number of cross-memory messages sent so far (the sender's side of SHM-4).
    pub fn note_cma_sent(&self) -> u64 {
        self.cma_sent.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Waits until the receiver acknowledged cross-memory message `n` (SHM-4).
    pub fn wait_cma_ack(&self, n: u64, deadline: Deadline) -> Result<()> {
        let c = self.map.ctrl(self.tx);
        let bell = self.bells[self.tx].space.as_raw_fd();
        self.wait(
            deadline,
            "send",
            "the receiver to copy the message",
            &c.writer_parked,
            // Never read: a zero budget neither runs out nor skips (SPREAD-2 needs one that did).
            &c.reader_cpu,
            bell,
            // The receiver is copying a large segment (hundreds of µs at least): spinning here
            // would only steal its core. Park at once.
            Duration::ZERO,
            || c.cma_done.load(Ordering::Acquire) >= n,
        )
    }

    /// Receiver: claims the next cross-memory frame before reading the sender's memory
    /// (SHM-7); an error when its sender gave up on it.
    pub fn claim_cma(&self) -> Result<()> {
        let n = self.cma_recv.load(Ordering::Relaxed) + 1;
        let gate = &self.map.ctrl(self.rx()).cma_gate;
        let mut g = gate.load(Ordering::SeqCst);
        loop {
            if g == 2 * n {
                return Err(Error::new(
                    ErrorKind::PeerLost,
                    "recv",
                    "the sender gave up on this message before it was read (its send failed or timed out); nothing of it was delivered",
                ));
            }
            if g > 2 * n {
                return Err(protocol(
                    "recv",
                    format!("shared ring gate corrupted ({g} for cross-memory frame {n})"),
                ));
            }
            match gate.compare_exchange(g, 2 * n + 1, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return Ok(()),
                Err(now) => g = now,
            }
        }
    }

    /// Sender, after its send of cross-memory frame `n` failed: cancels the frame, or, when the
    /// receiver already claimed it, waits (up to `grace`, or until the peer process is gone) for
    /// the receiver to finish reading (SHM-7). When `grace` passes first, revokes the claim
    /// (`2n + 1` to `2n`): the receiver checks the gate after its last read and before it
    /// delivers ([`ShmEnd::check_claim`]), so what it reads from then on is discarded. True when
    /// the sender's memory is free to reuse; false only when the gate holds a value no honest
    /// receiver writes. Polls: the link is already shut down, so its liveness socket cannot be
    /// waited on.
    pub fn abandon_cma(&self, n: u64, grace: Duration) -> bool {
        let c = self.map.ctrl(self.tx);
        let mut g = c.cma_gate.load(Ordering::SeqCst);
        while g != 2 * n + 1 {
            match c
                .cma_gate
                .compare_exchange(g, 2 * n, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return true,
                Err(now) => g = now,
            }
        }
        let until = Instant::now() + grace;
        while c.cma_done.load(Ordering::SeqCst) < n {
            if self.peer_process_gone() {
                return true;
            }
            if Instant::now() >= until {
                let revoked = c
                    .cma_gate
                    .compare_exchange(2 * n + 1, 2 * n, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok();
                return revoked || c.cma_done.load(Ordering::SeqCst) >= n;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        true
    }

    /// Receiver, after its last read of the sender's memory for the frame it claimed and before
    /// it delivers the message: an error when the sender revoked the claim meanwhile (SHM-7),
    /// since the sender may have reused its buffers while they were being read.
    pub fn check_claim(&self) -> Result<()> {
        let n = self.cma_recv.load(Ordering::Relaxed) + 1;
        match self.map.ctrl(self.rx()).cma_gate.load(Ordering::SeqCst) {
            g if g == 2 * n + 1 => Ok(()),
            g if g == 2 * n => Err(Error::new(
                ErrorKind::PeerLost,
                "recv",
                "the sender gave up on this message while it was being read (its send failed and \
                 PARALLEL_FRAME_TIMEOUT passed before the read ended); it was discarded, since \
                 the sender may have reused its buffers",
            )),
            g => Err(protocol(
                "recv",
                format!("shared ring gate corrupted ({g} for cross-memory frame {n})"),
            )),
        }
    }

    /// True when the peer process has ended: it no longer exists, or it is a zombie its parent
    /// has not reaped yet ([`sys::process_ended`]), which reads no memory any more.
    pub fn peer_process_gone(&self) -> bool {
        self.peer_pid > 0 && sys::process_ended(self.peer_pid)
    }

    /// Receiver: acknowledges one cross-memory message.
    pub fn ack_cma(&self) {
        self.cma_recv.fetch_add(1, Ordering::Relaxed);
        let rx = self.rx();
        let c = self.map.ctrl(rx);
        c.cma_done.fetch_add(1, Ordering::SeqCst);
        if c.writer_parked.load(Ordering::SeqCst) != 0 {
            sys::eventfd_signal(self.bells[rx].space.as_raw_fd());
        }
    }

    /// Marks our outgoing ring closed (orderly) before the socket is shut down.
    pub fn mark_closed(&self) {
        self.map.ctrl(self.tx).closed.store(1, Ordering::SeqCst);
        sys::eventfd_signal(self.bells[self.tx].data.as_raw_fd());
    }
    /// Unread bytes in the incoming ring, and the first `buf.len()` of them copied into `buf`
    /// without consuming them: (unread, copied). `None` when the ring indices are corrupt.
    pub fn peek(&self, buf: &mut [u8]) -> Option<(usize, usize)> {
        let cap = self.map.cap as u64;
        let rx = self.rx();
        let tail = self.tail.load(Ordering::Relaxed);
        let avail = self
            .map
            .ctrl(rx)
            .head
            .load(Ordering::Acquire)
            .wrapping_sub(tail);
        if avail > cap {
            return None;
        }
        let n = (avail as usize).min(buf.len());
        let pos = (tail % cap) as usize;
        let first = n.min(self.map.cap - pos);
        let data = self.map.data(rx);
        // SAFETY: as in read_exact: [tail, tail + n) lies in the data area and belongs to the
        // reader (avail <= cap checked); nothing is consumed.
        unsafe {
            std::ptr::copy_nonoverlapping(data.add(pos), buf.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, buf.as_mut_ptr().add(first), n - first);
        }
        Some((avail as usize, n))
    }
}

/// The shared-memory kind: viable between two ends of one host when allowed (KIND-2).
#[derive(Debug, Clone, Copy)]
pub struct Shm;

impl Kind for Shm {
    fn id(&self) -> LinkKind {
        LinkKind::Shm
    }
    fn probe(&self, a: &End<'_>, b: &End<'_>, policy: &Policy) -> Option<Cost> {
        // docs/benchmarks.md: ~4 us round trip, ~5.3 GB/s.
        (policy.shm && a.host_id == b.host_id).then_some(Cost {
            latency: Duration::from_micros(2),
            bytes_per_sec: 5e9,
        })
    }
}

#[cfg(test)]
mod tests;

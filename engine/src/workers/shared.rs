//! The shared-memory part of a [`super::HostQueue`]: one memfd that every process using the
//! queue maps. It holds a header (a robust process-shared mutex, two rings of item slots, the
//! parking words, the attached processes) and an arena of blocks that carry encoded items.
//!
//! An item is encoded once by its writer straight into an arena block (the value tree as the
//! wire descriptor, then each tensor's bytes, 64-byte aligned). A reader in any process decodes
//! the descriptor and gets tensors that *view* the block: no copy on the reader's side. The block
//! returns to the arena when the last tensor viewing it is dropped.
//!
//! ```text
//! memfd: | header (4 KiB) | slots: 2 directions x capacity x (offset, length) | arena ...      |
//! block: | header (128 B): magic, class, queued count, free flag, used bytes, next free,     |
//!        |   holders: up to 6 x (pid, start time, count)                                      |
//!        | item: prefix (64 B) | segment table | descriptor | inline segment 0 | ...           |
//! ```
//!
//! A tensor that already lives in the arena (made by [`Segment::empty_tensor`], or received
//! from the queue) is not copied when written: the item's segment table refers to its block,
//! and the reader's tensor views that block. A block stays allocated while any live process
//! holds it (a lease per tensor owner) or any queued item refers to it.
//!
//! Invariants:
//! - SHQ-1 (nothing leaks): the memory is a memfd, so nothing is left in /dev/shm whatever
//!   kills us; the kernel frees it when the last process unmaps it.
//! - SHQ-2 (never left locked): the mutex is robust. When its holder dies, the next locker gets
//!   EOWNERDEAD, marks it consistent and runs [`Segment::repair`], which rebuilds the free lists
//!   from the blocks themselves. Every critical section commits with one final store (a ring
//!   index, a free-list head, the bump pointer), so a holder killed at any point leaves a state
//!   that repair turns consistent; a block it held is reclaimed, not leaked.
//! - SHQ-3 (crashed holders' blocks come back): every hold on a block records the holder's pid
//!   and start time; repair drops the holds of dead processes (pid reuse is told apart by the
//!   start time), recounts the queued references from the slots, and frees blocks that neither a
//!   live process nor a queued item needs.
//! - SHQ-4 (shared memory is untrusted): offsets, lengths, classes and counts read from the
//!   mapping are checked against the mapping's bounds before any access; the descriptor is copied
//!   out before it is validated, so another process cannot change it between check and use.
//! - SHQ-5: critical sections are short (index and free-list updates); payload copies run
//!   outside the lock, into a fresh block only its writer holds.

use super::event::{Event, EventWords};
use crate::error::{Error, ErrorKind, Result, protocol};
use crate::runtime::Deadline;
use crate::transport::sys;
use crate::value::{Key, Tensor, Value};
use crate::wire::{self, FrameKind, Header as WireHeader, Limits, SegKind};
use rkyv::util::AlignedVec;
use std::cell::UnsafeCell;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const MAGIC: u64 = u64::from_le_bytes(*b"PRLWQ\0\0\x01");
const VERSION: u32 = 1;
const HEADER: usize = 4096;
const BLOCK_MAGIC: u32 = 0xB10C_B10C;
const ITEM_MAGIC: u32 = 0x17E4_17E4;
const BLOCK_HDR: u64 = 128;
const NHOLD: usize = 6;
const ITEM_PREFIX: u64 = 64;
/// Size classes: 4 per power of two from 4 KiB (at most 25 % slack), up to 2^44 bytes.
const NCLASS: usize = 4 * (44 - 12) + 4;
const MAX_PROCS: usize = 64;
/// Directions.
pub(crate) const QUESTIONS: usize = 0;
pub(crate) const ANSWERS: usize = 1;
/// Event indices: items readable per direction, then "room" (slots popped or blocks freed).
pub(crate) const EV_SPACE: usize = 2;

#[repr(C)]
struct Proc {
    pid: AtomicU32,
    handles: AtomicU32,
    start: AtomicU64,
}

#[repr(C)]
struct Header {
    magic: AtomicU64,
    version: AtomicU32,
    capacity: AtomicU32,
    uid: AtomicU32,
    owner_pid: AtomicU32,
    owner_start: AtomicU64,
    arena_off: AtomicU64,
    arena_len: AtomicU64,
    lock: UnsafeCell<libc::pthread_mutex_t>,
    closed: AtomicU32,
    shm_mode: AtomicU32,
    ev: [EventWords; 3],
    /// Per direction: (head, tail) counters; under the lock.
    dirs: [[AtomicU64; 2]; 2],
    asked: AtomicU64,
    answered: AtomicU64,
    bump: AtomicU64,
    /// Free-list heads per class: block offset + 1 (0: empty).
    free: [AtomicU64; NCLASS],
    procs: [Proc; MAX_PROCS],
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER);

#[repr(C)]
struct Holder {
    pid: AtomicU32,
    count: AtomicU32,
    start: AtomicU64,
}

#[repr(C)]
struct Block {
    magic: AtomicU32,
    class: AtomicU32,
    /// Queued items that refer to this block (its own item, and items referring to its tensors).
    queued: AtomicU32,
    /// 1 while on a free list.
    free: AtomicU32,
    used: AtomicU64,
    next: AtomicU64,
    holders: [Holder; NHOLD],
}

const _: () = assert!(std::mem::size_of::<Block>() == BLOCK_HDR as usize);

fn class_size(c: usize) -> u64 {
    let base = 1u64 << (12 + c / 4);
    base + (base / 4) * (c % 4) as u64
}

fn class_for(bytes: u64) -> Option<usize> {
    (0..NCLASS).find(|c| class_size(*c) >= bytes)
}

fn align64(n: u64) -> u64 {
    n.div_ceil(64) * 64
}

/// This process's start time (clock ticks since boot), to tell pids apart across reuse.
pub(crate) fn my_start() -> u64 {
    static START: OnceLock<u64> = OnceLock::new();
    *START.get_or_init(|| start_time(std::process::id()).unwrap_or(0))
}

fn start_time(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None; // a zombie holds nothing any more
    }
    fields.get(19)?.parse().ok()
}

/// True while process `pid` started at `start` is alive (SHQ-3).
pub(crate) fn alive(pid: u32, start: u64) -> bool {
    pid != 0 && start_time(pid).is_some_and(|s| start == 0 || s == start)
}

/// Payload address -> (block offset, used bytes, a lease of this process on it).
type LeaseMap = std::collections::BTreeMap<usize, (u64, u64, std::sync::Weak<Lease>)>;

/// A mapped queue segment.
pub(crate) struct Segment {
    base: *mut u8,
    len: usize,
    cap: u64,
    arena_off: u64,
    arena_len: u64,
    pub(crate) fd: OwnedFd,
    pid: u32,
    /// Events over the header's parking words.
    pub(crate) events: [Arc<Event>; 3],
    /// This process's leases by payload address: (block, bytes, lease), to recognise tensors
    /// that already live in the arena.
    leases: std::sync::Mutex<LeaseMap>,
}

// SAFETY: the mapping is shared memory reached only through atomics (header, block headers),
// through the robust mutex, and through payload copies into blocks that SHQ-5 gives to one
// thread at a time.
unsafe impl Send for Segment {}
// SAFETY: see above.
unsafe impl Sync for Segment {}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Segment({} slots, {} arena bytes)",
            self.cap, self.arena_len
        )
    }
}

struct Guard<'a> {
    seg: &'a Segment,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: we hold the lock (Guard exists only after a successful lock).
        unsafe { libc::pthread_mutex_unlock(self.seg.hdr().lock.get()) };
    }
}

impl Segment {
    /// Creates and initialises a segment (the queue's creator does this once, before sharing).
    pub(crate) fn create(name: &str, capacity: usize, arena: u64) -> Result<Arc<Segment>> {
        let cap = capacity.max(1) as u64;
        let arena_off = (HEADER as u64 + 2 * cap * 16).div_ceil(4096) * 4096;
        let total = arena_off + arena;
        let fd = sys::memfd(&format!("parallel-wq:{name}"), total as usize)?;
        let seg = Segment::map(fd, Some((cap, arena_off, arena)))?;
        Ok(Arc::new(seg))
    }

    /// Maps a segment received from its creator, checking its header (SHQ-4).
    pub(crate) fn open(fd: OwnedFd) -> Result<Arc<Segment>> {
        Ok(Arc::new(Segment::map(fd, None)?))
    }

    fn map(fd: OwnedFd, init: Option<(u64, u64, u64)>) -> Result<Segment> {
        // SAFETY: fstat into a zeroed struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(sys::last("workqueue", "fstat(queue memfd)"));
        }
        let len = st.st_size as usize;
        if len < HEADER {
            return Err(protocol(
                "workqueue",
                "queue segment smaller than its header",
            ));
        }
        // SAFETY: mapping a memfd of `len` bytes, shared; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(sys::last("workqueue", "mmap(queue memfd)"));
        }
        let base = p as *mut u8;
        // SAFETY: the header lies at the start of a mapping of at least HEADER bytes; all its
        // fields are atomics or the mutex (plain bytes until initialised).
        let hdr = unsafe { &*(base as *const Header) };
        if let Some((cap, arena_off, arena_len)) = init {
            Segment::init(hdr, cap, arena_off, arena_len)?;
        }
        let (cap, arena_off, arena_len) = (
            hdr.capacity.load(Ordering::SeqCst) as u64,
            hdr.arena_off.load(Ordering::SeqCst),
            hdr.arena_len.load(Ordering::SeqCst),
        );
        let bad = hdr.magic.load(Ordering::SeqCst) != MAGIC
            || hdr.version.load(Ordering::SeqCst) != VERSION
            || cap == 0
            || arena_off < HEADER as u64 + 2 * cap * 16
            || arena_off.checked_add(arena_len) != Some(len as u64);
        let events = std::array::from_fn(|i| {
            // SAFETY: the words are inside the header of this mapping, which the Segment keeps
            // mapped; the events live inside the Segment (or Arcs the Segment's holders keep
            // only while they hold the Segment).
            Arc::new(unsafe { Event::shared(&hdr.ev[i]) })
        });
        let seg = Segment {
            base,
            len,
            cap,
            arena_off,
            arena_len,
            fd,
            pid: std::process::id(),
            events,
            leases: Default::default(),
        };
        if bad {
            return Err(protocol(
                "workqueue",
                "the queue's shared memory has a foreign or corrupted header (another Parallel version?)",
            ));
        }
        Ok(seg)
    }

    fn init(hdr: &Header, cap: u64, arena_off: u64, arena_len: u64) -> Result<()> {
        hdr.capacity.store(cap as u32, Ordering::SeqCst);
        hdr.arena_off.store(arena_off, Ordering::SeqCst);
        hdr.arena_len.store(arena_len, Ordering::SeqCst);
        // SAFETY: plain libc calls on the fresh (zeroed) memfd mapping, before anyone else sees
        // it: a robust, process-shared mutex (SHQ-2).
        let rc = unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            libc::pthread_mutexattr_init(&mut attr);
            libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED);
            libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST);
            let rc = libc::pthread_mutex_init(hdr.lock.get(), &attr);
            libc::pthread_mutexattr_destroy(&mut attr);
            rc
        };
        if rc != 0 {
            return Err(Error::os(
                "workqueue",
                "pthread_mutex_init(robust, shared)",
                std::io::Error::from_raw_os_error(rc),
            ));
        }
        // SAFETY: plain syscall.
        hdr.uid.store(unsafe { libc::getuid() }, Ordering::SeqCst);
        hdr.owner_pid.store(std::process::id(), Ordering::SeqCst);
        hdr.owner_start.store(my_start(), Ordering::SeqCst);
        hdr.version.store(VERSION, Ordering::SeqCst);
        hdr.magic.store(MAGIC, Ordering::SeqCst);
        Ok(())
    }

    fn hdr(&self) -> &Header {
        // SAFETY: checked at map time: the header is inside the mapping, which we keep.
        unsafe { &*(self.base as *const Header) }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.cap as usize
    }

    pub(crate) fn owner(&self) -> (u32, u64) {
        let h = self.hdr();
        (
            h.owner_pid.load(Ordering::SeqCst),
            h.owner_start.load(Ordering::SeqCst),
        )
    }

    pub(crate) fn closed(&self) -> bool {
        self.hdr().closed.load(Ordering::SeqCst) != 0
    }
    pub(crate) fn close(&self) {
        self.hdr().closed.store(1, Ordering::SeqCst);
        for e in &self.events {
            e.notify();
        }
    }
    pub(crate) fn shm_mode(&self) -> bool {
        self.hdr().shm_mode.load(Ordering::SeqCst) != 0
    }
    pub(crate) fn set_shm_mode(&self) {
        self.hdr().shm_mode.store(1, Ordering::SeqCst);
    }
    pub(crate) fn count_written(&self, dir: usize, n: u64) {
        let h = self.hdr();
        let c = if dir == QUESTIONS {
            &h.asked
        } else {
            &h.answered
        };
        c.fetch_add(n, Ordering::SeqCst);
    }
    pub(crate) fn written(&self, dir: usize) -> u64 {
        let h = self.hdr();
        let c = if dir == QUESTIONS {
            &h.asked
        } else {
            &h.answered
        };
        c.load(Ordering::SeqCst)
    }

    /// Locks the robust mutex, repairing after a dead holder (SHQ-2).
    fn lock(&self, deadline: Deadline) -> Result<Guard<'_>> {
        loop {
            let slice = deadline.slice("workqueue", "the queue's lock")?;
            let mut now = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: valid pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut now) };
            let ns = now.tv_nsec as u64 + slice.subsec_nanos() as u64;
            let abs = libc::timespec {
                tv_sec: now.tv_sec
                    + slice.as_secs() as libc::time_t
                    + (ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (ns % 1_000_000_000) as libc::c_long,
            };
            // SAFETY: the mutex was initialised by the creator (checked magic) and lives in our
            // mapping.
            let rc = unsafe { libc::pthread_mutex_timedlock(self.hdr().lock.get(), &abs) };
            match rc {
                0 => return Ok(Guard { seg: self }),
                libc::EOWNERDEAD => {
                    // SAFETY: we hold the mutex; marking it consistent is the robust protocol.
                    unsafe { libc::pthread_mutex_consistent(self.hdr().lock.get()) };
                    let g = Guard { seg: self };
                    tracing::warn!(
                        "a process died holding a work queue's lock; repairing the queue"
                    );
                    self.repair(&g);
                    return Ok(g);
                }
                libc::ETIMEDOUT | libc::EINTR => continue,
                rc => {
                    return Err(Error::os(
                        "workqueue",
                        "locking the queue",
                        std::io::Error::from_raw_os_error(rc),
                    ));
                }
            }
        }
    }

    fn slot(&self, dir: usize, i: u64) -> (&AtomicU64, &AtomicU64) {
        let off = HEADER + ((dir as u64 * self.cap + i % self.cap) * 16) as usize;
        // SAFETY: the slot area (2 x cap x 16 bytes after the header) lies before arena_off,
        // checked at map time; u64 atomics are 8-aligned there.
        unsafe {
            let p = self.base.add(off) as *const AtomicU64;
            (&*p, &*p.add(1))
        }
    }

    /// The block header at arena offset `off`, if it lies in the arena (SHQ-4).
    fn block(&self, off: u64) -> Option<&Block> {
        if off % 64 != 0 || off.checked_add(BLOCK_HDR)? > self.arena_len {
            return None;
        }
        // SAFETY: bounds checked above; Block is all atomics.
        Some(unsafe { &*(self.base.add((self.arena_off + off) as usize) as *const Block) })
    }

    /// A checked block: magic, class, and extent inside the arena.
    fn valid_block(&self, off: u64) -> Option<(&Block, u64)> {
        let b = self.block(off)?;
        let c = b.class.load(Ordering::Relaxed) as usize;
        if b.magic.load(Ordering::Relaxed) != BLOCK_MAGIC || c >= NCLASS {
            return None;
        }
        let size = class_size(c);
        (off.checked_add(size)? <= self.arena_len).then_some((b, size))
    }

    fn payload(&self, off: u64) -> *mut u8 {
        // SAFETY: callers pass offsets of valid blocks (inside the arena).
        unsafe { self.base.add((self.arena_off + off + BLOCK_HDR) as usize) }
    }

    /// The (block, offset in its payload) references in the segment table of the item in block
    /// `off`, checked (SHQ-4); `None` when the item is malformed.
    fn item_refs(&self, off: u64) -> Option<Vec<(u64, u64)>> {
        let (b, size) = self.valid_block(off)?;
        let used = b.used.load(Ordering::Relaxed).min(size - BLOCK_HDR);
        let p = self.payload(off);
        // SAFETY: the block is valid and at least `used` bytes long; we read the prefix and the
        // table only after checking they lie inside `used`.
        let (magic, nseg) = unsafe {
            if used < ITEM_PREFIX {
                return None;
            }
            (
                std::ptr::read_unaligned(p as *const u32),
                std::ptr::read_unaligned(p.add(4) as *const u32) as u64,
            )
        };
        if magic != ITEM_MAGIC || ITEM_PREFIX + nseg.checked_mul(16)? > used {
            return None;
        }
        let mut refs = Vec::new();
        for i in 0..nseg {
            // SAFETY: entry i lies inside the table (checked above).
            let (blk, at) = unsafe {
                let e = p.add((ITEM_PREFIX + 16 * i) as usize);
                (
                    std::ptr::read_unaligned(e as *const u64),
                    std::ptr::read_unaligned(e.add(8) as *const u64),
                )
            };
            if blk != 0 {
                refs.push((blk - 1, at));
            }
        }
        Some(refs)
    }

    /// Rebuilds queued counts, holds and free lists from the slots and the blocks (SHQ-2,
    /// SHQ-3). Runs under the lock.
    fn repair(&self, _g: &Guard<'_>) {
        let h = self.hdr();
        let mut queued: std::collections::HashMap<u64, u32> = std::collections::HashMap::new();
        for dir in 0..2 {
            let (head, tail) = (
                h.dirs[dir][0].load(Ordering::Relaxed),
                h.dirs[dir][1].load(Ordering::Relaxed),
            );
            if tail < head || tail - head > self.cap {
                tracing::error!("work queue ring indices corrupted; dropping its items");
                h.dirs[dir][0].store(tail, Ordering::Relaxed);
                continue;
            }
            for i in head..tail {
                let off = self.slot(dir, i).0.load(Ordering::Relaxed);
                *queued.entry(off).or_default() += 1;
                for (r, _) in self.item_refs(off).unwrap_or_default() {
                    *queued.entry(r).or_default() += 1;
                }
            }
        }
        for f in &h.free {
            f.store(0, Ordering::Relaxed);
        }
        let mut live: std::collections::HashMap<(u32, u64), bool> =
            std::collections::HashMap::new();
        let bump = h.bump.load(Ordering::Relaxed).min(self.arena_len);
        let (mut off, mut reclaimed) = (0, 0u64);
        while off < bump {
            let Some((b, size)) = self.valid_block(off) else {
                tracing::error!(
                    "work queue arena corrupted at {off}; abandoning the blocks after it"
                );
                h.bump.store(off, Ordering::Relaxed);
                break;
            };
            let mut held = false;
            for hd in &b.holders {
                let key = (
                    hd.pid.load(Ordering::Relaxed),
                    hd.start.load(Ordering::Relaxed),
                );
                if key.0 == 0 {
                    continue;
                }
                if *live.entry(key).or_insert_with(|| alive(key.0, key.1)) {
                    held = true;
                } else {
                    hd.count.store(0, Ordering::Relaxed);
                    hd.pid.store(0, Ordering::Relaxed);
                    reclaimed += size;
                }
            }
            let q = queued.get(&off).copied().unwrap_or(0);
            b.queued.store(q, Ordering::Relaxed);
            if !held && q == 0 {
                self.push_free(off, b);
            } else {
                b.free.store(0, Ordering::Relaxed);
            }
            off += size;
        }
        for p in &h.procs {
            let pid = p.pid.load(Ordering::Relaxed);
            if pid != 0 && !alive(pid, p.start.load(Ordering::Relaxed)) {
                p.pid.store(0, Ordering::Relaxed);
            }
        }
        if reclaimed > 0 {
            tracing::info!(
                "work queue: dropped holds of processes that died ({reclaimed} bytes of blocks)"
            );
        }
    }

    fn push_free(&self, off: u64, b: &Block) {
        let h = self.hdr();
        let c = b.class.load(Ordering::Relaxed) as usize;
        b.free.store(1, Ordering::Relaxed);
        b.next
            .store(h.free[c].load(Ordering::Relaxed), Ordering::Relaxed);
        h.free[c].store(off + 1, Ordering::Relaxed); // commit
    }

    /// Adds one hold of this process on a block (under the lock).
    fn hold_locked(&self, b: &Block) -> Result<()> {
        let me = (self.pid, my_start());
        let mut empty = None;
        for hd in &b.holders {
            let pid = hd.pid.load(Ordering::Relaxed);
            if pid == me.0 && hd.start.load(Ordering::Relaxed) == me.1 {
                hd.count.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            if pid == 0 && empty.is_none() {
                empty = Some(hd);
            }
        }
        let hd = empty.ok_or_else(|| {
            Error::new(
                ErrorKind::Resource,
                "workqueue",
                format!("more than {NHOLD} processes hold tensors of one queue block"),
            )
        })?;
        hd.count.store(1, Ordering::Relaxed);
        hd.start.store(me.1, Ordering::Relaxed);
        hd.pid.store(me.0, Ordering::Relaxed);
        Ok(())
    }

    fn unheld(b: &Block) -> bool {
        b.holders
            .iter()
            .all(|hd| hd.pid.load(Ordering::Relaxed) == 0)
    }

    /// Drops one hold of this process; frees the block when nothing needs it (under the lock).
    fn release_locked(&self, off: u64, b: &Block) {
        let me = (self.pid, my_start());
        for hd in &b.holders {
            if hd.pid.load(Ordering::Relaxed) == me.0 && hd.start.load(Ordering::Relaxed) == me.1 {
                if hd.count.fetch_sub(1, Ordering::Relaxed) <= 1 {
                    hd.count.store(0, Ordering::Relaxed);
                    hd.pid.store(0, Ordering::Relaxed);
                }
                break;
            }
        }
        if Self::unheld(b)
            && b.queued.load(Ordering::Relaxed) == 0
            && b.free.load(Ordering::Relaxed) == 0
        {
            self.push_free(off, b);
        }
    }

    /// Allocates a block with room for `bytes` of payload, held by this process, under the
    /// lock; None when the arena is full.
    fn alloc_locked(&self, bytes: u64) -> Result<Option<u64>> {
        let need = bytes + BLOCK_HDR;
        let c = class_for(need)
            .filter(|c| class_size(*c) <= self.arena_len)
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Resource,
                    "write",
                    format!(
                        "an item of {bytes} bytes does not fit the queue's arena ({} bytes; raise PARALLEL_WORKQUEUE_ARENA)",
                        self.arena_len
                    ),
                )
            })?;
        let h = self.hdr();
        // Exact class first, then up to two classes larger (at most ~1.5x slack).
        for cc in c..(c + 3).min(NCLASS) {
            let head = h.free[cc].load(Ordering::Relaxed);
            if head == 0 {
                continue;
            }
            let off = head - 1;
            let Some((b, _)) = self.valid_block(off).filter(|(b, _)| {
                b.class.load(Ordering::Relaxed) as usize == cc
                    && b.free.load(Ordering::Relaxed) == 1
            }) else {
                // SHQ-4: a corrupted free list is dropped, not followed; repair rebuilds it.
                h.free[cc].store(0, Ordering::Relaxed);
                continue;
            };
            h.free[cc].store(b.next.load(Ordering::Relaxed), Ordering::Relaxed); // commit
            self.claim(b, bytes)?;
            return Ok(Some(off));
        }
        let bump = h.bump.load(Ordering::Relaxed);
        let size = class_size(c);
        if bump.checked_add(size).is_some_and(|e| e <= self.arena_len) {
            let b = self.block(bump).expect("inside the arena");
            b.magic.store(BLOCK_MAGIC, Ordering::Relaxed);
            b.class.store(c as u32, Ordering::Relaxed);
            self.claim(b, bytes)?;
            h.bump.store(bump + size, Ordering::Relaxed); // commit (SHQ-2)
            return Ok(Some(bump));
        }
        Ok(None)
    }

    fn claim(&self, b: &Block, bytes: u64) -> Result<()> {
        b.free.store(0, Ordering::Relaxed);
        b.queued.store(0, Ordering::Relaxed);
        b.used.store(bytes, Ordering::Relaxed);
        for hd in &b.holders {
            hd.pid.store(0, Ordering::Relaxed);
            hd.count.store(0, Ordering::Relaxed);
        }
        self.hold_locked(b)
    }

    /// Allocates a block for `bytes`, waiting for readers to free blocks until the deadline.
    fn alloc(&self, bytes: u64, deadline: Deadline) -> Result<u64> {
        let mut repaired = false;
        let mut got = None;
        self.events[EV_SPACE].wait_until(
            deadline,
            Duration::ZERO,
            "write",
            "room in the queue's shared arena (readers still hold earlier items; raise PARALLEL_WORKQUEUE_ARENA)",
            || {
                let g = self.lock(deadline)?;
                got = self.alloc_locked(bytes)?;
                if got.is_none() && !repaired {
                    repaired = true;
                    self.repair(&g);
                    got = self.alloc_locked(bytes)?;
                }
                Ok(got.is_some())
            },
        )?;
        Ok(got.expect("ready means a block"))
    }

    /// Drops one hold of this process on a block.
    fn release(&self, off: u64) {
        let Ok(g) = self.lock(Deadline::after(Duration::from_secs(30))) else {
            tracing::error!(
                "could not lock a work queue to release a block; repair will reclaim it"
            );
            return;
        };
        if let Some((b, _)) = self.valid_block(off) {
            self.release_locked(off, b);
        }
        drop(g);
        self.events[EV_SPACE].notify();
    }

    /// A lease for a hold this process just took on block `off`, registered by address.
    fn lease(self: &Arc<Self>, off: u64) -> Arc<Lease> {
        let l = Arc::new(Lease {
            seg: self.clone(),
            off,
        });
        if let Some((b, _)) = self.valid_block(off) {
            let start = self.payload(off) as usize;
            let used = b.used.load(Ordering::Relaxed);
            let mut g = self.leases.lock().unwrap_or_else(|e| e.into_inner());
            g.insert(start, (off, used, Arc::downgrade(&l)));
        }
        l
    }

    /// The lease and offset of an arena range this process holds, if `[p, p + len)` is one.
    fn find_lease(&self, p: usize, len: usize) -> Option<(Arc<Lease>, u64)> {
        let g = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let (start, (_off, used, weak)) = g.range(..=p).next_back()?;
        let at = (p - start) as u64;
        if at + len as u64 > *used {
            return None;
        }
        Some((weak.upgrade()?, at))
    }

    /// A contiguous tensor allocated in the arena: writing it to the queue passes it by
    /// reference (no copy), and readers in any process view the same memory.
    pub(crate) fn empty_tensor(
        self: &Arc<Self>,
        dtype: crate::DType,
        shape: Vec<usize>,
        deadline: Deadline,
    ) -> Result<Tensor> {
        let bytes = crate::value::byte_len(dtype, &shape)?;
        let off = self.alloc(bytes.max(1), deadline)?;
        let lease = self.lease(off);
        let keep: Arc<dyn std::any::Any + Send + Sync> = lease;
        // SAFETY: `off` is a fresh arena allocation of at least `bytes` bytes, host memory mapped
        // for as long as the lease (`keep`) lives; the tensor is contiguous over exactly `bytes`.
        Ok(unsafe {
            Tensor::from_raw(
                dtype,
                shape,
                None,
                crate::Device::Cpu,
                self.payload(off),
                bytes as usize,
                keep,
            )
        })
    }

    /// Encodes `items` into blocks and appends them to direction `dir`, adjacent and in order.
    /// Segments that already live in the arena travel by reference.
    pub(crate) fn push(
        self: &Arc<Self>,
        dir: usize,
        items: &[Value],
        deadline: Deadline,
    ) -> Result<()> {
        let limits = Limits::from_config();
        let mut blocks = Vec::with_capacity(items.len());
        let mut pinned = Vec::new(); // leases of referenced blocks, held until published
        let r = (|| {
            for v in items {
                let enc = wire::encode(v, &limits)?;
                let mut refs = Vec::with_capacity(enc.segs.len());
                let mut inline: u64 = 0;
                for s in &enc.segs {
                    let b = s.bytes();
                    match self
                        .find_lease(b.as_ptr() as usize, b.len())
                        .filter(|_| !b.is_empty())
                    {
                        Some((lease, at)) => {
                            refs.push(Some((lease.off, at)));
                            pinned.push(lease);
                        }
                        None => {
                            refs.push(None);
                            inline += align64(b.len() as u64);
                        }
                    }
                }
                let table = align64(16 * enc.segs.len() as u64);
                let bytes = ITEM_PREFIX + table + align64(enc.desc.len() as u64) + inline;
                let off = self.alloc(bytes, deadline)?;
                blocks.push((
                    off,
                    refs.iter().flatten().map(|(o, _)| *o).collect::<Vec<_>>(),
                ));
                self.write_item(off, &enc, &refs);
            }
            self.publish(dir, &blocks, deadline)
        })();
        if r.is_err() {
            for (off, _) in blocks {
                self.release(off);
            }
        }
        drop(pinned);
        r
    }

    /// Copies an encoded item into its block (outside the lock: only we hold the fresh block,
    /// SHQ-5). `refs[i]` names the arena block holding segment i, when it is not copied.
    fn write_item(&self, off: u64, enc: &wire::Encoded<'_>, refs: &[Option<(u64, u64)>]) {
        let p = self.payload(off);
        let mut prefix = [0u8; ITEM_PREFIX as usize];
        prefix[0..4].copy_from_slice(&ITEM_MAGIC.to_le_bytes());
        prefix[4..8].copy_from_slice(&(enc.segs.len() as u32).to_le_bytes());
        prefix[8..12].copy_from_slice(&(enc.desc.len() as u32).to_le_bytes());
        prefix[16..24].copy_from_slice(&enc.payload_len.to_le_bytes());
        let mut at = ITEM_PREFIX + align64(16 * enc.segs.len() as u64);
        // SAFETY: the block was allocated for exactly this layout (push's `bytes`), it lies in
        // the arena, and only we hold it until it is published (SHQ-5).
        unsafe {
            std::ptr::copy_nonoverlapping(prefix.as_ptr(), p, prefix.len());
            for (i, r) in refs.iter().enumerate() {
                let e = p.add((ITEM_PREFIX + 16 * i as u64) as usize);
                let (blk, within) = r.map_or((0, 0), |(b, a)| (b + 1, a));
                std::ptr::write_unaligned(e as *mut u64, blk);
                std::ptr::write_unaligned(e.add(8) as *mut u64, within);
            }
            std::ptr::copy_nonoverlapping(enc.desc.as_ptr(), p.add(at as usize), enc.desc.len());
            at += align64(enc.desc.len() as u64);
            for (s, r) in enc.segs.iter().zip(refs) {
                if r.is_some() {
                    continue;
                }
                let b = s.bytes();
                std::ptr::copy_nonoverlapping(b.as_ptr(), p.add(at as usize), b.len());
                at += align64(b.len() as u64);
            }
        }
    }

    /// Appends item blocks (with the blocks they refer to) to direction `dir` under the lock.
    fn publish(&self, dir: usize, blocks: &[(u64, Vec<u64>)], deadline: Deadline) -> Result<()> {
        if blocks.len() as u64 > self.cap {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "write",
                format!(
                    "{} items cannot be written at once into a queue of capacity {}",
                    blocks.len(),
                    self.cap
                ),
            ));
        }
        let h = self.hdr();
        self.events[EV_SPACE].wait_until(
            deadline,
            Duration::ZERO,
            "write",
            "room in the queue (readers are slower than writers; raise PARALLEL_WORKQUEUE_CAPACITY or read faster)",
            || {
                let _g = self.lock(deadline)?;
                let (head, tail) = (
                    h.dirs[dir][0].load(Ordering::Relaxed),
                    h.dirs[dir][1].load(Ordering::Relaxed),
                );
                if tail.wrapping_sub(head) + blocks.len() as u64 > self.cap {
                    return Ok(false);
                }
                for (i, (off, refs)) in blocks.iter().enumerate() {
                    let (o, l) = self.slot(dir, tail + i as u64);
                    o.store(*off, Ordering::Relaxed);
                    l.store(0, Ordering::Relaxed);
                    for r in std::iter::once(off).chain(refs) {
                        if let Some(b) = self.block(*r) {
                            b.queued.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                h.dirs[dir][1].store(tail + blocks.len() as u64, Ordering::Relaxed); // commit
                for (off, _) in blocks {
                    if let Some((b, _)) = self.valid_block(*off) {
                        self.release_locked(*off, b); // the writer's hold; the slot keeps it
                    }
                }
                Ok(true)
            },
        )?;
        self.events[dir].notify();
        Ok(())
    }

    /// Items queued in direction `dir`.
    pub(crate) fn len(&self, dir: usize) -> usize {
        let h = self.hdr();
        h.dirs[dir][1]
            .load(Ordering::Relaxed)
            .wrapping_sub(h.dirs[dir][0].load(Ordering::Relaxed))
            .min(self.cap) as usize
    }

    /// Takes the oldest item of `dir`, if any, and decodes it (tensors view the arena).
    pub(crate) fn try_pop(
        self: &Arc<Self>,
        dir: usize,
        deadline: Deadline,
    ) -> Result<Option<Value>> {
        if self.len(dir) == 0 {
            return Ok(None);
        }
        let h = self.hdr();
        let (off, refs) = {
            let _g = self.lock(deadline)?;
            let (head, tail) = (
                h.dirs[dir][0].load(Ordering::Relaxed),
                h.dirs[dir][1].load(Ordering::Relaxed),
            );
            if head == tail {
                return Ok(None);
            }
            let off = self.slot(dir, head).0.load(Ordering::Relaxed);
            h.dirs[dir][0].store(head + 1, Ordering::Relaxed); // commit
            let refs = self.item_refs(off);
            let mut held = Vec::new();
            for r in std::iter::once(off).chain(refs.iter().flatten().map(|(b, _)| *b)) {
                let Some((b, _)) = self.valid_block(r) else {
                    continue;
                };
                self.hold_locked(b)?;
                b.queued.fetch_sub(1, Ordering::Relaxed);
                held.push(r);
            }
            let Some(refs) = refs else {
                for r in held {
                    if let Some((b, _)) = self.valid_block(r) {
                        self.release_locked(r, b);
                    }
                }
                return Err(protocol(
                    "read",
                    format!("queue slot names a bad item at {off}"),
                ));
            };
            (off, refs)
        };
        self.events[EV_SPACE].notify();
        let item = self.lease(off);
        let mut ref_leases = std::collections::HashMap::new();
        for (b, _) in &refs {
            ref_leases.entry(*b).or_insert_with(|| self.lease(*b));
        }
        // Holds taken once per reference: drop the duplicates' extra holds.
        let extra = refs.len() - ref_leases.len();
        let dups: Vec<u64> = {
            let mut seen = std::collections::HashSet::new();
            refs.iter()
                .filter(|(b, _)| !seen.insert(*b))
                .map(|(b, _)| *b)
                .collect()
        };
        debug_assert_eq!(dups.len(), extra);
        for b in dups {
            self.release(b);
        }
        self.decode(item, &ref_leases).map(Some)
    }

    /// Decodes the item in a held block (SHQ-4).
    fn decode(
        &self,
        lease: Arc<Lease>,
        refs: &std::collections::HashMap<u64, Arc<Lease>>,
    ) -> Result<Value> {
        let (b, size) = self
            .valid_block(lease.off)
            .ok_or_else(|| protocol("read", "queue block vanished"))?;
        let room = size - BLOCK_HDR;
        let used = b.used.load(Ordering::Relaxed).min(room);
        let p = self.payload(lease.off);
        let mut prefix = [0u8; ITEM_PREFIX as usize];
        if used < ITEM_PREFIX {
            return Err(protocol("read", "queue item too short"));
        }
        // SAFETY: the block is held by us and holds at least ITEM_PREFIX bytes (checked above).
        unsafe { std::ptr::copy_nonoverlapping(p, prefix.as_mut_ptr(), prefix.len()) };
        let rd32 = |i: usize| u32::from_le_bytes(prefix[i..i + 4].try_into().expect("4 bytes"));
        let (nseg, desc_len) = (rd32(4), rd32(8));
        let payload_len = u64::from_le_bytes(prefix[16..24].try_into().expect("8 bytes"));
        let table = align64(16 * nseg as u64);
        let desc_at = ITEM_PREFIX + table;
        if rd32(0) != ITEM_MAGIC || desc_at + align64(desc_len as u64) > used {
            return Err(protocol("read", "queue item has a corrupted prefix"));
        }
        let mut desc = AlignedVec::<16>::with_capacity(desc_len as usize);
        // SAFETY: desc_len bytes at desc_at lie inside `used` (checked above).
        desc.extend_from_slice(unsafe {
            std::slice::from_raw_parts(p.add(desc_at as usize), desc_len as usize)
        });
        let limits = Limits::from_config();
        let hdr = WireHeader {
            kind: FrameKind::Message,
            flags: 0,
            desc_len,
            nseg,
            payload_len,
            seq: 0,
        };
        let d = wire::access_descriptor(&desc)?;
        let segs = wire::check_descriptor(d, &hdr, &limits)?;
        let mut at = desc_at + align64(desc_len as u64);
        let mut filled = Vec::with_capacity(segs.len());
        let mut tensors = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            // SAFETY: entry i lies inside the table, which lies inside `used` (checked above).
            let (blk, within) = unsafe {
                let e = p.add((ITEM_PREFIX + 16 * i as u64) as usize);
                (
                    std::ptr::read_unaligned(e as *const u64),
                    std::ptr::read_unaligned(e.add(8) as *const u64),
                )
            };
            let (src, keep): (*mut u8, Arc<dyn std::any::Any + Send + Sync>) = if blk == 0 {
                if at.checked_add(s.len).is_none_or(|e| e > used) {
                    return Err(protocol("read", "queue item segments overrun their block"));
                }
                // SAFETY: [at, at + len) lies inside the block's used bytes (checked above).
                let src = unsafe { p.add(at as usize) };
                at += align64(s.len);
                (src, lease.clone())
            } else {
                let l = refs.get(&(blk - 1)).ok_or_else(|| {
                    protocol("read", "queue item refers to a block it does not hold")
                })?;
                let (rb, rsize) = self
                    .valid_block(l.off)
                    .ok_or_else(|| protocol("read", "queue item refers to a bad block"))?;
                let rused = rb.used.load(Ordering::Relaxed).min(rsize - BLOCK_HDR);
                if within.checked_add(s.len).is_none_or(|e| e > rused) {
                    return Err(protocol("read", "queue item reference overruns its block"));
                }
                // SAFETY: [within, within + len) lies inside the referenced block (checked).
                (
                    unsafe { self.payload(l.off).add(within as usize) },
                    l.clone(),
                )
            };
            match &s.kind {
                SegKind::Tensor { dtype, shape, .. } => {
                    // SAFETY: [src, src + s.len) lies inside the referenced block (checked above),
                    // kept mapped by the lease in `keep`; s.len is the segment's checked
                    // numel * itemsize (check_descriptor), so the contiguous view stays inside it.
                    tensors.push(Some(unsafe {
                        Tensor::from_raw(
                            *dtype,
                            shape.clone(),
                            None,
                            // The arena is host memory, whatever device the writer named.
                            crate::Device::Cpu,
                            src,
                            s.len as usize,
                            keep,
                        )
                    }));
                    filled.push(wire::Filled::Out(tensors.len() - 1));
                }
                _ => {
                    let mut buf = crate::buffer::Buf::with_len(s.len as usize)?;
                    // SAFETY: in bounds (checked above); buf has s.len bytes.
                    unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), s.len as usize) };
                    filled.push(wire::Filled::Buf(buf));
                }
            }
        }
        let mut v = wire::build_value(d, &segs, filled)?;
        place_tensors(&mut v, &mut tensors);
        Ok(v)
    }

    /// Registers one more handle of this process on the queue (for end-of-queue accounting).
    pub(crate) fn attach(&self, deadline: Deadline) -> Result<()> {
        let _g = self.lock(deadline)?;
        let h = self.hdr();
        for p in &h.procs {
            if p.pid.load(Ordering::Relaxed) == self.pid {
                p.handles.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
        }
        for p in &h.procs {
            let pid = p.pid.load(Ordering::Relaxed);
            if pid == 0 || !alive(pid, p.start.load(Ordering::Relaxed)) {
                p.handles.store(1, Ordering::Relaxed);
                p.start.store(my_start(), Ordering::Relaxed);
                p.pid.store(self.pid, Ordering::Relaxed);
                return Ok(());
            }
        }
        Err(Error::new(
            ErrorKind::Resource,
            "workqueue",
            format!("more than {MAX_PROCS} processes have this queue open"),
        ))
    }

    pub(crate) fn detach(&self) {
        if let Ok(_g) = self.lock(Deadline::after(Duration::from_secs(30))) {
            for p in &self.hdr().procs {
                if p.pid.load(Ordering::Relaxed) == self.pid {
                    if p.handles.fetch_sub(1, Ordering::Relaxed) <= 1 {
                        p.pid.store(0, Ordering::Relaxed);
                    }
                    break;
                }
            }
        }
        self.events[ANSWERS].notify();
    }

    /// Processes other than the owner's that have the queue open and are alive.
    pub(crate) fn remote_workers(&self, deadline: Deadline) -> Result<usize> {
        let _g = self.lock(deadline)?;
        let mut n = 0;
        for p in &self.hdr().procs {
            let pid = p.pid.load(Ordering::Relaxed);
            if pid == 0 {
                continue;
            }
            if alive(pid, p.start.load(Ordering::Relaxed)) {
                n += 1;
            } else {
                p.pid.store(0, Ordering::Relaxed);
            }
        }
        Ok(n)
    }

    /// Test hook for SHQ-2: takes the lock and kills this process with SIGKILL while holding it.
    #[doc(hidden)]
    pub(crate) fn die_holding_lock(&self) -> ! {
        let g = self.lock(Deadline::after(Duration::from_secs(30)));
        std::mem::forget(g);
        // SAFETY: plain syscalls; SIGKILL cannot be caught, so the process ends here.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort()
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what we mapped; no Lease outlives its Segment (it holds one).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}

/// A block this process holds; tensors that view it keep it alive.
struct Lease {
    seg: Arc<Segment>,
    off: u64,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.seg.release(self.off);
        let mut g = self.seg.leases.lock().unwrap_or_else(|e| e.into_inner());
        g.retain(|_, (_, _, w)| w.strong_count() > 0);
    }
}

/// Replaces `Value::Out(i)` placeholders with the tensors viewing the block.
fn place_tensors(v: &mut Value, tensors: &mut [Option<Tensor>]) {
    match v {
        Value::Out(i) => {
            if let Some(t) = tensors.get_mut(*i).and_then(Option::take) {
                *v = Value::Tensor(t);
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            items.iter_mut().for_each(|x| place_tensors(x, tensors))
        }
        Value::Dict(items) => items
            .iter_mut()
            .for_each(|(_, x): &mut (Key, Value)| place_tensors(x, tensors)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dl(s: u64) -> Deadline {
        Deadline::after(Duration::from_secs(s))
    }

    #[test]
    fn shq_classes_cover_sizes_with_bounded_slack() {
        for bytes in [1u64, 4096, 4097, 5000, 1 << 20, (64 << 20) + 4096, 3 << 30] {
            let c = class_for(bytes).unwrap();
            assert!(class_size(c) >= bytes);
            assert!(
                class_size(c) as f64 <= (bytes.max(4096) as f64) * 1.26,
                "{bytes}"
            );
        }
    }

    #[test]
    fn shq_4_items_round_trip_and_tensors_view_the_block() {
        let seg = Segment::create("t", 4, 16 << 20).unwrap();
        let t = Tensor::from_bytes(crate::DType::I32, vec![2, 2], (0..16u8).collect()).unwrap();
        let v = Value::List(vec![
            Value::str("a"),
            Value::Tensor(t),
            Value::bytes(*b"xyz"),
        ]);
        seg.push(QUESTIONS, &[v, Value::Int(7)], dl(5)).unwrap();
        assert_eq!(seg.len(QUESTIONS), 2);
        let got = seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap();
        let Value::List(items) = &got else { panic!() };
        let tt = items[1].as_tensor().unwrap();
        assert!(matches!(
            tt.storage(),
            crate::value::Storage::Foreign { .. }
        ));
        assert_eq!(tt.bytes().unwrap(), &(0..16u8).collect::<Vec<_>>()[..]);
        let arena = seg.base as usize + seg.arena_off as usize;
        assert!(
            (tt.data_ptr() as usize) > arena,
            "the tensor views the arena"
        );
        assert_eq!(
            seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap().as_int(),
            Some(7)
        );
        assert!(seg.try_pop(QUESTIONS, dl(5)).unwrap().is_none());
        // The tensor's block returns to the free list once the value is dropped, and is reused.
        let first = tt.data_ptr();
        drop(got);
        let t2 = Tensor::from_bytes(crate::DType::I32, vec![2, 2], vec![1; 16]).unwrap();
        seg.push(
            ANSWERS,
            &[Value::List(vec![
                Value::str("b"),
                Value::Tensor(t2),
                Value::bytes(*b"q"),
            ])],
            dl(5),
        )
        .unwrap();
        let again = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
        let Value::List(items) = &again else { panic!() };
        assert_eq!(
            items[1].as_tensor().unwrap().data_ptr(),
            first,
            "block reused"
        );
    }

    #[test]
    fn shq_2_back_pressure_on_a_full_arena_times_out() {
        let seg = Segment::create("full", 8, 1 << 20).unwrap();
        let big = Tensor::from_bytes(crate::DType::U8, vec![600_000], vec![0; 600_000]).unwrap();
        seg.push(ANSWERS, &[Value::Tensor(big)], dl(5)).unwrap();
        let held = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
        let big = Tensor::from_bytes(crate::DType::U8, vec![600_000], vec![0; 600_000]).unwrap();
        let e = seg
            .push(
                ANSWERS,
                &[Value::Tensor(big)],
                Deadline::after(Duration::from_millis(200)),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        drop(held);
        let big = Tensor::from_bytes(crate::DType::U8, vec![600_000], vec![0; 600_000]).unwrap();
        seg.push(ANSWERS, &[Value::Tensor(big)], dl(5)).unwrap();
    }

    #[test]
    fn shq_3_repair_reclaims_blocks_of_dead_holders() {
        let seg = Segment::create("repair", 4, 1 << 20).unwrap();
        let off = {
            let _g = seg.lock(dl(5)).unwrap();
            seg.alloc_locked(100_000).unwrap().unwrap()
        };
        // Pretend a process that no longer exists holds it.
        let b = seg.block(off).unwrap();
        b.holders[0].pid.store(u32::MAX - 1, Ordering::Relaxed);
        let g = seg.lock(dl(5)).unwrap();
        seg.repair(&g);
        let again = seg.alloc_locked(100_000).unwrap().unwrap();
        assert_eq!(again, off, "the dead holder's block was reclaimed");
    }

    #[test]
    fn shq_arena_tensors_travel_by_reference_and_live_while_needed() {
        let seg = Segment::create("byref", 4, 8 << 20).unwrap();
        let mut t = seg
            .empty_tensor(crate::DType::U8, vec![1 << 20], dl(5))
            .unwrap();
        let ptr = t.data_mut_ptr();
        // SAFETY: the tensor owns 1 MiB at ptr.
        unsafe { std::ptr::write_bytes(ptr, 7, 1 << 20) };
        seg.push(QUESTIONS, &[Value::Tensor(t)], dl(5)).unwrap();
        // The writer dropped its tensor; the queued item keeps the block.
        let got = seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap();
        let gt = got.as_tensor().unwrap();
        assert_eq!(
            gt.data_ptr(),
            ptr as *const u8,
            "no copy: the reader views the same block"
        );
        assert!(gt.bytes().unwrap().iter().all(|b| *b == 7));
        // Forwarding a received tensor is by reference too.
        seg.push(ANSWERS, &[got], dl(5)).unwrap();
        let back = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
        assert_eq!(back.as_tensor().unwrap().data_ptr(), ptr as *const u8);
        drop(back);
        // Everything released: the 1 MiB block is reused by the next allocation of its class.
        let t2 = seg
            .empty_tensor(crate::DType::U8, vec![1 << 20], dl(5))
            .unwrap();
        assert_eq!(t2.data_ptr(), ptr as *const u8);
    }
}

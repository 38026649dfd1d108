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
//! - SHQ-2 (never left locked): the lock is robust. When its holder dies, the next locker sees a
//!   dead pid in the lock word, takes the lock over and runs [`Segment::repair`], which rebuilds the free lists
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
//! - SHQ-7 (no pointer in shared memory): the lock is one futex word holding the holder's pid
//!   (`CONTENDED` set while someone waits), not a pthread robust mutex: glibc keeps the robust
//!   list's pointers inside the mutex and writes through them on unlock, so any process that can
//!   write the segment could make the others write where it chose. Garbage in the word costs a
//!   wait (until the deadline, if it names a live process) or a take-over and a repair.
//! - SHQ-5: critical sections are short (index and free-list updates); payload copies run
//!   outside the lock, into a fresh block only its writer holds.
//! - SHQ-6 (a process cannot crash the others): the memfd's size is sealed once set
//!   (`sys::memfd`, SEAL-1) and every process checks the seals before it maps (SEAL-2), so no one
//!   can shrink the file under the others' mappings (SIGBUS). The ring counters are checked
//!   (`indices`) before use: counters more than `capacity` apart are a protocol error for every
//!   reader and writer of the queue, never an out-of-bounds slot or a wait for items that do not
//!   exist.
//!
//! Files: this one (layout, mapping, the segment), `lock.rs` (the futex-word lock), `arena.rs`
//! (blocks, holders, repair, leases), `items.rs` (encode, publish, pop, decode), `procs.rs`
//! (attached processes and question accounting).

mod arena;
mod items;
mod lock;
mod procs;
#[cfg(test)]
mod tests;

#[allow(unused_imports)] // each brings what the others call; not every file uses every item
use {arena::*, items::*, lock::*, procs::*};

use super::event::{Event, EventWords};
use crate::sys;
use parallel_engine::error::{Error, ErrorKind, Result, protocol};
use parallel_engine::runtime::Deadline;
use parallel_engine::value::{Key, Tensor, Value};
use parallel_engine::wire::{self, FrameKind, Header as WireHeader, Limits, SegKind};
use rkyv::util::AlignedVec;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

const MAGIC: u64 = u64::from_le_bytes(*b"PRLWQ\0\0\x01");
const VERSION: u32 = 2; // 2: the futex-word lock (SHQ-7)
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
    /// 0: free; else the holder's pid, `CONTENDED` set while someone waits (SHQ-2, SHQ-7).
    lock: AtomicU32,
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
    /// Who holds which questions, for drain and lost-worker reports (WQA-*, host.rs).
    acct: Acct,
}

const _: () = assert!(std::mem::size_of::<Header>() <= HEADER);

/// Question accounting in the header. Per `procs` slot: questions the process took and has not
/// answered (`held`), and connections handed the memfd that have not attached yet (`pending`).
#[repr(C)]
struct Acct {
    /// Questions answered, or abandoned by a worker that closed or died (never answered).
    settled: AtomicU64,
    /// Worker processes found dead while holding questions, and the questions they held.
    lost_procs: AtomicU64,
    lost_questions: AtomicU64,
    last_lost_pid: AtomicU32,
    last_lost_held: AtomicU32,
    held: [AtomicU64; MAX_PROCS],
    pending: [AtomicU32; MAX_PROCS],
}

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
// through the lock word, and through payload copies into blocks that SHQ-5 gives to one
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
        // SHQ-6: a memfd whose size is sealed, so no process can shrink it under our mapping.
        let len = sys::check_sealed(fd.as_raw_fd(), None, "workqueue")?;
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
        // fields are atomics (plain bytes until initialised).
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
        hdr.lock.store(0, Ordering::SeqCst);
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

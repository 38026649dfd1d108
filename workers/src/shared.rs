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

/// Set in the lock word while a process waits for the lock (SHQ-7); pids stay below 2^22.
const CONTENDED: u32 = 1 << 31;

/// A futex operation on a word of the mapping; `Some(errno)` when it failed.
fn futex(w: &AtomicU32, op: libc::c_int, val: u32, timeout: Option<Duration>) -> Option<i32> {
    let ts = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs() as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let tp = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: FUTEX_WAIT/WAKE on a live, aligned u32 of our mapping (not private: the word is
    // shared between processes); the kernel only compares, sleeps and wakes.
    let rc = unsafe { libc::syscall(libc::SYS_futex, w.as_ptr(), op, val, tp) };
    (rc < 0).then(|| std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
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

struct Guard<'a> {
    seg: &'a Segment,
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let w = &self.seg.hdr().lock;
        if w.swap(0, Ordering::Release) & CONTENDED != 0 {
            futex(w, libc::FUTEX_WAKE, 1, None);
        }
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

    /// Takes the queue's lock, taking it over (and repairing) from a dead holder (SHQ-2, SHQ-7).
    fn lock(&self, deadline: Deadline) -> Result<Guard<'_>> {
        let w = &self.hdr().lock;
        let mut want = self.pid;
        for _ in 0..64 {
            if w.compare_exchange(0, want, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Ok(Guard { seg: self });
            }
            std::hint::spin_loop();
        }
        // From now on we may sleep: whoever holds the lock must wake a sleeper when it unlocks,
        // and we keep the mark when we get the lock (other sleepers may remain).
        want |= CONTENDED;
        loop {
            let cur = w.load(Ordering::Relaxed);
            if cur == 0 {
                if w.compare_exchange(0, want, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(Guard { seg: self });
                }
                continue;
            }
            if cur & CONTENDED == 0
                && w.compare_exchange(cur, cur | CONTENDED, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            let slice = deadline
                .slice("workqueue", "the queue's lock (another process holds it)")?
                .min(Duration::from_millis(10));
            if futex(w, libc::FUTEX_WAIT, cur | CONTENDED, Some(slice)) == Some(libc::ETIMEDOUT) {
                let holder = cur & !CONTENDED;
                if holder != self.pid
                    && !alive(holder, 0)
                    && w.compare_exchange(
                        cur | CONTENDED,
                        want,
                        Ordering::Acquire,
                        Ordering::Relaxed,
                    )
                    .is_ok()
                {
                    let g = Guard { seg: self };
                    tracing::warn!(
                        "process {holder} died holding a work queue's lock (or its lock word was overwritten); repairing the queue"
                    );
                    self.repair(&g);
                    return Ok(g);
                }
            }
        }
    }

    /// The (head, tail) counters of direction `dir`, checked (SHQ-4): at most `cap` items apart.
    /// Under the lock.
    fn indices(&self, dir: usize) -> Result<(u64, u64)> {
        let d = &self.hdr().dirs[dir];
        let (head, tail) = (d[0].load(Ordering::Relaxed), d[1].load(Ordering::Relaxed));
        if tail.wrapping_sub(head) > self.cap {
            return Err(protocol(
                "workqueue",
                format!(
                    "the queue's shared {} ring is corrupted (head {head}, tail {tail}, capacity {}): a process that has the queue open wrote into its shared memory; the queue cannot be used any more",
                    if dir == QUESTIONS {
                        "questions"
                    } else {
                        "answers"
                    },
                    self.cap
                ),
            ));
        }
        Ok((head, tail))
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
        for i in 0..MAX_PROCS {
            self.retire_if_dead_locked(i);
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
        dtype: parallel_engine::DType,
        shape: Vec<usize>,
        deadline: Deadline,
    ) -> Result<Tensor> {
        let bytes = parallel_engine::value::byte_len(dtype, &shape)?;
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
                parallel_engine::Device::Cpu,
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
                let (head, tail) = self.indices(dir)?;
                if tail.wrapping_sub(head) + blocks.len() as u64 > self.cap {
                    return Ok(false);
                }
                for (i, (off, refs)) in blocks.iter().enumerate() {
                    let (o, l) = self.slot(dir, tail.wrapping_add(i as u64));
                    o.store(*off, Ordering::Relaxed);
                    l.store(0, Ordering::Relaxed);
                    for r in std::iter::once(off).chain(refs) {
                        if let Some(b) = self.block(*r) {
                            b.queued.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                h.dirs[dir][1].store(tail.wrapping_add(blocks.len() as u64), Ordering::Relaxed); // commit
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

    /// Items queued in direction `dir` (a corrupted ring reads as full: its readers then see
    /// SHQ-4's error rather than waiting for items).
    pub(crate) fn len(&self, dir: usize) -> usize {
        self.raw_len(dir).min(self.cap) as usize
    }

    fn raw_len(&self, dir: usize) -> u64 {
        let h = self.hdr();
        h.dirs[dir][1]
            .load(Ordering::Relaxed)
            .wrapping_sub(h.dirs[dir][0].load(Ordering::Relaxed))
    }

    /// Takes the oldest item of `dir`, if any, and decodes it (tensors view the arena).
    pub(crate) fn try_pop(
        self: &Arc<Self>,
        dir: usize,
        deadline: Deadline,
    ) -> Result<Option<Value>> {
        if self.raw_len(dir) == 0 {
            return Ok(None);
        }
        let h = self.hdr();
        let (off, refs) = {
            let _g = self.lock(deadline)?;
            let (head, tail) = self.indices(dir)?;
            if head == tail {
                return Ok(None);
            }
            let off = self.slot(dir, head).0.load(Ordering::Relaxed);
            if dir == QUESTIONS {
                self.count_taken_locked(); // before the commit: a death in between over-reports
            }
            h.dirs[dir][0].store(head.wrapping_add(1), Ordering::Relaxed); // commit
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
                            parallel_engine::Device::Cpu,
                            src,
                            s.len as usize,
                            keep,
                        )
                    }));
                    filled.push(wire::Filled::Out(tensors.len() - 1));
                }
                _ => {
                    let mut buf = parallel_engine::buffer::Buf::with_len(s.len as usize)?;
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
        let i = self.proc_slot_locked(self.pid, my_start())?;
        let a = &self.hdr().acct;
        if a.pending[i].load(Ordering::Relaxed) > 0 {
            a.pending[i].fetch_sub(1, Ordering::Relaxed); // the listener's reservation (HQ-6)
        }
        self.hdr().procs[i].handles.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The `procs` slot of process `pid` (started at `start`), taking a free or dead one (whose
    /// questions are settled first, WQA-3) when it has none. Under the lock.
    fn proc_slot_locked(&self, pid: u32, start: u64) -> Result<usize> {
        let h = self.hdr();
        if let Some(i) = h
            .procs
            .iter()
            .position(|p| p.pid.load(Ordering::Relaxed) == pid)
        {
            return Ok(i);
        }
        for (i, p) in h.procs.iter().enumerate() {
            self.retire_if_dead_locked(i);
            if p.pid.load(Ordering::Relaxed) == 0 {
                p.handles.store(0, Ordering::Relaxed);
                h.acct.pending[i].store(0, Ordering::Relaxed);
                h.acct.held[i].store(0, Ordering::Relaxed);
                p.start.store(start, Ordering::Relaxed);
                p.pid.store(pid, Ordering::Relaxed);
                return Ok(i);
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
            let h = self.hdr();
            for (i, p) in h.procs.iter().enumerate() {
                if p.pid.load(Ordering::Relaxed) == self.pid {
                    if p.handles.fetch_sub(1, Ordering::Relaxed) <= 1
                        && h.acct.pending[i].load(Ordering::Relaxed) == 0
                    {
                        // Its handles settled what they held on close (WQA-2); any rest too.
                        let held = h.acct.held[i].swap(0, Ordering::Relaxed);
                        h.acct.settled.fetch_add(held, Ordering::SeqCst);
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
        for (i, p) in self.hdr().procs.iter().enumerate() {
            self.retire_if_dead_locked(i);
            if p.pid.load(Ordering::Relaxed) != 0 {
                n += 1;
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

/// Question accounting (WQA-*, see host.rs): who holds which questions, settled questions, and
/// worker processes that died holding some.
impl Segment {
    /// A process is being handed the memfd: it counts as an attached worker until it attaches
    /// or dies, so the owner's end of queue cannot pass it by (HQ-6).
    pub(crate) fn reserve(&self, pid: u32, deadline: Deadline) -> Result<()> {
        let Some(start) = start_time(pid) else {
            return Ok(()); // already gone: nothing to wait for
        };
        let _g = self.lock(deadline)?;
        let i = self.proc_slot_locked(pid, start)?;
        self.hdr().acct.pending[i].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Under the lock: this process took one question (WQA-1).
    fn count_taken_locked(&self) {
        let h = self.hdr();
        if let Some(i) = h
            .procs
            .iter()
            .position(|p| p.pid.load(Ordering::Relaxed) == self.pid)
        {
            h.acct.held[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// `n` questions are settled (answered, or abandoned by a closing handle); `remote`: they
    /// were held by this process's entry (a process other than the owner's) (WQA-2).
    pub(crate) fn settle(&self, n: u64, remote: bool) {
        if n == 0 {
            return;
        }
        let h = self.hdr();
        if remote
            && let Some(i) = h
                .procs
                .iter()
                .position(|p| p.pid.load(Ordering::Relaxed) == self.pid)
        {
            let _ = h.acct.held[i].fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| {
                Some(v.saturating_sub(n))
            });
        }
        h.acct.settled.fetch_add(n, Ordering::SeqCst);
        self.events[ANSWERS].notify();
    }

    /// Questions answered or abandoned so far (WQA-2).
    pub(crate) fn settled(&self) -> u64 {
        self.hdr().acct.settled.load(Ordering::SeqCst)
    }

    /// Under the lock: frees slot `i` if its process died, settling the questions it held and
    /// recording it as lost when it held any (WQA-3).
    fn retire_if_dead_locked(&self, i: usize) {
        let h = self.hdr();
        let p = &h.procs[i];
        let pid = p.pid.load(Ordering::Relaxed);
        if pid == 0 || alive(pid, p.start.load(Ordering::Relaxed)) {
            return;
        }
        let held = h.acct.held[i].swap(0, Ordering::Relaxed);
        h.acct.pending[i].store(0, Ordering::Relaxed);
        p.handles.store(0, Ordering::Relaxed);
        p.pid.store(0, Ordering::Relaxed);
        if held > 0 {
            h.acct.last_lost_pid.store(pid, Ordering::Relaxed);
            h.acct
                .last_lost_held
                .store(held.min(u32::MAX as u64) as u32, Ordering::Relaxed);
            h.acct.lost_questions.fetch_add(held, Ordering::Relaxed);
            h.acct.settled.fetch_add(held, Ordering::SeqCst);
            h.acct.lost_procs.fetch_add(1, Ordering::SeqCst);
            tracing::warn!(
                "work queue: worker process {pid} died holding {held} unanswered question(s)"
            );
        }
        self.events[ANSWERS].notify();
    }

    /// Worker processes lost so far, and the last one's pid and held questions (WQA-3).
    pub(crate) fn lost(&self) -> (u64, u32, u32) {
        let a = &self.hdr().acct;
        (
            a.lost_procs.load(Ordering::SeqCst),
            a.last_lost_pid.load(Ordering::SeqCst),
            a.last_lost_held.load(Ordering::SeqCst),
        )
    }

    /// Live worker processes with questions in hand: (pid, held, attaching), for error messages.
    pub(crate) fn holders(&self) -> Vec<(u32, u64, bool)> {
        let h = self.hdr();
        h.procs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let pid = p.pid.load(Ordering::Relaxed);
                let held = h.acct.held[i].load(Ordering::Relaxed);
                let attaching = p.handles.load(Ordering::Relaxed) == 0
                    && h.acct.pending[i].load(Ordering::Relaxed) > 0;
                (pid != 0).then_some((pid, held, attaching))
            })
            .collect()
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
        let t = Tensor::from_bytes(parallel_engine::DType::I32, vec![2, 2], (0..16u8).collect())
            .unwrap();
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
            parallel_engine::value::Storage::Foreign { .. }
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
        let t2 = Tensor::from_bytes(parallel_engine::DType::I32, vec![2, 2], vec![1; 16]).unwrap();
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
        let big = Tensor::from_bytes(parallel_engine::DType::U8, vec![600_000], vec![0; 600_000])
            .unwrap();
        seg.push(ANSWERS, &[Value::Tensor(big)], dl(5)).unwrap();
        let held = seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap();
        let big = Tensor::from_bytes(parallel_engine::DType::U8, vec![600_000], vec![0; 600_000])
            .unwrap();
        let e = seg
            .push(
                ANSWERS,
                &[Value::Tensor(big)],
                Deadline::after(Duration::from_millis(200)),
            )
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        drop(held);
        let big = Tensor::from_bytes(parallel_engine::DType::U8, vec![600_000], vec![0; 600_000])
            .unwrap();
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
            .empty_tensor(parallel_engine::DType::U8, vec![1 << 20], dl(5))
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
            .empty_tensor(parallel_engine::DType::U8, vec![1 << 20], dl(5))
            .unwrap();
        assert_eq!(t2.data_ptr(), ptr as *const u8);
    }

    #[test]
    fn shq_6_corrupt_ring_counters_are_a_protocol_error_not_a_crash() {
        let seg = Segment::create("corrupt", 4, 1 << 20).unwrap();
        seg.push(QUESTIONS, &[Value::Int(1), Value::Int(2)], dl(5))
            .unwrap();
        let h = seg.hdr();
        // A peer moves the tail past the capacity, then behind the head (wrapping), then to the
        // top of the counter range: every reader and writer gets the error, nothing panics.
        for (head, tail) in [(0, 4 + 1), (5, 3), (0, u64::MAX), (7, u64::MAX / 2)] {
            h.dirs[QUESTIONS][0].store(head, Ordering::Relaxed);
            h.dirs[QUESTIONS][1].store(tail, Ordering::Relaxed);
            let e = seg.try_pop(QUESTIONS, dl(5)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(e.message().contains("corrupted"), "{e}");
            let e = seg.push(QUESTIONS, &[Value::Int(3)], dl(5)).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(seg.len(QUESTIONS) <= 4);
        }
        // Counters at the very top of their range but consistent wrap around without overflow.
        h.dirs[QUESTIONS][0].store(u64::MAX, Ordering::Relaxed);
        h.dirs[QUESTIONS][1].store(u64::MAX, Ordering::Relaxed);
        seg.push(QUESTIONS, &[Value::Int(9)], dl(5)).unwrap();
        assert_eq!(h.dirs[QUESTIONS][1].load(Ordering::Relaxed), 0);
        let v = seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap();
        assert_eq!(v.as_int(), Some(9));
        // The other direction was never touched and still works.
        seg.push(ANSWERS, &[Value::Int(4)], dl(5)).unwrap();
        assert_eq!(
            seg.try_pop(ANSWERS, dl(5)).unwrap().unwrap().as_int(),
            Some(4)
        );
    }

    #[test]
    fn shq_6_segment_size_is_sealed_and_open_refuses_unsealed_memory() {
        let seg = Segment::create("sealed", 4, 1 << 20).unwrap();
        // SAFETY: plain syscalls on our own fd.
        let (shrink, grow) = unsafe {
            (
                libc::ftruncate(seg.fd.as_raw_fd(), 4096),
                libc::ftruncate(seg.fd.as_raw_fd(), 1 << 30),
            )
        };
        assert_eq!(
            (shrink, grow),
            (-1, -1),
            "resizing a sealed segment must fail"
        );
        // A process handing out an unsealed memfd (whatever its header says) is refused.
        // SAFETY: plain syscalls; the fd is owned at once.
        let fd = unsafe {
            let fd = libc::memfd_create(c"unsealed".as_ptr(), libc::MFD_CLOEXEC);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, seg.len as libc::off_t), 0);
            <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd)
        };
        let e = Segment::open(fd).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
        assert!(e.message().contains("not sealed"), "{e}");
    }

    #[test]
    fn shq_7_garbage_in_the_lock_word_is_a_take_over_or_a_timeout_never_a_crash() {
        let seg = Segment::create("lockword", 4, 1 << 20).unwrap();
        seg.push(QUESTIONS, &[Value::Int(5)], dl(5)).unwrap();
        let w = &seg.hdr().lock;
        // A dead (or made-up) holder: taken over and repaired within a few slices.
        for junk in [u32::MAX - 2, CONTENDED | 4_000_000, 4_194_000] {
            w.store(junk, Ordering::SeqCst);
            let t = std::time::Instant::now();
            drop(seg.lock(dl(5)).unwrap());
            assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
            assert_eq!(w.load(Ordering::SeqCst), 0, "unlocked");
        }
        // A live holder that never unlocks (pid 1 exists everywhere): the deadline's timeout.
        w.store(1, Ordering::SeqCst);
        let e = seg
            .try_pop(QUESTIONS, Deadline::after(Duration::from_millis(100)))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        w.store(0, Ordering::SeqCst);
        assert_eq!(
            seg.try_pop(QUESTIONS, dl(5)).unwrap().unwrap().as_int(),
            Some(5),
            "the item survived"
        );
    }
}

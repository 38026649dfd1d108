//! The flat shared-memory region of a tree whose ranks all run on one host: the small-message
//! fast path. One memfd holds a slot per rank (double-buffered by sequence parity); a small
//! all-reduce, broadcast or barrier is then: write my words (what I call) and data into my
//! slot, publish the sequence number, wait until every rank's slot shows it, and reduce the
//! slots in rank order into my own buffer. The caller's thread does all of it: no frame, no
//! hand-off to a reactor, no tree hops.
//!
//! The Tree glue (which collectives qualify, the setup at rendezvous) is `tree/fastpath.rs`.
//!
//! Invariants:
//! - FLAT-1 (one decision from the same data): before every control pass each rank publishes in
//!   its slot, under the pass's sequence number, whether it can take the fast path and the
//!   collective's words (kind, op, dtype, count, root, structure hash, continuation flag,
//!   algorithm, bytes). The collective runs on the fast path only when every rank's slot of that
//!   sequence says "fast" with identical words; any other slot (a finished rank, a user reduce
//!   function, a size over the cut-over, a CUDA tensor, a status round, a mismatch) sends every
//!   rank to the control pass, which reports mismatches and uneven endings as before
//!   (TREE-2, TREE-4). A rank that is not fast does not wait: its own slot already decides.
//! - FLAT-2 (no slot is overwritten while read): a rank writes sequence `s` (into buffer
//!   `s % 2`) only after its collective `s - 1` ended, which needs every rank's slot `s - 1`
//!   (fast path) or every rank's report in control pass `s - 1` (slow path); every rank reads
//!   the slots of `s - 2` before it writes `s - 1`. So when buffer `s % 2` is overwritten, no rank
//!   still reads it for `s - 2`. A slot showing a later sequence than the reader's means the
//!   ranks are out of step: the reader falls back to the control pass, which names the rank.
//!   The CPU word in a slot (SPREAD-1) is a hint outside this rule: its rank rewrites it after a
//!   move during its wait, and a reader may see it stale or newer.
//! - FLAT-3 (bitwise agreement, TREE-1): every rank reduces the slots in rank order 0, 1, ...,
//!   n - 1 with the same kernel, so every rank ends with bitwise the same result.
//! - FLAT-4 (no hang, TREE-3): a waiter spins under the wait policy (`PARALLEL_SPIN_US`,
//!   runtime/spin.rs), then sleeps on a futex word in slices of at most [`SLICE`] (a wait that
//!   spinning did not win while a missing rank last published from this CPU first moves the
//!   waiter off it, and one declined for busy cores between two ranks moves it onto the other's
//!   CPU, once per wait: SPREAD-2 and SPREAD-4, each slot carrying its writer's CPU); it checks the
//!   awaited ranks' `gone` words (set by a rank whose tree failed or was dropped) on every scan
//!   and their pidfds (a killed process) after every slice (a rank seen exited is lost only if
//!   its slot is still missing on a scan after that: its last collective may have completed
//!   just before it exited; a rank that left names, in its place, another rank whose process
//!   ended, the usual cause), and honours the collective's deadline and interrupts. Publishing wakes sleepers only when one announced itself
//!   (Dekker-style, both sides SeqCst: a wake-up cannot be lost).
//! - FLAT-5 (who can attach): the memfd is sealed at its size and handed out by rank 0 over an
//!   abstract Unix socket with a random name, only to a connection that presents the 32-byte
//!   token sent over the tree's own (authenticated) links, from the same uid and from the pid the
//!   rank announced at rendezvous; a receiving rank checks the seals and the exact size before it
//!   maps (SEAL-1/2) and that the socket's owner is rank 0's pid. Words read from the region are
//!   only compared, never used as lengths or offsets: every length comes from this rank's call.
//! - FLAT-6 (one cut-over): the region exists only when every rank wants it (PARALLEL_SHM=1,
//!   PARALLEL_SHM_FLAT_MAX > 0, all ranks on one host) and its cut-over is the smallest
//!   PARALLEL_SHM_FLAT_MAX of all ranks, agreed at setup: ranks with different settings still
//!   decide alike.

use crate::ops::{self, Op};
use parallel_engine::link::sys;
use parallel_engine::runtime::{Deadline, Spin, futex, spread};
use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// The longest kernel sleep between liveness checks (FLAT-4).
pub(crate) const SLICE: Duration = Duration::from_millis(10);
/// How long a waiter that found a rank gone looks for the rank whose ended process caused it
/// (FLAT-4; an error path only).
const CAUSE_WAIT: Duration = Duration::from_millis(200);
/// Words of a slot's meta (FLAT-1); see [`Words`].
pub(crate) const WORDS: usize = 16;
/// What a rank calls, as compared between slots: word 0 is 1 on the fast path (0: not fast).
pub(crate) type Words = [u64; WORDS];

/// Region header: the futex word and the sleepers' count, on lines of their own.
const HDR: usize = 128;
const GEN: usize = 0;
const WAITERS: usize = 64;
/// Per rank: a line with its `gone` word, then two buffers.
const RANK_HDR: usize = 64;
/// Per buffer: the sequence word and the writer's CPU (own line), then the words, then the data.
const BUF_HDR: usize = 64 + WORDS * 8;
/// Where in a buffer's first line the writer's CPU word lies (SPREAD-1).
const CPU: usize = 8;

/// Where everything lies in a region for `world` ranks and a cut-over of `max` bytes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub world: usize,
    pub max: usize,
    buf: usize,
    rank: usize,
    pub total: usize,
}

impl Layout {
    pub fn new(world: usize, max: usize) -> Layout {
        let buf = BUF_HDR + max.div_ceil(64) * 64;
        let rank = RANK_HDR + 2 * buf;
        let total = (HDR + world * rank).div_ceil(4096) * 4096;
        Layout {
            world,
            max,
            buf,
            rank,
            total,
        }
    }
}

/// One rank's view of the region.
pub(crate) struct Region {
    map: memmap2::MmapRaw,
    _fd: OwnedFd,
    lay: Layout,
    rank: usize,
    /// Every other rank's pidfd (FLAT-4); None at this rank's index.
    pidfds: Vec<Option<OwnedFd>>,
    pids: Vec<u32>,
    /// Where each rank runs ("addr:port on hostname"), for errors that name a rank.
    places: Vec<String>,
    spin: Duration,
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Region(rank {} of {}, {} bytes)",
            self.rank, self.lay.world, self.lay.max
        )
    }
}

/// A pidfd for `pid` (Linux 5.3+): readable once the process has exited, even as a zombie.
pub(crate) fn pidfd(pid: u32) -> Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned on success.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(Error::os(
            "flat",
            "pidfd_open()",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Creates the region's memfd for `lay`, zeroed and sealed at its size (SEAL-1).
pub(crate) fn create(lay: &Layout) -> Result<OwnedFd> {
    sys::memfd("parallel-flat", lay.total)
}

impl Region {
    /// Maps the region in `fd` as `rank`, checking it first (FLAT-5), and opens a pidfd for every
    /// other rank (`pids`, as the ranks announced them at rendezvous).
    pub fn map(fd: OwnedFd, lay: Layout, rank: usize, pids: &[u32]) -> Result<Region> {
        sys::check_sealed(fd.as_raw_fd(), Some(lay.total), "flat")?;
        let map = memmap2::MmapOptions::new()
            .len(lay.total)
            .map_raw(&fd)
            .map_err(|e| Error::os("flat", "mmap(memfd)", e))?;
        let _ = map.advise(memmap2::Advice::PopulateWrite);
        let pidfds = pids
            .iter()
            .enumerate()
            .map(|(r, &pid)| (r != rank).then(|| pidfd(pid)).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(Region {
            map,
            _fd: fd,
            lay,
            rank,
            pidfds,
            pids: pids.to_vec(),
            places: Vec::new(),
            spin: parallel_engine::config::config().spin,
        })
    }

    /// Names where each rank runs in this region's errors (`places[r]` for rank r).
    pub fn with_places(mut self, places: Vec<String>) -> Region {
        self.places = places;
        self
    }

    /// The cut-over: the largest buffer the fast path takes, in bytes (FLAT-6).
    pub fn max(&self) -> usize {
        self.lay.max
    }

    fn at(&self, off: usize) -> *mut u8 {
        debug_assert!(off < self.lay.total);
        // SAFETY: every caller's offset lies inside the mapping (computed from the layout).
        unsafe { self.map.as_mut_ptr().add(off) }
    }

    fn word32(&self, off: usize) -> &AtomicU32 {
        // SAFETY: a 64-byte aligned offset inside the mapping (page-aligned base), accessed only
        // through atomics; the mapping lives as long as self.
        unsafe { &*(self.at(off) as *const AtomicU32) }
    }

    fn word64(&self, off: usize) -> &AtomicU64 {
        // SAFETY: as in word32 (every such offset is a multiple of 64).
        unsafe { &*(self.at(off) as *const AtomicU64) }
    }

    fn buf_off(&self, r: usize, seq: u64) -> usize {
        HDR + r * self.lay.rank + RANK_HDR + (seq % 2) as usize * self.lay.buf
    }

    fn gone(&self, r: usize) -> &AtomicU64 {
        self.word64(HDR + r * self.lay.rank)
    }

    fn seq_word(&self, r: usize, seq: u64) -> &AtomicU64 {
        self.word64(self.buf_off(r, seq))
    }

    /// Where rank `r` publishes its CPU word with collective `seq` (SPREAD-1: the peers' words
    /// are untrusted, only compared or bounds-checked against a mask).
    fn cpu_slot(&self, r: usize, seq: u64) -> &AtomicU32 {
        // SAFETY: as in word32: 8 bytes into a 64-byte aligned line of the mapping, accessed
        // only through atomics.
        unsafe { &*(self.at(self.buf_off(r, seq) + CPU) as *const AtomicU32) }
    }

    /// The CPU word rank `r` published with collective `seq` (SPREAD-1).
    fn cpu_word(&self, r: usize, seq: u64) -> u32 {
        self.cpu_slot(r, seq).load(Ordering::Relaxed)
    }

    fn data(&self, r: usize, seq: u64, len: usize) -> &[u8] {
        assert!(len <= self.lay.max, "fast path data over the cut-over");
        // SAFETY: inside rank r's buffer for `seq` (len <= max <= the data area). FLAT-2: no rank
        // writes this buffer until every rank published seq + 1, which this rank does only after
        // it is done with this slice. A misbehaving process of our uid could change the bytes:
        // that changes values (as any data it sends would), never lengths.
        unsafe { std::slice::from_raw_parts(self.at(self.buf_off(r, seq) + BUF_HDR), len) }
    }

    fn words(&self, r: usize, seq: u64) -> Words {
        let mut w = [0u64; WORDS];
        // SAFETY: the words area of rank r's buffer, inside the mapping, 8-byte aligned; read by
        // value (FLAT-5: only compared).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.at(self.buf_off(r, seq) + 64) as *const u64,
                w.as_mut_ptr(),
                WORDS,
            )
        };
        w
    }

    /// Publishes this rank's part of collective `seq` (FLAT-1): its words and, on the fast path,
    /// its data, then the sequence number; wakes sleepers if any announced themselves (FLAT-4).
    pub fn publish(&self, seq: u64, words: &Words, data: Option<&[u8]>) {
        let off = self.buf_off(self.rank, seq);
        if let Some(d) = data {
            assert!(d.len() <= self.lay.max, "fast path data over the cut-over");
            // SAFETY: this rank's own buffer for `seq`, which no rank reads until the sequence
            // word below says `seq` (FLAT-2); `d` is the caller's memory, not the mapping.
            unsafe { std::ptr::copy_nonoverlapping(d.as_ptr(), self.at(off + BUF_HDR), d.len()) };
        }
        // SAFETY: as above, the words area of this rank's own buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(words.as_ptr(), self.at(off + 64) as *mut u64, WORDS)
        };
        // On the line the sequence word's store below writes anyway (SPREAD-1).
        self.cpu_slot(self.rank, seq)
            .store(spread::cpu_word(), Ordering::Relaxed);
        self.seq_word(self.rank, seq).store(seq, Ordering::SeqCst);
        self.wake();
    }

    fn wake(&self) {
        if self.word32(WAITERS).load(Ordering::SeqCst) > 0 {
            let g = self.word32(GEN);
            g.fetch_add(1, Ordering::SeqCst);
            futex(g, libc::FUTEX_WAKE, i32::MAX as u32, None);
        }
    }

    /// Marks this rank as gone (its tree failed or was dropped), so ranks waiting for its slot
    /// fail at once instead of at their deadline (FLAT-4).
    pub fn leave(&self) {
        self.gone(self.rank).store(1, Ordering::SeqCst);
        let g = self.word32(GEN);
        g.fetch_add(1, Ordering::SeqCst);
        futex(g, libc::FUTEX_WAKE, i32::MAX as u32, None);
    }

    /// One look at every slot of `seq`: Some(fast?) once decided, None while some are pending.
    fn scan(&self, seq: u64, mine: &Words, pending: &mut Vec<usize>) -> Result<Option<bool>> {
        pending.clear();
        for r in (0..self.lay.world).filter(|&r| r != self.rank) {
            let s = self.seq_word(r, seq).load(Ordering::SeqCst);
            if s == seq {
                if self.words(r, seq) != *mine {
                    return Ok(Some(false));
                }
            } else if s > seq {
                // Out of step (FLAT-2): the control pass names the rank.
                return Ok(Some(false));
            } else if self.gone(r).load(Ordering::SeqCst) != 0 {
                // A rank leaves when its tree failed, most often because another rank's process
                // ended: name that one, the cause, when there is one (FLAT-4). The leaver may
                // have seen the death (a closed socket) before the pidfd shows it, so this error
                // path looks for up to CAUSE_WAIT.
                let others: Vec<usize> = (0..self.lay.world)
                    .filter(|&x| x != self.rank && x != r)
                    .collect();
                let until = std::time::Instant::now() + CAUSE_WAIT;
                loop {
                    self.check_alive(seq, &others)?;
                    if others.is_empty() || std::time::Instant::now() >= until {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Err(Error::new(
                    ErrorKind::PeerLost,
                    "flat",
                    format!(
                        "rank {r}{} left the tree (its tree failed or was closed) while rank {} \
                         waited for it in collective #{seq}",
                        self.places
                            .get(r)
                            .map_or(String::new(), |p| format!(" (at {p})")),
                        self.rank
                    ),
                ));
            } else {
                pending.push(r);
            }
        }
        Ok(pending.is_empty().then_some(true))
    }

    /// Whether collective `seq` runs on the fast path (FLAT-1): waits until every rank's slot
    /// shows `seq` unless the answer is known earlier (this rank or another is not fast).
    pub fn decide(
        &self,
        seq: u64,
        mine: &Words,
        deadline: Deadline,
        what: &'static str,
    ) -> Result<bool> {
        if mine[0] == 0 {
            return Ok(false);
        }
        let mut pending = Vec::new();
        let mut spin = Spin::start(self.spin);
        let mut spread_asked = false;
        loop {
            if let Some(d) = self.scan(seq, mine, &mut pending)? {
                return Ok(d);
            }
            if spin.step() {
                continue;
            }
            if !spread_asked && (spin.declined_busy() || spin.unpaid()) {
                // Once per wait: a rank still missing last published seq - 1. SPREAD-4: every
                // core busy, two ranks: join the other. SPREAD-2: off its CPU. Where this rank
                // went is published in its place for `seq`, which the other reads when it
                // waits at seq + 1 (SPREAD-1).
                spread_asked = true;
                let last = seq.wrapping_sub(1);
                let moved = if spin.unpaid() {
                    spread::after_unpaid_spin(pending.iter().map(|&r| self.cpu_word(r, last)))
                } else if self.lay.world == 2 {
                    pending
                        .first()
                        .and_then(|&r| spread::pair_under_load(self.cpu_word(r, last)))
                } else {
                    None
                };
                if let Some(there) = moved {
                    self.cpu_slot(self.rank, seq)
                        .store(there, Ordering::Relaxed);
                }
            }
            let waiting = format!(
                "rank(s) {pending:?} to reach collective #{seq} on the shared-memory fast path \
                 (rank {} is there; PARALLEL_TIMEOUT)",
                self.rank
            );
            let slice = deadline.slice(what, &waiting)?.min(SLICE);
            let (waiters, g) = (self.word32(WAITERS), self.word32(GEN));
            waiters.fetch_add(1, Ordering::SeqCst);
            let seen = g.load(Ordering::SeqCst);
            let r = self.scan(seq, mine, &mut pending);
            if !matches!(r, Ok(None)) {
                waiters.fetch_sub(1, Ordering::SeqCst);
                return r.map(|d| d == Some(true));
            }
            futex(g, libc::FUTEX_WAIT, seen, Some(slice));
            waiters.fetch_sub(1, Ordering::SeqCst);
            if self.check_alive(seq, &pending).is_err() {
                // A rank may have published its slot of `seq` and then exited (its last
                // collective) since the scan: only one still missing once its exit was seen is
                // lost, as an ended process writes nothing more.
                if let Some(d) = self.scan(seq, mine, &mut pending)? {
                    return Ok(d);
                }
                self.check_alive(seq, &pending)?;
            }
        }
    }

    /// FLAT-4: an awaited rank whose process exited is an error now.
    fn check_alive(&self, seq: u64, pending: &[usize]) -> Result<()> {
        for &r in pending {
            let Some(fd) = &self.pidfds[r] else { continue };
            let mut p = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, no wait.
            let n = unsafe { libc::poll(&mut p, 1, 0) };
            if n > 0 && p.revents != 0 {
                return Err(Error::new(
                    ErrorKind::PeerLost,
                    "flat",
                    format!(
                        "rank {r} (pid {}{}) exited while rank {} waited for it in collective \
                         #{seq} on the shared-memory fast path",
                        self.pids[r],
                        self.places
                            .get(r)
                            .map_or(String::new(), |p| format!(" at {p}")),
                        self.rank
                    ),
                ));
            }
        }
        Ok(())
    }

    /// All-reduce on the fast path: the slots of `seq`, reduced in rank order into `buf`
    /// (FLAT-3). `buf` holds this rank's contribution, which its own slot also holds.
    pub fn reduce_into(&self, seq: u64, op: &Op, dtype: DType, buf: &mut [u8]) -> Result<()> {
        let n = buf.len();
        if self.rank != 0 {
            buf.copy_from_slice(self.data(0, seq, n));
        }
        for r in 1..self.lay.world {
            ops::reduce_into(op, dtype, buf, self.data(r, seq, n))?;
        }
        Ok(())
    }

    /// Broadcast on the fast path: `root`'s slot of `seq` into `buf`.
    pub fn copy_from(&self, seq: u64, root: usize, buf: &mut [u8]) {
        if root != self.rank {
            buf.copy_from_slice(self.data(root, seq, buf.len()));
        }
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        self.leave();
    }
}

/// Rank 0's offer, sent over the tree (FLAT-5): 1 (offered) or 0, the socket's random name (32
/// hex characters), the token (32 bytes).
pub(crate) const OFFER: usize = 1 + 32 + 32;
const REQUEST: &[u8; 8] = b"PFLATRQ1";
const GRANTED: &[u8; 8] = b"PFLATOK1";

/// The abstract socket name for an offer's random part.
pub(crate) fn socket_name(random: &[u8]) -> Vec<u8> {
    [b"parallel-flat-".as_slice(), random].concat()
}

fn my_uid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::getuid() }
}

/// Waits until `fd` is readable (or hung up), for at most `d`.
fn readable(fd: &OwnedFd, d: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut p, 1, d.as_millis().min(i32::MAX as u128) as i32) };
    n > 0
}

/// Rank 0: hands `memfd` to each other rank once (FLAT-5), until every rank got it, `stop` is
/// set or `deadline` passes. `pids[r]` is the pid rank r announced at rendezvous.
pub(crate) fn serve(
    listener: OwnedFd,
    memfd: OwnedFd,
    token: [u8; 32],
    pids: Vec<u32>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    deadline: Deadline,
) {
    let mut served = vec![false; pids.len()];
    served[0] = true;
    while !stop.load(Ordering::SeqCst) && !deadline.passed() && served.contains(&false) {
        if !readable(&listener, Duration::from_millis(20)) {
            continue;
        }
        // SAFETY: accept on our listening socket; the fd is owned on success.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            continue;
        }
        // SAFETY: a fresh descriptor we own.
        let conn = unsafe { OwnedFd::from_raw_fd(fd) };
        if let Some(r) = admit(&conn, &token, &pids, &served)
            && sys::send_fds(conn.as_raw_fd(), GRANTED, &[memfd.as_raw_fd()]).is_ok()
        {
            served[r] = true;
        }
        // Refused: dropping the connection tells the asker (EOF).
    }
}

/// The rank a connection asks for the region as, if it may have it (FLAT-5).
fn admit(conn: &OwnedFd, token: &[u8; 32], pids: &[u32], served: &[bool]) -> Option<usize> {
    if !readable(conn, Duration::from_secs(2)) {
        return None;
    }
    let mut req = [0u8; 48];
    // SAFETY: reading into our own buffer of 48 bytes.
    let n = unsafe {
        libc::recv(
            conn.as_raw_fd(),
            req.as_mut_ptr().cast(),
            48,
            libc::MSG_WAITALL,
        )
    };
    if n != 48 || &req[..8] != REQUEST {
        return None;
    }
    // Compare the whole token whatever differs first.
    let diff = req[8..40]
        .iter()
        .zip(token)
        .fold(0u8, |a, (x, y)| a | (x ^ y));
    let rank = u64::from_le_bytes(req[40..48].try_into().ok()?) as usize;
    let cred = sys::peer_cred(conn.as_raw_fd()).ok()?;
    let ok = diff == 0
        && rank > 0
        && rank < pids.len()
        && !served[rank]
        && cred.uid == my_uid()
        && cred.pid as u32 == pids[rank];
    ok.then_some(rank)
}

/// A rank other than 0: asks rank 0 (pid `root_pid`) for the region's memfd (FLAT-5).
pub(crate) fn fetch(
    name: &[u8],
    token: &[u8],
    rank: usize,
    root_pid: u32,
    deadline: Deadline,
) -> Result<OwnedFd> {
    let sock = sys::socket(libc::AF_UNIX, libc::SOCK_STREAM)?;
    let (addr, len) = sys::abstract_addr(name);
    loop {
        // SAFETY: valid sockaddr_un of `len` bytes.
        let rc = unsafe {
            libc::connect(
                sock.as_raw_fd(),
                &addr as *const _ as *const libc::sockaddr,
                len,
            )
        };
        if rc == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        // A full backlog: rank 0 is serving the others first.
        if e.raw_os_error() != Some(libc::EAGAIN) || deadline.passed() {
            return Err(Error::os("flat", "connecting to rank 0's region socket", e));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let cred = sys::peer_cred(sock.as_raw_fd())?;
    if cred.uid != my_uid() || cred.pid as u32 != root_pid {
        return Err(Error::new(
            ErrorKind::Auth,
            "flat",
            format!(
                "the region socket belongs to pid {} (uid {}), not to rank 0 (pid {root_pid})",
                cred.pid, cred.uid
            ),
        ));
    }
    let mut req = [0u8; 48];
    req[..8].copy_from_slice(REQUEST);
    req[8..40].copy_from_slice(token);
    req[40..].copy_from_slice(&(rank as u64).to_le_bytes());
    // SAFETY: sending our own 48-byte buffer.
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            req.as_ptr().cast(),
            48,
            libc::MSG_NOSIGNAL,
        )
    };
    if n != 48 {
        return Err(Error::new(
            ErrorKind::PeerLost,
            "flat",
            "rank 0's region socket did not take the request",
        ));
    }
    loop {
        let slice = deadline.slice("flat", "rank 0 to hand over the shared-memory region")?;
        if !readable(&sock, slice) {
            continue;
        }
        let mut reply = [0u8; 8];
        let (n, mut fds) = sys::recv_fds(sock.as_raw_fd(), &mut reply, 1).map_err(|_| {
            Error::new(
                ErrorKind::PeerLost,
                "flat",
                "rank 0 refused or closed the region socket",
            )
        })?;
        if n != 8 || &reply != GRANTED {
            return Err(protocol_err(
                "rank 0 answered the region request with something else",
            ));
        }
        return Ok(fds.remove(0));
    }
}

fn protocol_err(what: &str) -> Error {
    Error::new(ErrorKind::Protocol, "flat", what.to_string())
}

#[cfg(test)]
mod tests;

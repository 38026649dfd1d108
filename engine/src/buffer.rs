//! Receive buffers: a pool of pre-faulted, huge-page advised, locked (where allowed) memory regions.
//!
//! A fresh 4 KiB page costs about 5 µs to fault in on the machines we measure on (see
//! docs/benchmarks.md), so a 64 MiB receive into fresh memory runs at under 1 GB/s. Reusing regions
//! is what makes large receives run at memory speed.
//!
//! Invariants:
//! - BUF-1: a [`Buf`] is exclusively owned; dropping it returns its region to the pool when the pool
//!   holds fewer than `PARALLEL_POOL_BYTES` idle bytes, and unmaps it otherwise.
//! - BUF-2: regions are sized in powers of two from 64 KiB, so reuse never over-allocates by more
//!   than 2x; smaller buffers are plain heap vectors.
//! - BUF-3: every region's memory is mapped and zero-or-stale filled; contents of a reused region are
//!   whatever the last user left (callers always overwrite before reading).
//! - BUF-4: a buffer sized by a peer's declaration ([`Buf::for_incoming`]) commits memory only as
//!   bytes arrive: a fresh region is neither pre-faulted nor locked, so a frame that announces
//!   gigabytes and sends a few bytes costs a few pages, not an out-of-memory kill. Pooled regions
//!   are reused as they are, so repeated receives of one size still run at memory speed.

use crate::config::config;
use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

const MIN_POOLED: usize = 64 << 10;
const HUGE: usize = 2 << 20;

/// An anonymous memory mapping.
struct Region {
    ptr: NonNull<u8>,
    cap: usize,
}

// SAFETY: a Region is plain memory owned by exactly one Buf or by the pool's free list.
unsafe impl Send for Region {}

impl Region {
    /// Maps `cap` bytes; `prefault`: fault the pages in (and lock them) now rather than on first
    /// write (BUF-4).
    fn map(cap: usize, prefault: bool) -> Option<Region> {
        // SAFETY: anonymous private mapping; we check the result before use.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        if cap >= HUGE {
            // SAFETY: advising our own fresh mapping; failure is harmless.
            unsafe { libc::madvise(p, cap, libc::MADV_HUGEPAGE) };
        }
        if !prefault {
            return Some(Region {
                ptr: NonNull::new(p as *mut u8)?,
                cap,
            });
        }
        // Pre-fault now, once, instead of on every receive. MADV_POPULATE_WRITE (Linux 5.14+).
        // SAFETY: our own mapping.
        let populated = unsafe {
            libc::madvise(p, cap, 23 /* MADV_POPULATE_WRITE */)
        } == 0;
        if !populated {
            let base = p as *mut u8;
            for off in (0..cap).step_by(4096) {
                // SAFETY: off < cap, inside the mapping.
                unsafe { base.add(off).write_volatile(0) };
            }
        }
        if config().mlock {
            // SAFETY: locking our own mapping; failure only logs once.
            if unsafe { libc::mlock(p, cap) } != 0 {
                static WARNED: AtomicBool = AtomicBool::new(false);
                if !WARNED.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "mlock of pooled buffers refused ({}); continuing unlocked (PARALLEL_MLOCK=0 silences this)",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
        Some(Region {
            ptr: NonNull::new(p as *mut u8)?,
            cap,
        })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: we own the mapping of exactly `cap` bytes.
        unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.cap) };
    }
}

struct Pool {
    free: HashMap<usize, Vec<Region>>,
    idle_bytes: u64,
}

static POOL: Mutex<Option<Pool>> = Mutex::new(None);

fn take(cap: usize) -> Option<Region> {
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = g.get_or_insert_with(|| Pool {
        free: HashMap::new(),
        idle_bytes: 0,
    });
    let r = pool.free.get_mut(&cap)?.pop()?;
    pool.idle_bytes -= cap as u64;
    Some(r)
}

fn give(r: Region) {
    let limit = config().pool_bytes;
    let mut g = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = g.get_or_insert_with(|| Pool {
        free: HashMap::new(),
        idle_bytes: 0,
    });
    if pool.idle_bytes + r.cap as u64 <= limit {
        pool.idle_bytes += r.cap as u64;
        pool.free.entry(r.cap).or_default().push(r);
    }
}

/// Idle bytes held by the pool (for stats and tests).
pub fn pool_idle_bytes() -> u64 {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map_or(0, |p| p.idle_bytes)
}

enum Store {
    Heap(Vec<u8>),
    Pooled(Region),
}

/// An owned byte buffer of a fixed length, pooled when large.
pub struct Buf {
    store: Store,
    len: usize,
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} bytes)", self.len)
    }
}

impl Buf {
    /// A buffer of `len` bytes with unspecified contents (BUF-3). Large ones come from the pool.
    pub fn with_len(len: usize) -> crate::Result<Buf> {
        Buf::alloc(len, true)
    }

    /// A buffer for `len` bytes a peer announced but has not sent yet: like [`Buf::with_len`],
    /// except that a fresh region is faulted in by the arriving bytes, not up front (BUF-4).
    pub fn for_incoming(len: usize) -> crate::Result<Buf> {
        Buf::alloc(len, false)
    }

    fn alloc(len: usize, prefault: bool) -> crate::Result<Buf> {
        if len < MIN_POOLED {
            return Ok(Buf {
                store: Store::Heap(vec![0; len]),
                len,
            });
        }
        let cap = len
            .checked_next_power_of_two()
            .ok_or_else(|| too_big(len))?;
        let region = match take(cap) {
            Some(r) => r,
            None => Region::map(cap, prefault).ok_or_else(|| too_big(len))?,
        };
        Ok(Buf {
            store: Store::Pooled(region),
            len,
        })
    }

    pub fn from_vec(v: Vec<u8>) -> Buf {
        let len = v.len();
        Buf {
            store: Store::Heap(v),
            len,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn as_ptr(&self) -> *const u8 {
        match &self.store {
            Store::Heap(v) => v.as_ptr(),
            Store::Pooled(r) => r.ptr.as_ptr(),
        }
    }
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        match &mut self.store {
            Store::Heap(v) => v.as_mut_ptr(),
            Store::Pooled(r) => r.ptr.as_ptr(),
        }
    }
}

fn too_big(len: usize) -> crate::Error {
    crate::Error::new(
        crate::ErrorKind::Resource,
        "alloc",
        format!("cannot map a {len}-byte receive buffer (out of memory?)"),
    )
}

impl std::ops::Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the store holds at least `len` initialised bytes (heap: vec of len; region: mapped, BUF-3).
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Buf {
    fn deref_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        // SAFETY: as in Deref, and we hold &mut self so the access is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), len) }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if let Store::Pooled(_) = self.store {
            let Store::Pooled(r) = std::mem::replace(&mut self.store, Store::Heap(Vec::new()))
            else {
                unreachable!()
            };
            give(r);
        }
    }
}

/// Copies at least this many bytes with [`copy_streaming`] where the destination is written
/// once and not read again soon: at this size it does not stay in the caches of the machines this
/// was measured on (32 MiB of L3 shared by the processes of a host).
pub const STREAMING_MIN: usize = 32 << 20;

/// Copies `src` into `dst` (same length) with stores that bypass the caches where the CPU has
/// them (x86-64: `movntdq`, then a store fence): for results written once into memory that
/// is much larger than the caches, this saves reading each destination line from memory
/// before writing it. Elsewhere, or for a short copy, a plain copy.
pub fn copy_streaming(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "copy_streaming: lengths differ");
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
        let n = dst.len();
        // Plain bytes up to the destination's first 16-byte boundary.
        let head = (dst.as_ptr() as usize).wrapping_neg() % 16;
        if n < head + 64 {
            dst.copy_from_slice(src);
            return;
        }
        dst[..head].copy_from_slice(&src[..head]);
        let body = (n - head) / 64 * 64;
        // SAFETY: SSE2 is part of x86-64. Every load reads 16 bytes inside `src[head..head +
        // body]`, every store writes 16 bytes inside `dst[head..head + body]`, whose start is
        // 16-byte aligned (as `_mm_stream_si128` needs); the slices do not overlap (one is
        // borrowed mutably). The fence orders the streaming stores before any later store, so
        // whoever learns of the copy through a later store sees its bytes.
        unsafe {
            let s = src.as_ptr().add(head);
            let d = dst.as_mut_ptr().add(head);
            let mut i = 0;
            while i < body {
                let a = _mm_loadu_si128(s.add(i) as *const __m128i);
                let b = _mm_loadu_si128(s.add(i + 16) as *const __m128i);
                let c = _mm_loadu_si128(s.add(i + 32) as *const __m128i);
                let e = _mm_loadu_si128(s.add(i + 48) as *const __m128i);
                _mm_stream_si128(d.add(i) as *mut __m128i, a);
                _mm_stream_si128(d.add(i + 16) as *mut __m128i, b);
                _mm_stream_si128(d.add(i + 32) as *mut __m128i, c);
                _mm_stream_si128(d.add(i + 48) as *mut __m128i, e);
                i += 64;
            }
            _mm_sfence();
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buf_1_large_buffers_are_reused() {
        let mut a = Buf::with_len((8 << 20) + 1).unwrap();
        a[0] = 7;
        let p = a.as_ptr();
        drop(a);
        let b = Buf::with_len((8 << 20) + 1).unwrap();
        assert_eq!(b.as_ptr(), p, "the region should come back from the pool");
        assert_eq!(b.len(), (8 << 20) + 1);
        let small = Buf::with_len(10).unwrap();
        assert_eq!(&small[..], &[0; 10]);
    }

    /// A streaming copy equals a plain one for every length and alignment around its 16-byte
    /// stores and 64-byte steps, and touches nothing outside the destination.
    #[test]
    fn copy_streaming_copies_exactly_at_every_length_and_alignment() {
        let src: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for len in (0..300).chain([4095, 4096, 4097, 65_536 + 3]) {
            for (d_off, s_off) in [(0, 0), (1, 0), (0, 5), (15, 3), (16, 16), (9, 63)] {
                let mut dst = vec![0xAAu8; len + 64 + 32];
                super::copy_streaming(&mut dst[d_off..d_off + len], &src[s_off..s_off + len]);
                assert_eq!(
                    &dst[d_off..d_off + len],
                    &src[s_off..s_off + len],
                    "len {len}"
                );
                assert!(dst[..d_off].iter().all(|&b| b == 0xAA), "before, len {len}");
                assert!(
                    dst[d_off + len..].iter().all(|&b| b == 0xAA),
                    "after, len {len}"
                );
            }
        }
    }
}

//! The arena: blocks in size classes, their holders, free lists and repair after a crash
//! (SHQ-3, SHQ-4), and this process's leases on blocks its tensors view.

use super::*;

impl Segment {
    /// The block header at arena offset `off`, if it lies in the arena (SHQ-4).
    pub(super) fn block(&self, off: u64) -> Option<&Block> {
        if off % 64 != 0 || off.checked_add(BLOCK_HDR)? > self.arena_len {
            return None;
        }
        // SAFETY: bounds checked above; Block is all atomics.
        Some(unsafe { &*(self.base.add((self.arena_off + off) as usize) as *const Block) })
    }

    /// A checked block: magic, class, and extent inside the arena.
    pub(super) fn valid_block(&self, off: u64) -> Option<(&Block, u64)> {
        let b = self.block(off)?;
        let c = b.class.load(Ordering::Relaxed) as usize;
        if b.magic.load(Ordering::Relaxed) != BLOCK_MAGIC || c >= NCLASS {
            return None;
        }
        let size = class_size(c);
        (off.checked_add(size)? <= self.arena_len).then_some((b, size))
    }

    pub(super) fn payload(&self, off: u64) -> *mut u8 {
        // SAFETY: callers pass offsets of valid blocks (inside the arena).
        unsafe { self.base.add((self.arena_off + off + BLOCK_HDR) as usize) }
    }

    /// The (block, offset in its payload) references in the segment table of the item in block
    /// `off`, checked (SHQ-4); `None` when the item is malformed.
    pub(super) fn item_refs(&self, off: u64) -> Option<Vec<(u64, u64)>> {
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
    pub(super) fn repair(&self, _g: &Guard<'_>) {
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

    pub(super) fn push_free(&self, off: u64, b: &Block) {
        let h = self.hdr();
        let c = b.class.load(Ordering::Relaxed) as usize;
        b.free.store(1, Ordering::Relaxed);
        b.next
            .store(h.free[c].load(Ordering::Relaxed), Ordering::Relaxed);
        h.free[c].store(off + 1, Ordering::Relaxed); // commit
    }

    /// Adds one hold of this process on a block (under the lock).
    pub(super) fn hold_locked(&self, b: &Block) -> Result<()> {
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

    pub(super) fn unheld(b: &Block) -> bool {
        b.holders
            .iter()
            .all(|hd| hd.pid.load(Ordering::Relaxed) == 0)
    }

    /// Drops one hold of this process; frees the block when nothing needs it (under the lock).
    pub(super) fn release_locked(&self, off: u64, b: &Block) {
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
    pub(super) fn alloc_locked(&self, bytes: u64) -> Result<Option<u64>> {
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

    pub(super) fn claim(&self, b: &Block, bytes: u64) -> Result<()> {
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
    pub(super) fn alloc(&self, bytes: u64, deadline: Deadline) -> Result<u64> {
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
    pub(super) fn release(&self, off: u64) {
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
    pub(super) fn lease(self: &Arc<Self>, off: u64) -> Arc<Lease> {
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
    pub(super) fn find_lease(&self, p: usize, len: usize) -> Option<(Arc<Lease>, u64)> {
        let g = self.leases.lock().unwrap_or_else(|e| e.into_inner());
        let (start, (_off, used, weak)) = g.range(..=p).next_back()?;
        let at = (p - start) as u64;
        if at + len as u64 > *used {
            return None;
        }
        Some((weak.upgrade()?, at))
    }
}

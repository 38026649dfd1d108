//! Items: encoding values into arena blocks, publishing them in a direction's ring, popping and
//! decoding them (tensors view the arena) (SHQ-4, SHQ-5).

use super::*;

impl Segment {
    /// The (head, tail) counters of direction `dir`, checked (SHQ-4): at most `cap` items apart.
    /// Under the lock.
    pub(super) fn indices(&self, dir: usize) -> Result<(u64, u64)> {
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

    pub(super) fn slot(&self, dir: usize, i: u64) -> (&AtomicU64, &AtomicU64) {
        let off = HEADER + ((dir as u64 * self.cap + i % self.cap) * 16) as usize;
        // SAFETY: the slot area (2 x cap x 16 bytes after the header) lies before arena_off,
        // checked at map time; u64 atomics are 8-aligned there.
        unsafe {
            let p = self.base.add(off) as *const AtomicU64;
            (&*p, &*p.add(1))
        }
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
    pub(super) fn write_item(
        &self,
        off: u64,
        enc: &wire::Encoded<'_>,
        refs: &[Option<(u64, u64)>],
    ) {
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
    pub(super) fn publish(
        &self,
        dir: usize,
        blocks: &[(u64, Vec<u64>)],
        deadline: Deadline,
    ) -> Result<()> {
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

    pub(super) fn raw_len(&self, dir: usize) -> u64 {
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
    pub(super) fn decode(
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
}

/// Replaces `Value::Out(i)` placeholders with the tensors viewing the block.
pub(super) fn place_tensors(v: &mut Value, tensors: &mut [Option<Tensor>]) {
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

//! A bounded, lock-free, multi-producer multi-consumer ring (Dmitry Vyukov's sequence-number
//! queue), with an atomic batch push so that one `write(a, b, c)` lands as adjacent items.
//!
//! Each slot carries a sequence number. For the producer that owns position `p` the slot is free
//! when `seq == p`; it writes the value and publishes `seq = p + 1`. The consumer that owns `p`
//! waits for `seq == p + 1`, takes the value and frees the slot for the next lap
//! (`seq = p + cap`). Positions are claimed by a compare-and-swap on `tail` (producers) or `head`
//! (consumers), so no lock is ever held and a preempted thread blocks nobody but the one reader
//! of its own slot.
//!
//! Invariants:
//! - RING-1: a slot's value is written only by the producer whose CAS claimed its position, and
//!   read only by the consumer whose CAS claimed it; the `seq` Release/Acquire pair orders the
//!   value's write before its read.
//! - RING-2: every pushed value is popped exactly once or dropped exactly once with the ring.
//! - RING-3: items of one `push_batch` occupy consecutive positions (they are claimed by a single
//!   CAS after every one of their slots was seen free), so readers see them adjacent and in order.
//! - RING-4: items pushed by one producer are popped in push order (positions increase).
//! - RING-5: the ring has at least 2 slots. With one slot, "published for position p" (p + 1)
//!   and "free for position p + 1" (p + cap) are the same sequence number, and a second producer
//!   would overwrite an unread value (found by `loom_ring_two_producers_one_consumer`).
//!
//! Model-checked by the loom tests at the end of this file.

use crate::sync::{AtomicUsize, Ordering, UnsafeCell};
use std::mem::MaybeUninit;

struct Slot<T> {
    seq: AtomicUsize,
    val: UnsafeCell<MaybeUninit<T>>,
}

/// Pads a hot index to its own cache line so producers and consumers do not share one.
#[repr(align(128))]
struct Padded(AtomicUsize);

pub(crate) struct Ring<T> {
    slots: Box<[Slot<T>]>,
    head: Padded,
    tail: Padded,
}

// SAFETY: values move between threads through the ring (T: Send); RING-1 gives each slot's
// contents to exactly one thread at a time.
unsafe impl<T: Send> Send for Ring<T> {}
// SAFETY: as above; shared access only goes through the atomic protocol.
unsafe impl<T: Send> Sync for Ring<T> {}

impl<T> std::fmt::Debug for Ring<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Ring({}/{})", self.len(), self.capacity())
    }
}

impl<T> Ring<T> {
    /// A ring of `cap` slots, at least 2 (RING-5).
    pub(crate) fn new(cap: usize) -> Ring<T> {
        let cap = cap.max(2);
        let slots = (0..cap)
            .map(|i| Slot {
                seq: AtomicUsize::new(i),
                val: UnsafeCell::new(MaybeUninit::uninit()),
            })
            .collect();
        Ring {
            slots,
            head: Padded(AtomicUsize::new(0)),
            tail: Padded(AtomicUsize::new(0)),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Items in the ring (a snapshot; claimed-but-unpublished positions count).
    pub(crate) fn len(&self) -> usize {
        let tail = self.tail.0.load(Ordering::Acquire);
        let head = self.head.0.load(Ordering::Acquire);
        tail.wrapping_sub(head).min(self.capacity())
    }

    fn slot(&self, pos: usize) -> &Slot<T> {
        &self.slots[pos % self.slots.len()]
    }

    /// Pushes one value, or gives it back when the ring is full.
    pub(crate) fn try_push(&self, v: T) -> Result<(), T> {
        let mut pos = self.tail.0.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(pos);
            let seq = slot.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match self.tail.0.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        self.publish(pos, v);
                        return Ok(());
                    }
                    Err(p) => pos = p,
                }
            } else if diff < 0 {
                return Err(v); // the slot still holds last lap's value: full
            } else {
                pos = self.tail.0.load(Ordering::Relaxed);
            }
        }
    }

    /// Pushes all of `items` as adjacent positions (RING-3), or gives them back when fewer than
    /// `items.len()` slots are free. A batch larger than the capacity can never fit.
    pub(crate) fn try_push_batch(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        let k = items.len();
        if k == 0 {
            return Ok(());
        }
        if k > self.capacity() {
            return Err(items);
        }
        let mut pos = self.tail.0.load(Ordering::Relaxed);
        'retry: loop {
            for j in 0..k {
                let p = pos.wrapping_add(j);
                let diff = self.slot(p).seq.load(Ordering::Acquire).wrapping_sub(p) as isize;
                if diff < 0 {
                    return Err(items);
                }
                if diff > 0 {
                    pos = self.tail.0.load(Ordering::Relaxed);
                    continue 'retry;
                }
            }
            match self.tail.0.compare_exchange_weak(
                pos,
                pos.wrapping_add(k),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(p) => pos = p,
            }
        }
        for (j, v) in items.into_iter().enumerate() {
            self.publish(pos.wrapping_add(j), v);
        }
        Ok(())
    }

    /// Writes the value of a claimed position and publishes it (RING-1).
    fn publish(&self, pos: usize, v: T) {
        let slot = self.slot(pos);
        // SAFETY: our CAS claimed `pos` and its slot was free (seq == pos), so no other thread
        // reads or writes this cell until we publish seq = pos + 1 (RING-1).
        slot.val.with_mut(|p| unsafe { (*p).write(v) });
        slot.seq.store(pos.wrapping_add(1), Ordering::Release);
    }

    /// Pops the oldest published value, or `None` when there is none (a position claimed by a
    /// producer that has not published yet also reads as empty; that producer notifies later).
    pub(crate) fn try_pop(&self) -> Option<T> {
        let mut pos = self.head.0.load(Ordering::Relaxed);
        loop {
            let slot = self.slot(pos);
            let seq = slot.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos.wrapping_add(1)) as isize;
            if diff == 0 {
                match self.head.0.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: seq == pos + 1 means the producer of `pos` published the value
                        // (Acquire above pairs with its Release); our CAS made us its only reader.
                        let v = slot.val.with(|p| unsafe { (*p).assume_init_read() });
                        slot.seq
                            .store(pos.wrapping_add(self.capacity()), Ordering::Release);
                        return Some(v);
                    }
                    Err(p) => pos = p,
                }
            } else if diff < 0 {
                return None;
            } else {
                pos = self.head.0.load(Ordering::Relaxed);
            }
        }
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // RING-2: values still in the ring are dropped with it.
        while self.try_pop().is_some() {}
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn ring_5_capacity_is_at_least_two() {
        assert_eq!(Ring::<u8>::new(1).capacity(), 2);
        assert_eq!(Ring::<u8>::new(0).capacity(), 2);
    }

    #[test]
    fn ring_4_fifo_and_capacity() {
        let r = Ring::new(3);
        assert!(r.try_push(1).is_ok() && r.try_push(2).is_ok() && r.try_push(3).is_ok());
        assert_eq!(r.try_push(4), Err(4));
        assert_eq!(r.len(), 3);
        assert_eq!(r.try_pop(), Some(1));
        assert!(r.try_push(4).is_ok());
        assert_eq!(
            (r.try_pop(), r.try_pop(), r.try_pop(), r.try_pop()),
            (Some(2), Some(3), Some(4), None)
        );
    }

    #[test]
    fn ring_3_batches_fit_whole_or_not_at_all() {
        let r = Ring::new(4);
        r.try_push(0).unwrap();
        assert_eq!(r.try_push_batch(vec![1, 2, 3, 4]), Err(vec![1, 2, 3, 4]));
        r.try_push_batch(vec![1, 2, 3]).unwrap();
        assert_eq!(r.try_push_batch(vec![9; 5]).unwrap_err().len(), 5);
        let got: Vec<i32> = std::iter::from_fn(|| r.try_pop()).collect();
        assert_eq!(got, vec![0, 1, 2, 3]);
    }

    #[test]
    fn ring_2_values_left_in_the_ring_are_dropped() {
        let marker = std::sync::Arc::new(());
        {
            let r = Ring::new(4);
            r.try_push(marker.clone()).unwrap();
            r.try_push(marker.clone()).unwrap();
            drop(r.try_pop());
        }
        assert_eq!(std::sync::Arc::strong_count(&marker), 1);
    }

    #[test]
    fn ring_2_many_threads_every_item_exactly_once() {
        let r = std::sync::Arc::new(Ring::new(8));
        let producers: Vec<_> = (0..3u64)
            .map(|p| {
                let r = r.clone();
                std::thread::spawn(move || {
                    for i in 0..2000u64 {
                        let mut v = p << 32 | i;
                        while let Err(back) = r.try_push(v) {
                            v = back;
                            std::thread::yield_now();
                        }
                    }
                })
            })
            .collect();
        let mut last = [None::<u64>; 3];
        let mut n = 0;
        while n < 6000 {
            match r.try_pop() {
                Some(v) => {
                    let (p, i) = ((v >> 32) as usize, v & 0xffff_ffff);
                    assert!(
                        last[p].is_none_or(|l| l < i),
                        "RING-4: producer {p} out of order"
                    );
                    last[p] = Some(i);
                    n += 1;
                }
                None => std::thread::yield_now(),
            }
        }
        for p in producers {
            p.join().unwrap();
        }
        assert_eq!(r.try_pop(), None);
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::Arc;
    use loom::thread;

    /// RING-1, RING-2, RING-5 over every interleaving (up to two preemptions) of two producers
    /// racing for the last free slot of a ring while a consumer empties it.
    #[test]
    fn loom_ring_two_producers_one_consumer() {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(|| {
            let r = Arc::new(Ring::new(2));
            r.try_push(9).unwrap();
            let ps: Vec<_> = (0..2usize)
                .map(|p| {
                    let r = r.clone();
                    thread::spawn(move || {
                        let mut v = p;
                        while let Err(back) = r.try_push(v) {
                            v = back;
                            thread::yield_now();
                        }
                    })
                })
                .collect();
            let mut got = Vec::new();
            while got.len() < 3 {
                match r.try_pop() {
                    Some(v) => got.push(v),
                    None => thread::yield_now(),
                }
            }
            for p in ps {
                p.join().unwrap();
            }
            assert_eq!(got[0], 9);
            got.sort();
            assert_eq!(got, vec![0, 1, 9], "RING-2: every item exactly once");
        });
    }

    /// RING-4: one producer's items come out in order while a consumer races it.
    #[test]
    fn loom_ring_fifo_per_producer() {
        loom::model(|| {
            let r = Arc::new(Ring::new(2));
            let r2 = r.clone();
            let p = thread::spawn(move || {
                r2.try_push(1).unwrap();
                r2.try_push(2).unwrap();
            });
            let first = r.try_pop();
            p.join().unwrap();
            let rest: Vec<i32> = std::iter::from_fn(|| r.try_pop()).collect();
            let all: Vec<i32> = first.into_iter().chain(rest).collect();
            assert_eq!(all, vec![1, 2]);
        });
    }

    /// RING-3: a batch is seen adjacent and in order even while a single push competes.
    #[test]
    fn loom_ring_batch_is_adjacent() {
        loom::model(|| {
            let r = Arc::new(Ring::new(3));
            let r2 = r.clone();
            let single = thread::spawn(move || {
                let mut v = 9;
                while let Err(back) = r2.try_push(v) {
                    v = back;
                    thread::yield_now();
                }
            });
            let mut batch = vec![1, 2];
            while let Err(back) = r.try_push_batch(batch) {
                batch = back;
                thread::yield_now();
            }
            single.join().unwrap();
            let got: Vec<i32> = std::iter::from_fn(|| r.try_pop()).collect();
            assert!(got == vec![1, 2, 9] || got == vec![9, 1, 2], "{got:?}");
        });
    }

    /// Two consumers racing for the same items never both get one.
    #[test]
    fn loom_ring_two_consumers() {
        loom::model(|| {
            let r = Arc::new(Ring::new(2));
            r.try_push(1).unwrap();
            r.try_push(2).unwrap();
            let r2 = r.clone();
            let c = thread::spawn(move || r2.try_pop());
            let a = r.try_pop();
            let b = c.join().unwrap();
            let rest = r.try_pop();
            let mut all: Vec<i32> = [a, b, rest].into_iter().flatten().collect();
            all.sort();
            assert_eq!(all, vec![1, 2]);
        });
    }
}

//! The synchronisation primitives that lock-free code uses, swappable for loom.
//!
//! Ordinary builds re-export `std`; `RUSTFLAGS="--cfg loom"` swaps in loom's model-checked
//! versions, so the lock-free ring and the parking protocol of the work queues are explored over every
//! interleaving (`RUSTFLAGS="--cfg loom" cargo test -p parallel-workers --release --lib loom`).
//!
//! Invariants:
//! - SYNC-1: code that must be model-checked imports its atomics, `Arc`, `Mutex`, `Condvar` and
//!   `UnsafeCell` from here, never from `std` directly.
//! - SYNC-2: [`UnsafeCell`] has loom's closure API (`with`, `with_mut`) in both builds, so loom can
//!   see every access to the cell's contents.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
#[allow(unused_imports)]
// Arc: for models that share state; the current ones use loom::sync::Arc
pub(crate) use loom::sync::{Arc, Condvar, Mutex};

#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
#[allow(unused_imports)] // the ordinary build parks on futexes; loom's build uses these
pub(crate) use std::sync::{Arc, Condvar, Mutex};

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `std::cell::UnsafeCell` with loom's closure API (SYNC-2).
#[cfg(not(loom))]
#[derive(Debug)]
pub(crate) struct UnsafeCell<T>(std::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    pub(crate) fn new(v: T) -> UnsafeCell<T> {
        UnsafeCell(std::cell::UnsafeCell::new(v))
    }
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

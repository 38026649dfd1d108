//! Parallel's workers (crate parallel-workers): `map` (n threads, joined in order), [`Pool`] (many small jobs), and work queues:
//! [`WorkQueue`] between the threads of one process (typed items, lock-free) and
//! [`HostQueue`] between processes of one host (values in shared memory, opened by name).
//!
//! Threads: a map or pool owns its threads; queues own none, except that the process that
//! creates a [`HostQueue`] runs one small thread that hands the queue's shared memory to the
//! processes that open its name.
//!
//! Invariants are numbered per file: RING-* (ring.rs, the lock-free core), EVENT-* (event.rs,
//! parking without lost wake-ups), WQ-* (queue.rs), MAP-* (map.rs), SHQ-* (shared.rs) and
//! HQ-* (host.rs). The lock-free parts are model-checked with loom:
//! `scripts/loom.sh` (`RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom cargo test -p
//! parallel-workers --release --lib loom`; a separate target directory keeps the ordinary build's
//! artifacts; CI does not run it).
//!
//! From the engine this crate uses only its public API: the configuration, the error type,
//! `runtime::{Deadline, Completion, wait_once}`, values and the wire codec (items in shared
//! memory are encoded as frames are), and the system-call wrappers of `link::sys`.

mod event;
mod sync;
/// The engine's system-call wrappers (memfd, eventfd, Unix sockets passing fds), in one place.
#[cfg(not(loom))]
use parallel_engine::link::sys;
#[cfg(not(loom))]
mod host;
pub mod map;
pub mod queue;
mod ring;
#[cfg(not(loom))]
mod shared;

#[cfg(not(loom))]
pub use host::HostQueue;
pub use map::{MapHandle, Pool, Task, map};
pub use queue::{Channel, Iter, Rejected, Role, WorkQueue};

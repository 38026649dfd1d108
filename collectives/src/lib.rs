//! Parallel's collectives: rendezvous, topology plans, reductions and the algorithms over links.
//!
//! It depends only on `parallel-engine`'s endpoints and values; it knows nothing of Python.

pub mod algorithms;
pub mod control;
pub mod cuda_ops;
mod flat;
pub mod fuse;
pub mod ops;
pub mod plan;
pub mod rendezvous;
pub mod tree;

pub use ops::Op;
pub use parallel_engine as engine;
pub use plan::{Algo, Plan, Probe};
pub use rendezvous::{MemStore, Store, TreeOptions};
pub use tree::Tree;

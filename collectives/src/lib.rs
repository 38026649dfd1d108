//! Parallel's collectives: rendezvous, topology plans, reductions and the algorithms over links.
//!
//! Under construction (issue: Tree). It depends only on `parallel-engine`'s links and values.

pub use parallel_engine as engine;

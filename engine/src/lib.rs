//! Parallel's engine: everything that moves bytes between threads, processes and hosts.
//!
//! Layers (STYLE.md): `wire`, `value`, `buffer` -> `runtime` -> `link` -> `endpoint`.
//! Map, pools and work queues are the crate parallel-workers, on top of this one.
//! The engine knows nothing of Python or collectives.

pub mod buffer;
pub mod config;
pub mod cuda;
pub mod endpoint;
pub mod error;
pub mod link;
pub mod log;
pub mod runtime;
pub mod topology;
/// The old path of [`link`] (the module was `transport` before link kinds had modules of their
/// own): kept so code written against it still builds; new code names `link`.
#[doc(hidden)]
pub mod transport {
    pub use crate::link::*;
}
pub mod value;
pub mod wire;

pub use endpoint::{Client, Conn, Server};
pub use error::{Error, ErrorKind, Result};
pub use link::{LinkKind, Stats};
pub use value::{DType, Device, Key, Tensor, Value};

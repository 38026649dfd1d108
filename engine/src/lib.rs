//! Parallel's engine: everything that moves bytes between threads, processes and hosts.
//!
//! Layers (STYLE.md): `wire`, `value`, `buffer` -> `runtime` -> `transport` -> `endpoint`.
//! Map, pools and work queues are the crate parallel-workers, on top of this one.
//! The engine knows nothing of Python or collectives.

pub mod buffer;
pub mod config;
pub mod cuda;
pub mod endpoint;
pub mod error;
pub mod log;
pub mod runtime;
pub mod topology;
pub mod transport;
pub mod value;
pub mod wire;

pub use endpoint::{Client, Conn, Server};
pub use error::{Error, ErrorKind, Result};
pub use transport::{LinkKind, Stats};
pub use value::{DType, Device, Key, Tensor, Value};

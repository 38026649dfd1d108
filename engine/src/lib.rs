//! Parallel's engine: everything that moves bytes between threads, processes and hosts.
//!
//! Layers (STYLE.md): `wire`, `value`, `buffer` -> `runtime` -> `transport` -> `endpoint`,
//! `workers` (map, pools and work queues).
//! The engine knows nothing of Python or collectives.

pub mod buffer;
pub mod config;
pub mod cuda;
pub mod endpoint;
pub mod error;
pub mod log;
pub mod runtime;
pub(crate) mod sync;
pub mod topology;
pub mod transport;
pub mod value;
pub mod wire;
pub mod workers;

pub use endpoint::{Client, Conn, Server};
pub use error::{Error, ErrorKind, Result};
pub use transport::{LinkKind, Stats};
pub use value::{DType, Device, Key, Tensor, Value};

//! A key-value store to meet through: the launcher's (torchrun's TCPStore, reached from Python),
//! a file, or memory.
//!
//! 1. Rank 0 publishes how to reach its rendezvous server under `<prefix>root`; the other ranks
//!    read it (waiting up to the deadline) and connect. The store carries only that address:
//!    probes, the plan and links travel on our own connections as without a store.
//! 2. Keys are namespaced by the caller's prefix, so several trees over one store (and the
//!    launcher's own keys) never collide.
//! 3. Rank 0 deletes its key once every rank has arrived (or the wait failed): a later tree
//!    under the same prefix (a store opened again, a file store reused) never reads an earlier
//!    tree's address, and the store keeps no key per tree.
//!
//! Invariant STORE-1: `get` returns within its timeout, with a `Timeout` error naming the key
//! when the key never appeared.

use parallel_engine::{Error, ErrorKind, Result};
use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// A key-value store shared by the ranks of a tree (torch.distributed.Store's shape).
pub trait Store: Send + Sync + std::fmt::Debug {
    /// Sets `key` to `value` (replacing an older value).
    fn set(&self, key: &str, value: &[u8]) -> Result<()>;
    /// The value of `key`, waiting up to `timeout` for it to be set (STORE-1).
    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>>;
    /// Removes `key` (no error when it is not there).
    fn delete(&self, key: &str) -> Result<()>;
    /// The host the store lives on, if it has one: rank 0 lists first the address of its
    /// interface that routes there (the members reach the store, so likely rank 0 as well).
    fn host(&self) -> Option<String> {
        None
    }
}

/// A store in this process's memory, for trees whose ranks are threads of one process.
#[derive(Debug, Default)]
pub struct MemStore {
    map: Mutex<HashMap<String, Vec<u8>>>,
    changed: Condvar,
}

impl MemStore {
    pub fn new() -> MemStore {
        MemStore::default()
    }
}

impl Store for MemStore {
    fn set(&self, key: &str, value: &[u8]) -> Result<()> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(key.to_string(), value.to_vec());
        self.changed.notify_all();
        Ok(())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(key);
        Ok(())
    }

    fn get(&self, key: &str, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(v) = m.get(key) {
                return Ok(v.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "store",
                    format!("the key {key:?} was not set within {timeout:?}"),
                ));
            }
            m = self
                .changed
                .wait_timeout(m, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

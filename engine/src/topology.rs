//! Host identity and the local probe.
//!
//! Invariant TOPO-1: two processes get the same [`host_identity`] exactly when they run on the
//! same kernel boot *and* in the same network namespace, which is when a shared-memory link can
//! be set up between them (abstract Unix sockets, used to pass the memory, are per namespace).
//! IP addresses are never compared.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

/// A stable identity of "this host" as far as shared memory is concerned (TOPO-1).
pub fn host_identity() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| {
                // No boot id (unusual): fall back to the hostname plus the process's start, which never
                // matches another process, so the link simply stays TCP.
                format!("unknown-{}", std::process::id())
            });
        let netns = std::fs::metadata("/proc/self/ns/net")
            .map(|m| m.ino())
            .unwrap_or(0);
        format!("{boot}/net:{netns}")
    })
}

/// The machine's host name (for logs and plans).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Number of cores this process may run on.
pub fn usable_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

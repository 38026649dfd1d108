//! Rank 0's entry in a store (STORE-1, STORE-3): written by rank 0 while it waits for the
//! members, read and checked by each member, withdrawn once the rendezvous is over.

use super::Store;
use parallel_engine::{Error, ErrorKind, Result};

/// The store value rank 0 publishes (STORE-1): a version line, the port, the host identity,
/// this rendezvous's token and one address per line.
pub(super) const ROOT_KEY: &str = "root";
const ROOT_FORMAT: &str = "parallel-rendezvous 2";

/// A fresh random token naming one rendezvous (from the OS generator).
pub(super) fn rendezvous_token() -> Result<String> {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most b.len() bytes into b, which we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        return Err(Error::os(
            "tree",
            "getrandom",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// Rank 0's entry in the store while it waits for the members (STORE-3): the members present
/// its token, so a member that read another tree's entry (a key an earlier run left, two trees
/// under one prefix) is refused instead of joining the wrong tree.
pub(super) struct Published<'a> {
    pub(super) store: &'a dyn Store,
    pub(super) key: String,
    pub(super) token: String,
}

impl Published<'_> {
    /// Deletes the entry once every member has arrived or the wait failed (STORE-3). Only an
    /// interrupt is an error: a store that cannot delete just keeps the key.
    pub(super) fn withdraw(&self) -> Result<()> {
        match self.store.delete(&self.key) {
            Err(e) if e.kind() == ErrorKind::Cancelled => Err(e),
            Err(e) => {
                tracing::warn!(
                    "tree rank 0: could not delete the store key {:?} after the rendezvous; it \
                     stays in the store (a later tree under this prefix is refused by its token): {e}",
                    self.key
                );
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }
}

pub(super) fn publish_root(
    store: &dyn Store,
    key: &str,
    port: u16,
    token: &str,
    addrs: &[String],
) -> Result<()> {
    let mut v = format!(
        "{ROOT_FORMAT}\n{port}\n{}\n{token}\n",
        parallel_engine::topology::host_identity()
    );
    v.push_str(&addrs.join("\n"));
    store.set(key, v.as_bytes())
}

/// The root's entry as a member reads it.
#[derive(Debug)]
pub(super) struct RootEntry {
    pub(super) port: u16,
    pub(super) same_host: bool,
    pub(super) token: String,
    pub(super) addrs: Vec<String>,
}

/// Rank 0's port, whether it shares our host, its token and addresses, from the store's value.
pub(super) fn parse_root(key: &str, v: &[u8]) -> Result<RootEntry> {
    let text = String::from_utf8_lossy(v);
    let mut lines = text.lines();
    let bad = || {
        Error::new(
            ErrorKind::Protocol,
            "tree",
            format!(
                "the store's {key:?} holds {:?}, not rank 0's address (another program's key, or a \
                 different version of torch_parallel on rank 0)",
                text.chars().take(80).collect::<String>()
            ),
        )
    };
    if lines.next() != Some(ROOT_FORMAT) {
        return Err(bad());
    }
    let port: u16 = lines.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let same_host = lines.next().ok_or_else(bad)? == parallel_engine::topology::host_identity();
    let token = lines
        .next()
        .filter(|t| !t.is_empty())
        .ok_or_else(bad)?
        .to_string();
    let addrs: Vec<String> = lines.map(str::to_string).collect();
    if addrs.is_empty() {
        return Err(bad());
    }
    Ok(RootEntry {
        port,
        same_host,
        token,
        addrs,
    })
}

//! Rendezvous: from an address, a store or launcher variables to a rank, a plan and open links.
//!
//! 1. Resolve (rank, world size, how to meet) from arguments, else from launcher variables:
//!    ours (PARALLEL_RANK, PARALLEL_WORLD_SIZE, PARALLEL_ROOT), torchrun (RANK, WORLD_SIZE,
//!    MASTER_ADDR, MASTER_PORT), SLURM (SLURM_PROCID, SLURM_NTASKS, the first host of
//!    SLURM_JOB_NODELIST in full hostlist syntax, see [`hostlist`]), Open MPI
//!    (OMPI_COMM_WORLD_RANK/SIZE), PMI/PMIx (PMI_RANK/SIZE, PMIX_RANK). Every one is listed in
//!    the engine's configuration table (engine/src/config/table.rs) and read through its typed
//!    handle (`var::RANK.read()`), checked against its row.
//! 2. With a [`Store`] (torchrun's TCPStore from Python, a file, memory), rank and world size are
//!    required: rank 0 listens on an OS-assigned port and publishes its addresses under
//!    `<prefix>root`; the others read them from the store and connect (see [`store`]). Without
//!    one, rank 0 (or, when ranks are not given, whoever binds the root address first) listens
//!    on the root address; every other rank connects to it, retrying until the deadline, so
//!    ranks may start in any order, minutes apart.
//! 3. Each rank listens on an OS-assigned port on the interface that routes to the root (or
//!    PARALLEL_IFNAME's address) and sends the root its probe. The root assigns missing ranks in
//!    arrival order, builds the plan and sends it to everyone.
//! 4. Each rank opens the links the plan names: the higher rank of a pair connects to the lower
//!    one's server and introduces itself; links to rank 0 reuse the rendezvous connection.
//!
//! Invariants:
//! - RDV-1: every step runs under the one deadline given (default PARALLEL_TIMEOUT), and a
//!   failure names the rank or address that did not answer.
//! - RDV-2: a rank that never arrives fails every other rank within the deadline, naming the
//!   missing ranks (and their hosts where the launcher says): the root stops waiting a margin
//!   before the deadline and tells the members that did arrive; members waiting for a root that
//!   never came name rank 0.
//! - RDV-3: under torchrun (TORCHELASTIC_RUN_ID set), MASTER_ADDR:MASTER_PORT is the launcher's
//!   TCPStore: a tree never binds it. Without a store it is a `Config` error saying what to do.
//!
//! Files: `launcher` resolves step 1; `local` knows this host's addresses and the probe it
//! reports; `entry` is rank 0's entry in a store; `root` and `member` are the two sides of
//! steps 2-3; `links` is step 4.

mod entry;
pub mod hostlist;
mod launcher;
mod links;
mod local;
mod member;
mod root;
pub mod store;
#[cfg(test)]
mod tests;

pub use launcher::resolve;
pub(crate) use links::full_mesh;
pub use store::{MemStore, Store};

use crate::plan::Plan;
use entry::{Published, ROOT_KEY, parse_root, publish_root, rendezvous_token};
use launcher::launcher_host_of;
use local::{candidate_addrs, ifname_addr};
use member::{connect_any, join_as_member};
use parallel_engine::endpoint::Conn;
use parallel_engine::{Client, Error, ErrorKind, Result, Server};
use root::join_as_root;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where the options of a tree come from.
#[derive(Debug, Clone, Default)]
pub struct TreeOptions {
    pub rank: Option<usize>,
    pub world_size: Option<usize>,
    /// "host:port" of rank 0.
    pub root: Option<String>,
    pub timeout: Option<Duration>,
    /// Overrides the host identity this rank reports (ranks are grouped into hosts by it). For
    /// tests that simulate several hosts in one process; links keep their real kind.
    pub host: Option<String>,
    /// Meet through this store instead of a root address (rank and world size then required).
    pub store: Option<Arc<dyn Store>>,
    /// Prefix of this tree's keys in the store: unique per tree over one store (for example
    /// `torch_parallel/tree/3/`), the same on every rank.
    pub store_prefix: String,
}

/// Resolved identity of this rank before the rendezvous.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub rank: Option<usize>,
    pub world: usize,
    pub root_host: String,
    pub root_port: u16,
    pub source: &'static str,
    pub host: Option<String>,
    /// The store to meet through, and this tree's key prefix; `root_host` is then only a hint
    /// (the host of the store or MASTER_ADDR, possibly empty) and `root_port` is 0.
    pub store: Option<(Arc<dyn Store>, String)>,
}

fn left(deadline: Instant) -> Option<Duration> {
    Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    )
}

/// The result of the rendezvous: our rank, the plan, our server, the links to our neighbours.
pub struct Joined {
    pub rank: usize,
    pub plan: Plan,
    pub server: Server,
    pub links: HashMap<usize, Arc<Conn>>,
}

impl std::fmt::Debug for Joined {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Joined(rank {} of {})", self.rank, self.plan.world())
    }
}

/// Steps 2-4 (RDV-1, RDV-2).
pub fn join(r: &Resolved, timeout: Duration) -> Result<Joined> {
    let deadline = Instant::now() + timeout;
    if let Some((store, prefix)) = &r.store {
        return join_by_store(r, store.as_ref(), prefix, timeout, deadline);
    }
    let want_root = r.rank == Some(0) || (r.rank.is_none() && r.world >= 1);
    if want_root {
        match Server::bind(&r.root_host, r.root_port) {
            Ok(s) => return join_as_root(r, s, timeout, deadline, None),
            Err(e) if r.rank == Some(0) => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "tree",
                    format!(
                        "rank 0 cannot listen on the root address {}:{}: {e}",
                        r.root_host, r.root_port
                    ),
                ));
            }
            Err(_) => {} // someone else is the root: join as a client
        }
    }
    let root = Client::connect(&r.root_host, r.root_port, left(deadline)).map_err(|e| {
        Error::new(
            e.kind(),
            "tree",
            format!(
                "rank {} could not reach rank 0 ({}) at the root address {}:{} within {timeout:?}: \
                 rank 0 never arrived, or the address is wrong: {e}",
                r.rank.map_or("?".into(), |k| k.to_string()),
                launcher_host_of(0).unwrap_or_else(|| "host unknown".into()),
                r.root_host,
                r.root_port
            ),
        )
    })?;
    join_as_member(r, root, deadline, None)
}

/// Step 2 through a store: rank 0 publishes its addresses, the others read and connect.
fn join_by_store(
    r: &Resolved,
    store: &dyn Store,
    prefix: &str,
    timeout: Duration,
    deadline: Instant,
) -> Result<Joined> {
    let key = format!("{prefix}{ROOT_KEY}");
    let rank = r.rank.expect("resolve requires a rank with a store");
    if rank == 0 {
        // An OS-assigned port, never a port a launcher owns (RDV-3): on PARALLEL_IFNAME's
        // address when set, else on every interface, as the members may reach us by any.
        let (server, addrs) = match ifname_addr()? {
            Some(a) => (Server::bind(&a, 0)?, vec![a]),
            None => (Server::bind("0.0.0.0", 0)?, candidate_addrs(&r.root_host)?),
        };
        let token = rendezvous_token()?;
        publish_root(store, &key, server.port(), &token, &addrs)?;
        tracing::info!(
            "tree rank 0: rendezvous on port {} via the store key {key:?}, reachable at {addrs:?}",
            server.port()
        );
        let published = Published { store, key, token };
        // Withdrawn once all arrived (inside), or here when the wait failed; not after an
        // interrupt, whose exception must reach the caller before the store is called again.
        return match join_as_root(r, server, timeout, deadline, Some(&published)) {
            Err(e) if e.kind() != ErrorKind::Cancelled => {
                published.withdraw()?;
                Err(e)
            }
            joined => joined,
        };
    }
    let value = store
        .get(&key, deadline.saturating_duration_since(Instant::now()))
        .map_err(|e| {
            let msg = if e.kind() == ErrorKind::Timeout {
                format!(
                    "rank {rank} waited {timeout:?} for rank 0 ({}) to publish its address under \
                     {key:?} in the store: rank 0 never arrived (every rank must create the tree \
                     within the timeout, PARALLEL_TIMEOUT): {e}",
                    launcher_host_of(0).unwrap_or_else(|| "host unknown".into())
                )
            } else {
                // The store itself failed (unreachable, interrupted): no rank is to blame.
                format!(
                    "rank {rank} could not read rank 0's address under {key:?} from the store: {e}"
                )
            };
            Error::new(e.kind(), "tree", msg).with_peer("rank 0")
        })?;
    let e = parse_root(&key, &value)?;
    let root = connect_any(rank, e.port, e.same_host, &e.addrs, deadline)?;
    join_as_member(r, root, deadline, Some(&e.token))
}

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

pub mod hostlist;
pub mod store;

pub use store::{MemStore, Store};

use crate::control::join::{self, Refusal, Rendezvous};
use crate::plan::{Plan, Probe};
use parallel_engine::config::{Key, var};
use parallel_engine::endpoint::Conn;
use parallel_engine::{Client, Error, ErrorKind, Result, Server};
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

/// The first of `keys` that is set, as a whole number checked against its row (each a typed
/// handle of the engine's configuration table, engine/src/config/table.rs).
fn first_uint(keys: &[&'static Key<Option<u64>>]) -> Result<Option<(&'static str, usize)>> {
    for k in keys {
        if let Some(v) = k.read()? {
            return Ok(Some((k.var.name, v as usize)));
        }
    }
    Ok(None)
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

/// Step 1: arguments, then launcher variables.
pub fn resolve(opts: &TreeOptions) -> Result<Resolved> {
    parallel_engine::config::try_config()?; // CONFIG-4
    let (rank, rank_src) = match opts.rank {
        Some(r) => (Some(r), "arguments"),
        None => match first_uint(&[
            &var::PARALLEL_RANK,
            &var::RANK,
            &var::SLURM_PROCID,
            &var::OMPI_COMM_WORLD_RANK,
            &var::PMI_RANK,
            &var::PMIX_RANK,
        ])? {
            Some((n, v)) => (Some(v), n),
            None => (None, "root-assigned"),
        },
    };
    let world = match opts.world_size {
        Some(w) => w,
        None => match first_uint(&[
            &var::PARALLEL_WORLD_SIZE,
            &var::WORLD_SIZE,
            &var::SLURM_NTASKS,
            &var::OMPI_COMM_WORLD_SIZE,
            &var::PMI_SIZE,
        ])? {
            Some((_, v)) => v,
            None => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "tree",
                    "world size unknown: pass world_size=..., or set PARALLEL_WORLD_SIZE (or run under torchrun, SLURM or mpirun)",
                ));
            }
        },
    };
    check_world_rank(world, rank)?;
    if let Some(store) = &opts.store {
        let Some(rank) = rank else {
            return Err(Error::new(
                ErrorKind::Config,
                "tree",
                "a tree over a store needs this process's rank: pass rank=... (or set PARALLEL_RANK)",
            ));
        };
        let hint = match (store.host(), &opts.root) {
            (Some(h), _) => Some(h),
            (None, Some(r)) => Some(split_host_port(r)?.0),
            (None, None) => var::MASTER_ADDR.read()?,
        };
        return Ok(Resolved {
            rank: Some(rank),
            world,
            root_host: hint.unwrap_or_default(),
            root_port: 0,
            source: rank_src,
            host: opts.host.clone(),
            store: Some((store.clone(), opts.store_prefix.clone())),
        });
    }
    let root = root_address(opts)?;
    let (host, port) = split_host_port(&root)?;
    Ok(Resolved {
        rank,
        world,
        root_host: host,
        root_port: port,
        source: rank_src,
        host: opts.host.clone(),
        store: None,
    })
}

fn check_world_rank(world: usize, rank: Option<usize>) -> Result<()> {
    if world == 0 {
        return Err(Error::new(
            ErrorKind::Config,
            "tree",
            "world size must be at least 1",
        ));
    }
    if let Some(r) = rank
        && r >= world
    {
        return Err(Error::new(
            ErrorKind::Config,
            "tree",
            format!("rank {r} is not below the world size {world}"),
        ));
    }
    Ok(())
}

/// Whether this process runs under torchrun (its agent sets these in every worker).
fn under_torchrun() -> Result<bool> {
    Ok(var::TORCHELASTIC_RUN_ID.read()?.is_some()
        || var::TORCHELASTIC_USE_AGENT_STORE.read()?.is_some())
}

/// SLURM's host list variable and its value, the newer name first.
fn slurm_nodelist() -> Result<Option<(&'static str, String)>> {
    for key in [&var::SLURM_JOB_NODELIST, &var::SLURM_NODELIST] {
        if let Some(v) = key.read()? {
            return Ok(Some((key.var.name, v)));
        }
    }
    Ok(None)
}

/// The root address without a store: argument, PARALLEL_ROOT, MASTER_ADDR:MASTER_PORT, the
/// first SLURM host with MASTER_PORT; never torchrun's MASTER_PORT (RDV-3).
fn root_address(opts: &TreeOptions) -> Result<String> {
    if let Some(r) = &opts.root {
        return Ok(r.clone());
    }
    if let Some(r) = var::PARALLEL_ROOT.read()? {
        return Ok(r);
    }
    if under_torchrun()? {
        return Err(Error::new(
            ErrorKind::Config,
            "tree",
            "under torchrun (TORCHELASTIC_RUN_ID is set), MASTER_ADDR:MASTER_PORT is the launcher's own \
             TCPStore, not a free port for the tree's root: create the tree from Python \
             (torch_parallel.tree() meets through the launcher's store), pass a store \
             (TreeOptions.store), or set PARALLEL_ROOT to a free host:port on rank 0's host",
        ));
    }
    let port = var::MASTER_PORT.read()?;
    if let Some(a) = var::MASTER_ADDR.read()? {
        return Ok(format!("{a}:{port}"));
    }
    if let Some((var, list)) = slurm_nodelist()? {
        let hosts = hostlist::expand_hostlist(var, &list)?;
        return Ok(format!("{}:{port}", hosts[0]));
    }
    Err(Error::new(
        ErrorKind::Config,
        "tree",
        "root address unknown: pass root=\"host:port\", or set PARALLEL_ROOT (or MASTER_ADDR and MASTER_PORT)",
    ))
}

/// "host:port" (IPv6 hosts in brackets) split and checked.
fn split_host_port(root: &str) -> Result<(String, u16)> {
    let (host, port) = root.rsplit_once(':').ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "tree",
            format!("root {root:?} is not host:port"),
        )
    })?;
    let port: u16 = port.parse().map_err(|_| {
        Error::new(
            ErrorKind::Config,
            "tree",
            format!("root {root:?} has no valid port"),
        )
    })?;
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, port))
}

/// Where the launcher says rank `k` runs, for error messages: SLURM's node list and tasks per
/// node (ranks in blocks) when the ranks are SLURM's, torchrun's node index, or MASTER_ADDR for
/// rank 0 outside torchrun. Unreadable variables just leave the host out.
fn launcher_host_of(k: usize) -> Option<String> {
    let torchrun = under_torchrun().ok()?;
    if torchrun {
        let per_node = var::LOCAL_WORLD_SIZE.read().ok()??;
        let node = k / per_node.max(1) as usize;
        let mine = var::GROUP_RANK.read().ok()?;
        return Some(if mine == Some(node as u64) {
            format!("torchrun node {node}, this one")
        } else {
            format!("torchrun node {node}")
        });
    }
    if var::SLURM_PROCID.read().ok()?.is_some()
        && let (Some((var, list)), Some(tasks)) = (
            slurm_nodelist().ok()?,
            var::SLURM_TASKS_PER_NODE.read().ok()?,
        )
    {
        let hosts = hostlist::expand_hostlist(var, &list).ok()?;
        let tasks = hostlist::expand_tasks_per_node("SLURM_TASKS_PER_NODE", &tasks).ok()?;
        return hostlist::host_of_rank(&hosts, &tasks, k).map(|h| format!("host {h}"));
    }
    (k == 0)
        .then(|| var::MASTER_ADDR.read().ok().flatten())
        .flatten()
        .map(|h| format!("host {h}"))
}

/// "rank 2 (host n3), rank 5" for error messages.
fn describe_ranks(ranks: &[usize]) -> String {
    let shown: Vec<String> = ranks
        .iter()
        .take(16)
        .map(|&k| match launcher_host_of(k) {
            Some(h) => format!("rank {k} ({h})"),
            None => format!("rank {k}"),
        })
        .collect();
    let more = ranks.len().saturating_sub(shown.len());
    let mut s = shown.join(", ");
    if more > 0 {
        s.push_str(&format!(" and {more} more"));
    }
    s
}

/// The IPv4 addresses of the interfaces that are up, with their names, in the kernel's order.
fn ipv4_interfaces() -> Result<Vec<(String, std::net::Ipv4Addr)>> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(Error::os(
            "tree",
            "getifaddrs",
            std::io::Error::last_os_error(),
        ));
    }
    let mut found = Vec::new();
    let mut p = ifap;
    while !p.is_null() {
        // SAFETY: walking the list returned by getifaddrs.
        let ifa = unsafe { &*p };
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let n = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_string_lossy();
        let family = if ifa.ifa_addr.is_null() {
            -1
        } else {
            // SAFETY: a non-NULL ifa_addr points at a sockaddr of its family.
            i32::from(unsafe { (*ifa.ifa_addr).sa_family })
        };
        if family == libc::AF_INET && ifa.ifa_flags & libc::IFF_UP as u32 != 0 {
            // SAFETY: family checked above.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
            found.push((n.into_owned(), ip));
        }
        p = ifa.ifa_next;
    }
    // SAFETY: freeing the list we got.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(found)
}

/// The address of the interface named by PARALLEL_IFNAME, if set.
fn ifname_addr() -> Result<Option<String>> {
    let Some(name) = var::PARALLEL_IFNAME.read()? else {
        return Ok(None);
    };
    ipv4_interfaces()?
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, ip)| Some(ip.to_string()))
        .ok_or_else(|| {
            Error::new(
                ErrorKind::Config,
                "tree",
                format!("PARALLEL_IFNAME={name:?} has no IPv4 address here"),
            )
        })
}

/// The local address the kernel would use to reach `host` (no packet is sent).
fn route_to(host: &str) -> Option<std::net::IpAddr> {
    use std::net::ToSocketAddrs;
    let to = (host, 9).to_socket_addrs().ok()?.find(|a| a.is_ipv4())?;
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(to).ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_unspecified()).then_some(ip)
}

/// Every address rank 0 may be reached at, best first: PARALLEL_IFNAME's, the one routing to
/// `hint` (the store's host, MASTER_ADDR), the other interfaces', loopback last (tried only by
/// members on the same host). In a network namespace there may be no default route, so a
/// single guess is not enough.
fn candidate_addrs(hint: &str) -> Result<Vec<String>> {
    let mut out: Vec<String> = ifname_addr()?.into_iter().collect();
    if !hint.is_empty()
        && let Some(ip) = route_to(hint)
    {
        out.push(ip.to_string());
    }
    let all = ipv4_interfaces()?;
    out.extend(
        all.iter()
            .filter(|(_, ip)| !ip.is_loopback())
            .map(|(_, ip)| ip.to_string()),
    );
    out.push("127.0.0.1".into());
    let mut seen = std::collections::HashSet::new();
    out.retain(|a| seen.insert(a.clone()));
    Ok(out)
}

/// The store value rank 0 publishes (STORE-1): a version line, the port, the host identity,
/// this rendezvous's token and one address per line.
const ROOT_KEY: &str = "root";
const ROOT_FORMAT: &str = "parallel-rendezvous 2";

/// A fresh random token naming one rendezvous (from the OS generator).
fn rendezvous_token() -> Result<String> {
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
struct Published<'a> {
    store: &'a dyn Store,
    key: String,
    token: String,
}

impl Published<'_> {
    /// Deletes the entry once every member has arrived or the wait failed (STORE-3). Only an
    /// interrupt is an error: a store that cannot delete just keeps the key.
    fn withdraw(&self) -> Result<()> {
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

fn publish_root(
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
struct RootEntry {
    port: u16,
    same_host: bool,
    token: String,
    addrs: Vec<String>,
}

/// Rank 0's port, whether it shares our host, its token and addresses, from the store's value.
fn parse_root(key: &str, v: &[u8]) -> Result<RootEntry> {
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

fn probe_of(rank: usize, addr: String, port: u16, host: Option<&str>) -> Probe {
    let numa = std::fs::read_dir("/sys/devices/system/node")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("node"))
                .count()
        })
        .unwrap_or(1)
        .max(1);
    Probe {
        rank,
        host_id: host
            .unwrap_or(parallel_engine::topology::host_identity())
            .to_string(),
        hostname: parallel_engine::topology::hostname(),
        addr,
        port,
        cores: parallel_engine::topology::usable_cores(),
        numa_nodes: numa,
        pid: std::process::id(),
        gpus: parallel_engine::cuda::gpu_ids(),
    }
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

/// Tries rank 0's addresses in order, round after round, until one answers or the deadline.
fn connect_any(
    rank: usize,
    port: u16,
    same_host: bool,
    addrs: &[String],
    deadline: Instant,
) -> Result<Client> {
    let usable: Vec<&String> = addrs
        .iter()
        .filter(|a| same_host || !a.starts_with("127."))
        .collect();
    if usable.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            "tree",
            format!(
                "rank {rank}: rank 0 is on another host and published only loopback addresses \
                 {addrs:?}: give rank 0's host a routable interface, or set PARALLEL_IFNAME on \
                 rank 0"
            ),
        )
        .with_peer("rank 0"));
    }
    let mut last: Option<Error> = None;
    loop {
        for a in &usable {
            let per_try = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            if per_try.is_zero() {
                let e = last.unwrap_or_else(|| {
                    Error::new(ErrorKind::Timeout, "tree", "the deadline passed")
                });
                return Err(Error::new(
                    e.kind(),
                    "tree",
                    format!(
                        "rank {rank} could not connect to rank 0 on port {port} at any of its \
                         addresses {usable:?} (set PARALLEL_IFNAME on rank 0 to the interface the \
                         others reach it by): {e}"
                    ),
                )
                .with_peer("rank 0"));
            }
            match Client::connect(a, port, Some(per_try)) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        // A round that failed fast (a wrong server refusing the handshake) does not spin.
        std::thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
}

/// How long before the deadline the root stops waiting for arrivals, so that the members that
/// did arrive hear which ranks are missing before their own deadline passes (RDV-2).
fn arrival_margin(timeout: Duration) -> Duration {
    (timeout / 5).min(Duration::from_secs(3))
}

/// The ranks that never arrived, told to those that did (RDV-2).
fn missing_error(
    n: usize,
    probes: &[Option<Probe>],
    unassigned: usize,
    arrived: &[&Arc<Conn>],
    timeout: Duration,
    cause: Error,
) -> Error {
    let missing: Vec<usize> = (1..n).filter(|&k| probes[k].is_none()).collect();
    let count = missing.len() - unassigned;
    let who = if unassigned == 0 {
        describe_ranks(&missing)
    } else {
        format!("{count} of {}", describe_ranks(&missing))
    };
    let msg = format!(
        "rank 0 waited {timeout:?} for the tree's {n} ranks: {who} never arrived ({} of {n} \
         arrived; every rank must create the tree within the timeout, PARALLEL_TIMEOUT)",
        n - count
    );
    let refusal = join::to_value(&Rendezvous::Refused {
        why: Refusal::Timeout,
        msg: msg.clone(),
    });
    for conn in arrived {
        if let Ok(v) = &refusal {
            let _ = conn.send(v, Some(Duration::from_millis(500)));
        }
    }
    Error::new(ErrorKind::Timeout, "tree", msg).with_cause(cause)
}

fn join_as_root(
    r: &Resolved,
    server: Server,
    timeout: Duration,
    deadline: Instant,
    published: Option<&Published<'_>>,
) -> Result<Joined> {
    let n = r.world;
    tracing::info!("tree rank 0: rendezvous on {} for {n} ranks", server.addr());
    let arrivals_until = deadline
        .checked_sub(arrival_margin(timeout))
        .unwrap_or(deadline);
    let my_addr = if r.store.is_some() {
        candidate_addrs(&r.root_host)?.remove(0)
    } else {
        r.root_host.clone()
    };
    let mut probes: Vec<Option<Probe>> = vec![None; n];
    probes[0] = Some(probe_of(0, my_addr, server.port(), r.host.as_deref()));
    let mut pending: Vec<(Arc<Conn>, Probe, bool)> = Vec::new(); // (conn, probe, rank was given)
    let mut waiting_rank: Vec<(Arc<Conn>, Probe)> = Vec::new();
    while pending.len() + waiting_rank.len() < n - 1 {
        let (v, conn) = match server.recv_any(None, left(arrivals_until)) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Timeout => {
                let arrived: Vec<&Arc<Conn>> = pending
                    .iter()
                    .map(|p| &p.0)
                    .chain(waiting_rank.iter().map(|w| &w.0))
                    .collect();
                return Err(missing_error(
                    n,
                    &probes,
                    waiting_rank.len(),
                    &arrived,
                    timeout,
                    e,
                ));
            }
            Err(e) => {
                return Err(Error::new(
                    e.kind(),
                    "tree",
                    format!(
                        "rank 0 waited for {} more rank(s) to join ({} of {n} arrived): {e}",
                        n - 1 - pending.len() - waiting_rank.len(),
                        pending.len() + waiting_rank.len() + 1
                    ),
                ));
            }
        };
        let (world, asked, probe, token) = match join::from_value(conn.peer(), &v)? {
            Rendezvous::Join {
                world,
                rank,
                probe,
                token,
            } => (world, rank, probe, token),
            other => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "tree",
                    format!("{} sent {other:?} where a join was expected", conn.peer()),
                ));
            }
        };
        if let Some(p) = published
            && token.as_deref() != Some(p.token.as_str())
        {
            refuse_stranger(&conn, &p.key);
            continue;
        }
        if world != n {
            let msg = format!(
                "{} says the world size is {world}, rank 0 says {n}",
                conn.peer()
            );
            refuse(&conn, &msg);
            return Err(Error::new(ErrorKind::Mismatch, "tree", msg));
        }
        match asked {
            Some(k) => {
                if k == 0 || k >= n || probes[k].is_some() {
                    let msg = format!(
                        "{} asks for rank {k}, which is taken or out of range (world {n})",
                        conn.peer()
                    );
                    refuse(&conn, &msg);
                    return Err(Error::new(ErrorKind::Mismatch, "tree", msg));
                }
                probes[k] = Some(Probe {
                    rank: k,
                    ..probe.clone()
                });
                pending.push((conn, probe, true));
            }
            None => waiting_rank.push((conn, probe)),
        }
    }
    if let Some(p) = published {
        p.withdraw()?;
    }
    for (conn, probe) in waiting_rank {
        let k = probes
            .iter()
            .position(Option::is_none)
            .expect("a free rank remains");
        probes[k] = Some(Probe {
            rank: k,
            ..probe.clone()
        });
        pending.push((conn, Probe { rank: k, ..probe }, false));
    }
    let plan = Plan::build(
        probes
            .into_iter()
            .map(|p| p.expect("all ranks joined"))
            .collect(),
    )?;
    let mut links = HashMap::new();
    let edges = plan.edges();
    for (conn, probe, _) in pending {
        let k = plan
            .probes
            .iter()
            .find(|p| p.pid == probe.pid && p.host_id == probe.host_id && p.port == probe.port)
            .map(|p| p.rank)
            .expect("probe in plan");
        let placed = Rendezvous::Placed {
            rank: k,
            plan: plan.clone(),
        };
        conn.send(&join::to_value(&placed)?, left(deadline))?;
        if edges.contains(&(0, k)) {
            links.insert(k, conn);
        } else {
            conn.close();
        }
    }
    finish_links(0, &plan, &server, links, deadline)
}

/// Refuses a member that presented another rendezvous's token (STORE-3); rank 0 goes on
/// waiting for its own members.
fn refuse_stranger(conn: &Arc<Conn>, key: &str) {
    let msg = format!(
        "{} read rank 0's address under the store key {key:?} from another tree or job (a key an \
         earlier run left in the store, or two trees created under one prefix): use a fresh store \
         or a distinct prefix per tree, and create the trees in the same order on every rank",
        conn.peer()
    );
    tracing::warn!("tree rank 0: refused a member: {msg}");
    if let Ok(v) = join::to_value(&Rendezvous::Refused {
        why: Refusal::Stranger,
        msg,
    }) {
        let _ = conn.send(&v, Some(Duration::from_secs(1)));
    }
    conn.close();
}

/// Tells a member why rank 0 refuses it (a mismatch).
fn refuse(conn: &Conn, msg: &str) {
    if let Ok(v) = join::to_value(&Rendezvous::Refused {
        why: Refusal::Mismatch,
        msg: msg.to_string(),
    }) {
        let _ = conn.send(&v, Some(Duration::from_secs(1)));
    }
}

fn join_as_member(
    r: &Resolved,
    root: Client,
    deadline: Instant,
    token: Option<&str>,
) -> Result<Joined> {
    let my_addr = match ifname_addr()? {
        Some(a) => a,
        None => root
            .conn()
            .link()
            .local_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "127.0.0.1".into()),
    };
    let server = Server::bind(&my_addr, 0)?;
    tracing::info!(
        "tree rank {:?}: listening on {} (the interface routing to the root)",
        r.rank,
        server.addr()
    );
    let probe = probe_of(
        r.rank.unwrap_or(0),
        my_addr,
        server.port(),
        r.host.as_deref(),
    );
    root.send(&join::to_value(&Rendezvous::Join {
        world: r.world,
        rank: r.rank,
        probe,
        token: token.map(str::to_string),
    })?)?;
    let reply = root.recv(left(deadline)).map_err(|e| {
        Error::new(
            e.kind(),
            "tree",
            format!(
                "rank {} waited for the plan from rank 0: {e} (when a rank never arrives, rank 0 \
                 names it shortly before the deadline; see rank 0's error)",
                r.rank.map_or("?".into(), |k| k.to_string())
            ),
        )
        .with_peer("rank 0")
    })?;
    let (rank, plan) = match join::from_value("rank 0", &reply)? {
        Rendezvous::Placed { rank, plan } => (rank, plan),
        Rendezvous::Refused {
            why: Refusal::Timeout,
            msg,
        } => {
            return Err(Error::new(
                ErrorKind::Timeout,
                "tree",
                format!("rank 0 reports: {msg}"),
            ));
        }
        Rendezvous::Refused { msg, .. } => {
            return Err(Error::new(
                ErrorKind::Mismatch,
                "tree",
                format!("the root refused this rank: {msg}"),
            ));
        }
        other => {
            return Err(Error::new(
                ErrorKind::Protocol,
                "tree",
                format!("rank 0 sent {other:?} where the plan was expected"),
            ));
        }
    };
    let mut links = HashMap::new();
    if plan.edges().contains(&(0, rank)) {
        links.insert(0, root.conn().clone());
    } else {
        root.close();
    }
    finish_links(rank, &plan, &server, links, deadline)
}

/// Step 4: connect to lower neighbours, accept higher ones.
fn finish_links(
    rank: usize,
    plan: &Plan,
    server: &Server,
    mut links: HashMap<usize, Arc<Conn>>,
    deadline: Instant,
) -> Result<Joined> {
    let edges = plan.edges();
    let mine: Vec<(usize, usize)> = edges
        .iter()
        .copied()
        .filter(|(a, b)| *a == rank || *b == rank)
        .collect();
    for (a, b) in &mine {
        if *b == rank && *a != 0 {
            let p = &plan.probes[*a];
            let c = Client::connect(&p.addr, p.port, left(deadline)).map_err(|e| {
                Error::new(
                    e.kind(),
                    "tree",
                    format!(
                        "rank {rank} could not connect to rank {a} at {}:{}: {e}",
                        p.addr, p.port
                    ),
                )
            })?;
            c.send(&join::to_value(&Rendezvous::LinkFrom { rank })?)?;
            links.insert(*a, c.conn().clone());
        }
    }
    let expect: Vec<usize> = mine
        .iter()
        .filter(|(a, _)| *a == rank)
        .map(|(_, b)| *b)
        .filter(|b| !links.contains_key(b))
        .collect();
    let mut missing = expect.clone();
    if !expect.is_empty() {
        // Each higher neighbour opens one connection and introduces itself first; only that first
        // message is read here (a neighbour may already have sent its first collective frame).
        server.wait_for(expect.len(), left(deadline)).map_err(|e| {
            Error::new(
                e.kind(),
                "tree",
                format!("rank {rank} waited for ranks {missing:?} to connect: {e}"),
            )
        })?;
        for conn in server.connections() {
            let v = conn.recv(left(deadline)).map_err(|e| {
                Error::new(
                    e.kind(),
                    "tree",
                    format!("rank {rank}: link set-up from {}: {e}", conn.peer()),
                )
            })?;
            match join::from_value(conn.peer(), &v) {
                Ok(Rendezvous::LinkFrom { rank: k }) if missing.contains(&k) => {
                    missing.retain(|x| *x != k);
                    links.insert(k, conn);
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "tree",
                        format!(
                            "rank {rank}: unexpected connection from {} during link set-up (waiting for ranks {missing:?})",
                            conn.peer()
                        ),
                    ));
                }
            }
        }
    }
    Ok(Joined {
        rank,
        plan: plan.clone(),
        server: server.clone(),
        links,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rdv_resolve_from_arguments() {
        let r = resolve(&TreeOptions {
            rank: Some(1),
            world_size: Some(3),
            root: Some("[::1]:1234".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            (r.rank, r.world, r.root_host.as_str(), r.root_port),
            (Some(1), 3, "::1", 1234)
        );
        let e = resolve(&TreeOptions {
            rank: Some(3),
            world_size: Some(3),
            root: Some("h:1".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("rank 3"), "{e}");
    }

    fn store_opts(store: &Arc<MemStore>, rank: usize, world: usize, secs: f64) -> TreeOptions {
        TreeOptions {
            rank: Some(rank),
            world_size: Some(world),
            timeout: Some(Duration::from_secs_f64(secs)),
            store: Some(store.clone() as Arc<dyn Store>),
            store_prefix: "test/tree/0/".into(),
            ..Default::default()
        }
    }

    fn join_threads(
        store: &Arc<MemStore>,
        ranks: &[usize],
        world: usize,
        secs: f64,
    ) -> Vec<Result<Joined>> {
        let hs: Vec<_> = ranks
            .iter()
            .map(|&k| {
                let o = store_opts(store, k, world, secs);
                std::thread::spawn(move || join(&resolve(&o)?, o.timeout.unwrap()))
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    }

    /// Rank 0 deletes its entry once the rendezvous is over: the store keeps no key per tree.
    fn assert_root_entry_deleted(store: &dyn Store) {
        let e = store.get("test/tree/0/root", Duration::ZERO).unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::Timeout,
            "rank 0's key was left in the store: {e}"
        );
    }

    #[test]
    fn store_1_ranks_meet_through_a_store_and_agree_on_one_plan() {
        let store = Arc::new(MemStore::new());
        let joined = join_threads(&store, &[2, 0, 1], 3, 20.0);
        let joined: Vec<Joined> = joined.into_iter().map(Result::unwrap).collect();
        let mut ranks: Vec<usize> = joined.iter().map(|j| j.rank).collect();
        ranks.sort_unstable();
        assert_eq!(ranks, [0, 1, 2]);
        assert!(joined.iter().all(|j| j.plan == joined[0].plan));
        assert_root_entry_deleted(&*store);
    }

    #[test]
    fn store_1_rank_0s_entry_reads_back_as_written() {
        let store = MemStore::new();
        let addrs = vec!["10.1.2.3".to_string(), "127.0.0.1".to_string()];
        publish_root(&store, "p/root", 4321, "abc", &addrs).unwrap();
        let e = parse_root("p/root", &store.get("p/root", Duration::ZERO).unwrap()).unwrap();
        assert_eq!((e.port, e.same_host, e.token.as_str()), (4321, true, "abc"));
        assert_eq!(e.addrs, addrs);
        let old = b"parallel-rendezvous 1\n4321\nh\n10.1.2.3";
        assert_eq!(
            parse_root("p/root", old).unwrap_err().kind(),
            ErrorKind::Protocol
        );
    }

    #[test]
    fn store_3_a_member_with_a_stale_entry_naming_another_trees_port_is_refused_never_joining_it() {
        let (a, b) = (Arc::new(MemStore::new()), Arc::new(MemStore::new()));
        let opts = |store: &Arc<MemStore>, rank: usize, host: &str| TreeOptions {
            host: Some(host.into()),
            ..store_opts(store, rank, 2, 30.0)
        };
        let root_a = opts(&a, 0, "tree-a");
        let root = std::thread::spawn(move || join(&resolve(&root_a)?, Duration::from_secs(30)));
        // Tree B's store holds an entry an earlier run left, naming the port that tree A's
        // root now listens on: B's member reaches A's root, which is still waiting.
        let entry = a.get("test/tree/0/root", Duration::from_secs(20)).unwrap();
        let mut lines: Vec<&str> = std::str::from_utf8(&entry).unwrap().lines().collect();
        let earlier = rendezvous_token().unwrap();
        assert_ne!(lines[3], earlier);
        lines[3] = &earlier;
        b.set("test/tree/0/root", lines.join("\n").as_bytes())
            .unwrap();
        let t0 = Instant::now();
        let e = join(
            &resolve(&opts(&b, 1, "tree-b")).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        assert!(e.to_string().contains("another tree"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
        // Tree A's own member still joins it, and A's plan holds only A's ranks.
        let member = join(
            &resolve(&opts(&a, 1, "tree-a")).unwrap(),
            Duration::from_secs(30),
        )
        .unwrap();
        let root = root.join().expect("root thread").unwrap();
        assert_eq!(member.plan, root.plan);
        assert!(root.plan.probes.iter().all(|p| p.host_id == "tree-a"));
    }

    #[test]
    fn store_1_a_store_needs_a_rank() {
        let store = Arc::new(MemStore::new());
        let mut o = store_opts(&store, 0, 2, 1.0);
        o.rank = None;
        let e = resolve(&o).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        assert!(e.to_string().contains("rank"), "{e}");
    }

    #[test]
    fn rdv_2_a_rank_that_never_arrives_fails_the_others_within_the_timeout_naming_it() {
        let store = Arc::new(MemStore::new());
        let t0 = Instant::now();
        let results = join_threads(&store, &[0, 1], 3, 3.0);
        let took = t0.elapsed();
        for r in results {
            let e = r.unwrap_err();
            let msg = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{msg}");
            assert!(
                msg.contains("rank 2") && msg.contains("never arrived"),
                "{msg}"
            );
        }
        assert!(took < Duration::from_secs(5), "took {took:?}");
        assert_root_entry_deleted(&*store);
    }

    #[test]
    fn rdv_2_members_waiting_for_a_root_that_never_publishes_name_rank_0() {
        let store = Arc::new(MemStore::new());
        let results = join_threads(&store, &[1, 2], 3, 1.0);
        for r in results {
            let e = r.unwrap_err();
            let msg = e.to_string();
            assert_eq!(e.kind(), ErrorKind::Timeout, "{msg}");
            assert!(
                msg.contains("rank 0") && msg.contains("never arrived"),
                "{msg}"
            );
        }
    }

    /// A store whose server is gone: every call fails at once.
    #[derive(Debug)]
    struct BrokenStore;

    impl Store for BrokenStore {
        fn set(&self, _: &str, _: &[u8]) -> Result<()> {
            Err(Error::new(ErrorKind::PeerLost, "store", "connection reset"))
        }
        fn get(&self, _: &str, _: Duration) -> Result<Vec<u8>> {
            Err(Error::new(ErrorKind::PeerLost, "store", "connection reset"))
        }
        fn delete(&self, _: &str) -> Result<()> {
            Err(Error::new(ErrorKind::PeerLost, "store", "connection reset"))
        }
    }

    #[test]
    fn rdv_1_a_failing_store_is_reported_as_such_not_as_a_rank_that_never_arrived() {
        let o = TreeOptions {
            rank: Some(1),
            world_size: Some(2),
            store: Some(Arc::new(BrokenStore)),
            store_prefix: "p/".into(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let e = join(&resolve(&o).unwrap(), Duration::from_secs(30)).unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.kind(), ErrorKind::PeerLost, "{msg}");
        assert!(
            msg.contains("connection reset") && msg.contains("p/root"),
            "{msg}"
        );
        assert!(
            !msg.contains("never arrived") && !msg.contains("waited"),
            "{msg}"
        );
        assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    }

    #[test]
    fn store_1_loopback_of_another_host_is_never_tried() {
        let t0 = Instant::now();
        let e = connect_any(
            1,
            1,
            false,
            &["127.0.0.1".into()],
            Instant::now() + Duration::from_secs(30),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config, "{e}");
        assert!(e.to_string().contains("only loopback"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn store_1_a_foreign_value_under_the_key_is_a_protocol_error() {
        let e = parse_root("p/root", b"127.0.0.1:29500").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("p/root"), "{e}");
    }
}

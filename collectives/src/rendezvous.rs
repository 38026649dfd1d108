//! Rendezvous: from an address or launcher variables to a rank, a plan and open links.
//!
//! 1. Resolve (rank, world size, root address) from arguments, else from launcher variables:
//!    ours (PARALLEL_RANK, PARALLEL_WORLD_SIZE, PARALLEL_ROOT), torchrun (RANK, WORLD_SIZE,
//!    MASTER_ADDR, MASTER_PORT), SLURM (SLURM_PROCID, SLURM_NTASKS, first host of
//!    SLURM_NODELIST), Open MPI (OMPI_COMM_WORLD_RANK/SIZE), PMI/PMIx (PMI_RANK/SIZE, PMIX_RANK).
//!    Every one is listed in the engine's configuration (engine/src/config.rs, LAUNCHER) and read
//!    through it, checked against its row.
//! 2. Rank 0 (or, when ranks are not given, whoever binds the root address first) listens on the
//!    root address; every other rank connects to it, retrying until the deadline, so ranks may
//!    start in any order, minutes apart.
//! 3. Each rank listens on an OS-assigned port on the interface that routes to the root (or
//!    PARALLEL_IFNAME's address) and sends the root its probe. The root assigns missing ranks in
//!    arrival order, builds the plan and sends it to everyone.
//! 4. Each rank opens the links the plan names: the higher rank of a pair connects to the lower
//!    one's server and introduces itself; links to rank 0 reuse the rendezvous connection.
//!
//! Invariant RDV-1: every step runs under the one deadline given (default PARALLEL_TIMEOUT), and
//! a failure names the rank or address that did not answer.

use crate::plan::{Plan, Probe, dict};
use parallel_engine::endpoint::Conn;
use parallel_engine::value::Value;
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
}

/// A launcher variable, read through the engine's configuration, which lists every variable
/// (TABLE and LAUNCHER in engine/src/config.rs) and checks it against its row: a malformed value
/// is a `Config` error naming it.
fn env(name: &str) -> Result<Option<String>> {
    parallel_engine::config::launcher_var(name)
}

/// The first of `names` that is set, as a whole number checked against its row.
fn first_uint(names: &[&'static str]) -> Result<Option<(&'static str, usize)>> {
    for n in names {
        if let Some(v) = parallel_engine::config::launcher_uint(n)? {
            return Ok(Some((n, v as usize)));
        }
    }
    Ok(None)
}

/// The first host of a SLURM node list such as `node[01-04,07],gpu5`.
pub fn first_slurm_host(list: &str) -> Option<String> {
    let first = list.split(',').next()?.trim();
    match first.split_once('[') {
        None => Some(first.to_string()).filter(|s| !s.is_empty()),
        Some((prefix, rest)) => {
            let inner = rest.split([',', ']']).next()?;
            let start = inner.split('-').next()?;
            Some(format!("{prefix}{start}"))
        }
    }
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
}

/// Step 1: arguments, then launcher variables.
pub fn resolve(opts: &TreeOptions) -> Result<Resolved> {
    parallel_engine::config::try_config()?; // CONFIG-4
    let (rank, rank_src) = match opts.rank {
        Some(r) => (Some(r), "arguments"),
        None => match first_uint(&[
            "PARALLEL_RANK",
            "RANK",
            "SLURM_PROCID",
            "OMPI_COMM_WORLD_RANK",
            "PMI_RANK",
            "PMIX_RANK",
        ])? {
            Some((n, v)) => (Some(v), n),
            None => (None, "root-assigned"),
        },
    };
    let world = match opts.world_size {
        Some(w) => w,
        None => match first_uint(&[
            "PARALLEL_WORLD_SIZE",
            "WORLD_SIZE",
            "SLURM_NTASKS",
            "OMPI_COMM_WORLD_SIZE",
            "PMI_SIZE",
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
    let root = match &opts.root {
        Some(r) => r.clone(),
        None => match (
            env("PARALLEL_ROOT")?,
            env("MASTER_ADDR")?,
            env("SLURM_NODELIST")?.and_then(|l| first_slurm_host(&l)),
        ) {
            (Some(r), _, _) => r,
            (None, Some(a), _) => format!(
                "{a}:{}",
                parallel_engine::config::launcher_uint("MASTER_PORT")?.unwrap_or(29500)
            ),
            (None, None, Some(h)) => format!(
                "{h}:{}",
                parallel_engine::config::launcher_uint("MASTER_PORT")?.unwrap_or(29500)
            ),
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "tree",
                    "root address unknown: pass root=\"host:port\", or set PARALLEL_ROOT (or MASTER_ADDR and MASTER_PORT)",
                ));
            }
        },
    };
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
    Ok(Resolved {
        rank,
        world,
        root_host: host,
        root_port: port,
        source: rank_src,
        host: opts.host.clone(),
    })
}

/// The address of the interface named by PARALLEL_IFNAME, if set.
fn ifname_addr() -> Result<Option<String>> {
    let Some(name) = env("PARALLEL_IFNAME")? else {
        return Ok(None);
    };
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(Error::os(
            "tree",
            "getifaddrs",
            std::io::Error::last_os_error(),
        ));
    }
    let mut found = None;
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
        if n == name && family == libc::AF_INET {
            // SAFETY: family checked above.
            let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
            found = Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).to_string());
            break;
        }
        p = ifa.ifa_next;
    }
    // SAFETY: freeing the list we got.
    unsafe { libc::freeifaddrs(ifap) };
    found.map(Some).ok_or_else(|| {
        Error::new(
            ErrorKind::Config,
            "tree",
            format!("PARALLEL_IFNAME={name:?} has no IPv4 address here"),
        )
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

/// Steps 2-4 (RDV-1).
pub fn join(r: &Resolved, timeout: Duration) -> Result<Joined> {
    let deadline = Instant::now() + timeout;
    let want_root = r.rank == Some(0) || (r.rank.is_none() && r.world >= 1);
    if want_root {
        match Server::bind(&r.root_host, r.root_port) {
            Ok(s) => return join_as_root(r, s, deadline),
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
    join_as_member(r, deadline)
}

fn join_as_root(r: &Resolved, server: Server, deadline: Instant) -> Result<Joined> {
    let n = r.world;
    tracing::info!("tree rank 0: rendezvous on {} for {n} ranks", server.addr());
    let mut probes: Vec<Option<Probe>> = vec![None; n];
    probes[0] = Some(probe_of(
        0,
        r.root_host.clone(),
        server.port(),
        r.host.as_deref(),
    ));
    let mut pending: Vec<(Arc<Conn>, Probe, bool)> = Vec::new(); // (conn, probe, rank was given)
    let mut waiting_rank: Vec<(Arc<Conn>, Probe)> = Vec::new();
    while pending.len() + waiting_rank.len() < n - 1 {
        let (v, conn) = server.recv_any(None, left(deadline)).map_err(|e| {
            Error::new(
                e.kind(),
                "tree",
                format!(
                    "rank 0 waited for {} more rank(s) to join ({} of {n} arrived): {e}",
                    n - 1 - pending.len() - waiting_rank.len(),
                    pending.len() + waiting_rank.len() + 1
                ),
            )
        })?;
        let world = v.get("world").and_then(Value::as_int).unwrap_or(-1);
        let probe = v
            .get("probe")
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    "tree",
                    format!("{} sent no probe", conn.peer()),
                )
            })
            .and_then(Probe::from_value)?;
        if world != n as i64 {
            let msg = format!(
                "{} says the world size is {world}, rank 0 says {n}",
                conn.peer()
            );
            let _ = conn.send(
                &dict(vec![("error", Value::str(&msg))]),
                Some(Duration::from_secs(1)),
            );
            return Err(Error::new(ErrorKind::Mismatch, "tree", msg));
        }
        match v.get("rank").and_then(Value::as_int) {
            Some(k) if k >= 0 => {
                let k = k as usize;
                if k == 0 || k >= n || probes[k].is_some() {
                    let msg = format!(
                        "{} asks for rank {k}, which is taken or out of range (world {n})",
                        conn.peer()
                    );
                    let _ = conn.send(
                        &dict(vec![("error", Value::str(&msg))]),
                        Some(Duration::from_secs(1)),
                    );
                    return Err(Error::new(ErrorKind::Mismatch, "tree", msg));
                }
                probes[k] = Some(Probe {
                    rank: k,
                    ..probe.clone()
                });
                pending.push((conn, probe, true));
            }
            _ => waiting_rank.push((conn, probe)),
        }
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
        conn.send(
            &dict(vec![
                ("rank", Value::Int(k as i64)),
                ("plan", plan.to_value()),
            ]),
            left(deadline),
        )?;
        if edges.contains(&(0, k)) {
            links.insert(k, conn);
        } else {
            conn.close();
        }
    }
    finish_links(0, &plan, &server, links, deadline)
}

fn join_as_member(r: &Resolved, deadline: Instant) -> Result<Joined> {
    let root = Client::connect(&r.root_host, r.root_port, left(deadline)).map_err(|e| {
        Error::new(
            e.kind(),
            "tree",
            format!(
                "could not reach the root {}:{}: {e}",
                r.root_host, r.root_port
            ),
        )
    })?;
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
    root.send(&dict(vec![
        ("world", Value::Int(r.world as i64)),
        ("rank", Value::Int(r.rank.map(|x| x as i64).unwrap_or(-1))),
        ("probe", probe.to_value()),
    ]))?;
    let reply = root.recv(left(deadline)).map_err(|e| {
        Error::new(
            e.kind(),
            "tree",
            format!("waiting for the plan from the root: {e}"),
        )
    })?;
    if let Some(msg) = reply.get("error").and_then(Value::as_str) {
        return Err(Error::new(
            ErrorKind::Mismatch,
            "tree",
            format!("the root refused this rank: {msg}"),
        ));
    }
    let rank = reply
        .get("rank")
        .and_then(Value::as_int)
        .ok_or_else(|| Error::new(ErrorKind::Protocol, "tree", "plan without a rank"))?
        as usize;
    let plan = Plan::from_value(
        reply
            .get("plan")
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "tree", "reply without a plan"))?,
    )?;
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
            c.send(&dict(vec![("link_from", Value::Int(rank as i64))]))?;
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
            match v.get("link_from").and_then(Value::as_int) {
                Some(k) if missing.contains(&(k as usize)) => {
                    missing.retain(|x| *x != k as usize);
                    links.insert(k as usize, conn);
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
    fn slurm_nodelist_first_host() {
        assert_eq!(
            first_slurm_host("node[01-04,07],gpu5").as_deref(),
            Some("node01")
        );
        assert_eq!(first_slurm_host("gpu5,gpu6").as_deref(), Some("gpu5"));
        assert_eq!(first_slurm_host("a[3]").as_deref(), Some("a3"));
    }

    #[test]
    fn rdv_resolve_from_arguments() {
        let r = resolve(&TreeOptions {
            rank: Some(1),
            world_size: Some(3),
            root: Some("[::1]:1234".into()),
            timeout: None,
            host: None,
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
            timeout: None,
            host: None,
        })
        .unwrap_err();
        assert!(e.to_string().contains("rank 3"), "{e}");
    }
}

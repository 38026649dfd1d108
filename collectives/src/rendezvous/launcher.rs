//! Step 1 of the rendezvous: this rank's identity and how to meet, from the arguments, else from
//! the launcher's variables (ours, torchrun, SLURM, Open MPI, PMI/PMIx; RDV-3), and where the
//! launcher says a rank runs, for error messages (RDV-2).

use super::{Resolved, TreeOptions, hostlist};
use parallel_engine::config::{Key, var};
use parallel_engine::{Error, ErrorKind, Result};

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
pub(super) fn launcher_host_of(k: usize) -> Option<String> {
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
pub(super) fn describe_ranks(ranks: &[usize]) -> String {
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

//! Which CPUs this process's reactor threads run on, and pinning a thread to one (TOPO-4).
//!
//! Invariants:
//! - PIN-1: processes of one host that know their local rank (LOCAL_RANK, LOCAL_WORLD_SIZE) get
//!   disjoint sets of physical cores when the host has at least as many usable cores as local
//!   ranks: every process computes the whole host's split the same way ([`plan_share`]) and takes
//!   its own part. Local rank `j` prefers the NUMA node of GPU `j` (PCI order), or, without GPUs,
//!   local rank 0 (the host leader, which carries the inter-host traffic) prefers the NICs' node.
//! - PIN-2: an explicit PARALLEL_CPUS, or an affinity mask narrower than the machine (a launcher
//!   already bound the process), is used as given: never split, never widened.
//! - PIN-3: a share lists one CPU of each physical core before any SMT sibling, so reactor `i`
//!   (on `cpus[i % len]`) gets a core of its own while there are cores.
//! - PIN-4: pinning never fails the program: PARALLEL_PIN=0 skips it and a refused pin is an
//!   info line ([`pin_current_thread`]). `core_affinity` does the system call.
//! - PIN-5: a narrowed mask with several local ranks may be the same for all of them (a
//!   container's cpuset): the reactors float within it rather than reactor `i` of every rank
//!   being pinned to the same CPU.

use super::{Topology, cpu_list};
use crate::config::{config, var};
use std::sync::OnceLock;

/// The CPUs of one process's reactors and why they were chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// Physical cores first, then SMT siblings (PIN-3); never empty.
    pub cpus: Vec<usize>,
    pub why: String,
    /// Whether each reactor is pinned to one of `cpus`; false: the reactors float within the
    /// process's mask (PARALLEL_PIN=0, or a launcher's mask that local ranks may share, where
    /// pinning reactor i of every rank to the mask's i-th CPU would stack them, PIN-5).
    pub pin: bool,
}

/// The cores of `topo` restricted to `allowed`, ordered by NUMA node then first CPU.
fn usable_cores(topo: &Topology, allowed: &[usize]) -> Vec<(Option<usize>, Vec<usize>)> {
    let mut cores: Vec<(Option<usize>, Vec<usize>)> = topo
        .cores
        .iter()
        .map(|c| {
            let cpus: Vec<usize> = c
                .cpus
                .iter()
                .copied()
                .filter(|x| allowed.contains(x))
                .collect();
            (c.numa, cpus)
        })
        .filter(|(_, cpus)| !cpus.is_empty())
        .collect();
    cores.sort_by_key(|(numa, cpus)| (numa.unwrap_or(0), cpus[0]));
    cores
}

/// One CPU of each core, then the second of each, ... (PIN-3).
fn interleave(cores: &[Vec<usize>]) -> Vec<usize> {
    let deepest = cores.iter().map(Vec::len).max().unwrap_or(0);
    (0..deepest)
        .flat_map(|k| cores.iter().filter_map(move |c| c.get(k).copied()))
        .collect()
}

/// The NUMA node local rank `j` prefers (PIN-1).
fn preferred_node(topo: &Topology, j: usize) -> Option<usize> {
    let gpus: Vec<_> = topo.gpus().collect();
    if !gpus.is_empty() {
        return gpus[j % gpus.len()].numa;
    }
    let mut nic_nodes: Vec<usize> = topo.nics().filter_map(|n| n.numa).collect();
    nic_nodes.sort_unstable();
    nic_nodes.dedup();
    match (j, &nic_nodes[..]) {
        (0, [one]) => Some(*one),
        _ => None,
    }
}

/// This process's share of `allowed` (PIN-1, PIN-2, PIN-3). `local` is (local rank, local world
/// size) when known; `narrowed` says a launcher already restricted the affinity mask.
pub fn plan_share(
    topo: &Topology,
    allowed: &[usize],
    local: Option<(usize, usize)>,
    narrowed: bool,
) -> Share {
    let cores = usable_cores(topo, allowed);
    if cores.is_empty() {
        // The topology does not cover the mask (unusual): keep the mask as it is.
        let cpus = if allowed.is_empty() {
            vec![0]
        } else {
            allowed.to_vec()
        };
        let why = "the affinity mask, as given (the topology shows none of its cores)".into();
        return Share {
            cpus,
            why,
            pin: true,
        };
    }
    let whole = |why: String, pin: bool| Share {
        cpus: interleave(&cores.iter().map(|c| c.1.clone()).collect::<Vec<_>>()),
        why,
        pin,
    };
    let Some((rank, world)) = local.filter(|&(r, w)| w > 1 && r < w) else {
        return whole(
            "all usable cores (one process on this host, or local rank unknown)".into(),
            true,
        );
    };
    if narrowed {
        // The mask may be the same for every local rank (a container's cpuset): pinning reactor i
        // of each rank to its i-th CPU would stack them; the scheduler spreads them instead.
        return whole(
            "the affinity mask the launcher set, shared with other local ranks: reactors not pinned within it"
                .into(),
            false,
        );
    }
    if cores.len() < world {
        let c = &cores[rank % cores.len()];
        return Share {
            cpus: c.1.clone(),
            why: format!(
                "one core shared with other local ranks ({} cores for {world} local ranks)",
                cores.len()
            ),
            pin: true,
        };
    }
    let per = cores.len() / world;
    let mut free: Vec<Option<(Option<usize>, Vec<usize>)>> = cores.into_iter().map(Some).collect();
    let mut mine = Vec::new();
    for j in 0..=rank {
        let near = preferred_node(topo, j);
        let mut order: Vec<usize> = (0..free.len()).filter(|&i| free[i].is_some()).collect();
        // Stable: the preferred node's cores first, then the rest in node order.
        order.sort_by_key(|&i| {
            free[i]
                .as_ref()
                .is_some_and(|c| near.is_none() || c.0 != near)
        });
        let picked: Vec<Vec<usize>> = order
            .into_iter()
            .take(per)
            .filter_map(|i| free[i].take().map(|c| c.1))
            .collect();
        if j == rank {
            mine = picked;
        }
    }
    let near =
        preferred_node(topo, rank).map_or(String::new(), |n| format!(", near NUMA node {n}"));
    Share {
        cpus: interleave(&mine),
        why: format!("local rank {rank} of {world}: {per} core(s) of its own{near}"),
        pin: true,
    }
}

/// The process's affinity mask (all online CPUs if it cannot be read); never empty.
fn affinity_mask(topo: &Topology) -> Vec<usize> {
    match core_affinity::get_core_ids() {
        Some(ids) if !ids.is_empty() => ids.into_iter().map(|c| c.id).collect(),
        _ => {
            let all: Vec<usize> = topo.cores.iter().flat_map(|c| c.cpus.clone()).collect();
            if all.is_empty() { vec![0] } else { all }
        }
    }
}

/// This host's local rank and size from the launcher, when both are there and well formed.
fn local_rank() -> Option<(usize, usize)> {
    let get = |v: &crate::config::Key<Option<u64>>| match v.read() {
        Ok(v) => v.map(|v| v as usize),
        Err(e) => {
            tracing::info!("not splitting cores between local ranks: {e}");
            None
        }
    };
    Some((get(&var::LOCAL_RANK)?, get(&var::LOCAL_WORLD_SIZE)?))
}

/// The CPUs the reactor threads run on, reactor `i` on `cpus[i % len]`, and why; never empty.
/// Decided once per process and logged at info. PARALLEL_CPUS when set (PIN-2), else this
/// process's share ([`plan_share`]); with PARALLEL_PIN=0 the affinity mask (nothing is pinned).
pub fn reactor_share() -> &'static Share {
    static SHARE: OnceLock<Share> = OnceLock::new();
    SHARE.get_or_init(|| {
        let cfg = config();
        let topo = super::topology();
        let share = if !cfg.cpus.is_empty() {
            Share {
                cpus: cfg.cpus.clone(),
                why: "PARALLEL_CPUS".into(),
                pin: true,
            }
        } else if !cfg.pin {
            Share {
                cpus: affinity_mask(topo),
                why: "PARALLEL_PIN=0: not pinned".into(),
                pin: false,
            }
        } else {
            let allowed = affinity_mask(topo);
            let narrowed = allowed.len() < topo.logical_cpus();
            plan_share(topo, &allowed, local_rank(), narrowed)
        };
        tracing::info!("reactor cpus {} ({})", cpu_list(&share.cpus), share.why);
        share
    })
}

/// [`reactor_share`]'s CPUs.
pub fn reactor_cpus() -> &'static [usize] {
    &reactor_share().cpus
}

/// Pins the calling thread to `cpu` unless PARALLEL_PIN=0. Returns whether it is pinned; a refusal
/// (a CPU outside the cgroup, a seccomp filter) is an info line, never an error (PIN-4).
pub fn pin_current_thread(cpu: usize) -> bool {
    if !config().pin {
        return false;
    }
    if cpu >= libc::CPU_SETSIZE as usize {
        tracing::info!(
            "not pinning a reactor to cpu {cpu}: beyond the {} CPUs a cpu set holds",
            libc::CPU_SETSIZE
        );
        return false;
    }
    let ok = core_affinity::set_for_current(core_affinity::CoreId { id: cpu });
    if !ok {
        tracing::info!(
            "could not pin a reactor to cpu {cpu} ({}); it runs unpinned (PARALLEL_PIN=0 skips pinning)",
            std::io::Error::last_os_error()
        );
    }
    ok
}

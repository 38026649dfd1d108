//! Link kinds and their registry: which kinds can connect two endpoints, and at what cost.
//!
//! Each kind (its module: [`super::tcp`], `shm`, `cuda_ipc`) implements [`Kind`]: `probe` says,
//! from what the two ends published about themselves ([`End`]) and what this process allows
//! ([`Policy`]), whether the kind can connect them and at what expected [`Cost`] (as TensorPipe's
//! channels do). [`kinds`] lists every kind; [`choose`] picks the cheapest viable one. The plan
//! (collectives) and the handshake's shared-memory decision ask these probes, never an if-chain
//! of their own.
//!
//! Invariants:
//! - KIND-1: TCP is viable between any two ends, so [`choose`] always finds a kind.
//! - KIND-2: shared memory is viable only between ends with the same host identity (topology
//!   TOPO-1) and only when the policy allows it (`PARALLEL_SHM`, or a caller that asked for TCP).
//! - KIND-3: CUDA IPC is viable only where shared memory is (it rides that link, HS-3), both
//!   ends see a GPU, and the policy allows it (`PARALLEL_CUDA`, `PARALLEL_CUDA_IPC`).
//! - KIND-4: ties go to the kind listed first in [`kinds`], so a choice is the same on every rank.
//!
//! Adding a kind (RDMA, say): a module with a unit struct implementing [`Kind`], one entry in
//! [`kinds`] (and a [`LinkKind`] variant), the set-up in the handshake, and the conformance suite
//! (engine/tests/link_conformance.rs) instantiated for it; docs/architecture.md walks through it.

use super::LinkKind;
use crate::config::config;
use std::time::Duration;

/// What one end of a would-be link published about itself (its rank's probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End<'a> {
    /// Host identity (same boot and network namespace: topology TOPO-1).
    pub host_id: &'a str,
    /// Whether the end sees at least one CUDA device.
    pub gpus: bool,
}

/// What this process allows (the operator's switches), the same on every rank of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Shared memory between processes of one host (`PARALLEL_SHM`).
    pub shm: bool,
    /// CUDA tensors by CUDA IPC (`PARALLEL_CUDA` and `PARALLEL_CUDA_IPC`).
    pub cuda_ipc: bool,
}

impl Policy {
    /// This process's configuration.
    pub fn from_config() -> Policy {
        let c = config();
        Policy {
            shm: c.shm,
            cuda_ipc: c.cuda && c.cuda_ipc,
        }
    }
}

/// Expected cost of one message on a kind: a fixed latency plus bytes at a bandwidth. Rough
/// figures of the kind on one machine (docs/benchmarks.md), for ranking kinds, not a promise.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub latency: Duration,
    pub bytes_per_sec: f64,
}

impl Cost {
    /// Expected time to move one message of `bytes`.
    pub fn time(&self, bytes: u64) -> Duration {
        self.latency + Duration::from_secs_f64(bytes as f64 / self.bytes_per_sec)
    }
}

/// A link kind: whether it can connect two ends, and at what cost.
pub trait Kind: Sync + std::fmt::Debug {
    /// Which kind this is.
    fn id(&self) -> LinkKind;
    /// `Some(cost)` when this kind can connect `a` and `b` under `policy`.
    fn probe(&self, a: &End<'_>, b: &End<'_>, policy: &Policy) -> Option<Cost>;
}

/// Every link kind, in order of preference on a tie (KIND-4).
pub fn kinds() -> &'static [&'static dyn Kind] {
    &[
        &super::cuda_ipc::CudaIpc,
        &super::shm::Shm,
        &super::tcp::Tcp,
    ]
}

/// The cheapest viable kind for a message of `bytes` between `a` and `b` (KIND-1: TCP at worst).
pub fn choose(a: &End<'_>, b: &End<'_>, policy: &Policy, bytes: u64) -> LinkKind {
    let mut best: Option<(Duration, LinkKind)> = None;
    for k in kinds() {
        if let Some(c) = k.probe(a, b, policy) {
            let t = c.time(bytes);
            if best.is_none_or(|(bt, _)| t < bt) {
                best = Some((t, k.id()));
            }
        }
    }
    best.map_or(LinkKind::Tcp, |(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ON: Policy = Policy {
        shm: true,
        cuda_ipc: true,
    };
    const MIB: u64 = 1 << 20;

    fn end(host_id: &str, gpus: bool) -> End<'_> {
        End { host_id, gpus }
    }

    #[test]
    fn kind_2_same_host_with_shm_allowed_chooses_shm() {
        let (a, b) = (end("h1", false), end("h1", false));
        assert_eq!(choose(&a, &b, &ON, 8), LinkKind::Shm);
        assert_eq!(choose(&a, &b, &ON, 256 * MIB), LinkKind::Shm);
    }

    #[test]
    fn kind_1_different_hosts_choose_tcp_whatever_the_policy() {
        let (a, b) = (end("h1", true), end("h2", true));
        assert_eq!(choose(&a, &b, &ON, MIB), LinkKind::Tcp);
        assert!(
            kinds()
                .iter()
                .all(|k| (k.id() == LinkKind::Tcp) == k.probe(&a, &b, &ON).is_some())
        );
    }

    #[test]
    fn kind_2_shm_switched_off_keeps_one_host_on_tcp() {
        let (a, b) = (end("h1", true), end("h1", true));
        let off = Policy {
            shm: false,
            cuda_ipc: true,
        };
        assert_eq!(choose(&a, &b, &off, MIB), LinkKind::Tcp);
        assert!(super::super::shm::Shm.probe(&a, &b, &off).is_none());
        assert!(
            super::super::cuda_ipc::CudaIpc
                .probe(&a, &b, &off)
                .is_none()
        );
    }

    #[test]
    fn kind_3_cuda_ipc_for_large_messages_between_two_gpu_ends_of_one_host() {
        let (a, b) = (end("h1", true), end("h1", true));
        assert_eq!(choose(&a, &b, &ON, 64 * MIB), LinkKind::CudaIpc);
        // Small messages are staged through the ring: its latency is lower.
        assert_eq!(choose(&a, &b, &ON, 8), LinkKind::Shm);
        // One end without a GPU, or IPC switched off: the ring.
        assert_eq!(choose(&a, &end("h1", false), &ON, 64 * MIB), LinkKind::Shm);
        let no_ipc = Policy {
            shm: true,
            cuda_ipc: false,
        };
        assert_eq!(choose(&a, &b, &no_ipc, 64 * MIB), LinkKind::Shm);
    }

    #[test]
    fn kind_4_every_kind_is_registered_once_and_tcp_is_always_viable() {
        let ids: Vec<LinkKind> = kinds().iter().map(|k| k.id()).collect();
        for k in [LinkKind::Tcp, LinkKind::Shm, LinkKind::CudaIpc] {
            assert_eq!(ids.iter().filter(|x| **x == k).count(), 1, "{k:?}");
        }
        let off = Policy {
            shm: false,
            cuda_ipc: false,
        };
        assert_eq!(
            choose(&end("", false), &end("", false), &off, 0),
            LinkKind::Tcp
        );
    }
}

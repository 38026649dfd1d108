//! The plan: which rank talks to which, over what, in which order.
//!
//! The root builds one plan from every rank's probe and sends it to all ranks, so the plan is the
//! same everywhere and can be printed.
//!
//! Invariants:
//! - PLAN-1: ranks are grouped by host identity (same boot and network namespace); the host of
//!   rank 0 comes first, then hosts in order of their lowest rank. Each host's leader is its lowest
//!   rank.
//! - PLAN-2: the tree is hierarchical: inside a host, ranks form a binomial tree under the leader;
//!   host leaders form a binomial tree under rank 0. So only leaders cross hosts, and every rank's
//!   children are listed in increasing rank order (the fixed reduction order, OPS-1).
//! - PLAN-3: the ring visits each host's ranks contiguously, so it crosses hosts exactly H times.
//! - PLAN-4: a link between two ranks is the cheapest kind whose probe accepts them (engine
//!   `link::kinds`): shared memory between ranks of one host when the engine allows it
//!   (PARALLEL_SHM), TCP otherwise and across hosts.

use parallel_engine::link;
use parallel_engine::value::{Key, Value};
use parallel_engine::{Error, ErrorKind, Result};

/// The message size links are ranked for in a plan: the large tensors the collectives move.
const LINK_BYTES: u64 = 64 << 20;

/// What a rank tells the root about itself.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub rank: usize,
    pub host_id: String,
    pub hostname: String,
    /// Address other ranks connect to (the rank's own server).
    pub addr: String,
    pub port: u16,
    pub cores: usize,
    pub numa_nodes: usize,
    pub pid: u32,
    /// The CUDA devices this rank sees, by PCI bus id (empty without CUDA).
    pub gpus: Vec<String>,
}

impl Probe {
    pub fn to_value(&self) -> Value {
        dict(vec![
            ("rank", Value::Int(self.rank as i64)),
            ("host_id", Value::str(&self.host_id)),
            ("hostname", Value::str(&self.hostname)),
            ("addr", Value::str(&self.addr)),
            ("port", Value::Int(self.port as i64)),
            ("cores", Value::Int(self.cores as i64)),
            ("numa", Value::Int(self.numa_nodes as i64)),
            ("pid", Value::Int(self.pid as i64)),
            (
                "gpus",
                Value::List(self.gpus.iter().map(Value::str).collect()),
            ),
        ])
    }

    pub fn from_value(v: &Value) -> Result<Probe> {
        let s = |k: &str| {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| bad(k))
        };
        let i = |k: &str| {
            v.get(k)
                .and_then(Value::as_int)
                .filter(|x| *x >= 0)
                .ok_or_else(|| bad(k))
        };
        Ok(Probe {
            rank: i("rank")? as usize,
            host_id: s("host_id")?,
            hostname: s("hostname")?,
            addr: s("addr")?,
            port: u16::try_from(i("port")?).map_err(|_| bad("port"))?,
            cores: i("cores")? as usize,
            numa_nodes: i("numa")? as usize,
            pid: i("pid")? as u32,
            gpus: match v.get("gpus") {
                Some(Value::List(l)) => l
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect(),
                _ => Vec::new(),
            },
        })
    }
}

fn bad(k: &str) -> Error {
    Error::new(
        ErrorKind::Protocol,
        "rendezvous",
        format!("probe field {k:?} missing or malformed"),
    )
}

pub(crate) fn dict(items: Vec<(&str, Value)>) -> Value {
    Value::Dict(
        items
            .into_iter()
            .map(|(k, v)| (Key::Str(k.to_string()), v))
            .collect(),
    )
}

/// Which algorithm family the collectives use for large buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algo {
    Tree,
    Ring,
    Auto,
}

/// The plan every rank follows.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub probes: Vec<Probe>,
    /// Host index of each rank.
    pub host_of: Vec<usize>,
    /// Hosts in plan order, each with its ranks in increasing order (leader first).
    pub hosts: Vec<Vec<usize>>,
    pub parent: Vec<Option<usize>>,
    pub children: Vec<Vec<usize>>,
    /// Ring order of ranks.
    pub ring: Vec<usize>,
}

fn binomial(members: &[usize], parent: &mut [Option<usize>], children: &mut [Vec<usize>]) {
    // Member i (i > 0) hangs under member i - 2^floor(log2 i).
    for i in 1..members.len() {
        let hb = 1usize << (usize::BITS - 1 - i.leading_zeros());
        let p = members[i - hb];
        parent[members[i]] = Some(p);
        children[p].push(members[i]);
    }
}

impl Plan {
    /// Builds the plan from all probes (indexed by rank).
    pub fn build(probes: Vec<Probe>) -> Result<Plan> {
        let n = probes.len();
        for (i, p) in probes.iter().enumerate() {
            if p.rank != i {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "rendezvous",
                    format!("probe {i} claims rank {}", p.rank),
                ));
            }
        }
        let mut hosts: Vec<Vec<usize>> = Vec::new();
        let mut ids: Vec<&str> = Vec::new();
        let mut host_of = vec![0; n];
        for p in &probes {
            let h = match ids.iter().position(|id| *id == p.host_id) {
                Some(h) => h,
                None => {
                    ids.push(&p.host_id);
                    hosts.push(Vec::new());
                    hosts.len() - 1
                }
            };
            hosts[h].push(p.rank);
            host_of[p.rank] = h;
        }
        let mut parent = vec![None; n];
        let mut children = vec![Vec::new(); n];
        for members in &hosts {
            binomial(members, &mut parent, &mut children);
        }
        let leaders: Vec<usize> = hosts.iter().map(|h| h[0]).collect();
        binomial(&leaders, &mut parent, &mut children);
        for c in &mut children {
            c.sort_unstable();
        }
        let ring = hosts.iter().flatten().copied().collect();
        Ok(Plan {
            probes,
            host_of,
            hosts,
            parent,
            children,
            ring,
        })
    }

    pub fn world(&self) -> usize {
        self.probes.len()
    }

    /// The link kind between two ranks (PLAN-4): the cheapest kind whose probe accepts the two
    /// ranks' probes (engine `link::kinds`), CUDA IPC left out (it rides the shm link).
    pub fn link_kind(&self, a: usize, b: usize, shm: bool) -> &'static str {
        self.choose_link(a, b, shm, false).name()
    }

    /// The link kind as `print(tree)` shows it: shared-memory links between two ranks that both
    /// see GPUs also carry large CUDA tensors by CUDA IPC (`PARALLEL_CUDA_IPC`).
    pub fn link_label(&self, a: usize, b: usize, shm: bool, cuda_ipc: bool) -> &'static str {
        self.choose_link(a, b, shm, cuda_ipc).label()
    }

    /// Asks every link kind's probe for the pair; ranked for a large tensor (LINK_BYTES).
    fn choose_link(&self, a: usize, b: usize, shm: bool, cuda_ipc: bool) -> link::LinkKind {
        let end = |r: usize| link::End {
            host_id: &self.probes[r].host_id,
            gpus: !self.probes[r].gpus.is_empty(),
        };
        let policy = link::Policy { shm, cuda_ipc };
        link::choose(&end(a), &end(b), &policy, LINK_BYTES)
    }

    /// Neighbours of `rank` in the ring: (left, right).
    pub fn ring_neighbours(&self, rank: usize) -> (usize, usize) {
        let n = self.ring.len();
        let pos = self
            .ring
            .iter()
            .position(|r| *r == rank)
            .expect("rank in ring");
        (self.ring[(pos + n - 1) % n], self.ring[(pos + 1) % n])
    }

    /// True when large all-reduces go hierarchical: several hosts, and some host with several
    /// ranks (TREE-5).
    pub fn hierarchical(&self) -> bool {
        self.hosts.len() > 1 && self.hosts.iter().any(|h| h.len() > 1)
    }

    /// Every pair of ranks that needs a link: tree edges, ring edges and, for hierarchical plans,
    /// the ring of host leaders; each once, as (low, high).
    pub fn edges(&self) -> Vec<(usize, usize)> {
        let mut e: Vec<(usize, usize)> = Vec::new();
        for (c, p) in self.parent.iter().enumerate() {
            if let Some(p) = p {
                e.push((c.min(*p), c.max(*p)));
            }
        }
        if self.world() > 1 {
            for r in 0..self.world() {
                let (_, right) = self.ring_neighbours(r);
                if right != r {
                    e.push((r.min(right), r.max(right)));
                }
            }
        }
        if self.hierarchical() && self.hosts.len() > 2 {
            let leaders: Vec<usize> = self.hosts.iter().map(|h| h[0]).collect();
            for i in 0..leaders.len() {
                let (a, b) = (leaders[i], leaders[(i + 1) % leaders.len()]);
                e.push((a.min(b), a.max(b)));
            }
        }
        e.sort_unstable();
        e.dedup();
        e
    }

    pub fn to_value(&self) -> Value {
        Value::List(self.probes.iter().map(Probe::to_value).collect())
    }

    pub fn from_value(v: &Value) -> Result<Plan> {
        let Value::List(items) = v else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "rendezvous",
                "plan is not a list of probes",
            ));
        };
        Plan::build(items.iter().map(Probe::from_value).collect::<Result<_>>()?)
    }

    /// Human-readable plan (what `print(tree)` shows).
    pub fn describe(&self, shm: bool, cuda_ipc: bool) -> String {
        let mut s = format!(
            "Plan: {} ranks on {} host(s)\n",
            self.world(),
            self.hosts.len()
        );
        for (h, members) in self.hosts.iter().enumerate() {
            let p = &self.probes[members[0]];
            let mut gpus: Vec<&str> = members
                .iter()
                .flat_map(|m| self.probes[*m].gpus.iter().map(String::as_str))
                .collect();
            gpus.sort_unstable();
            gpus.dedup();
            let gpus = if gpus.is_empty() {
                String::new()
            } else {
                format!(", GPUs {}", gpus.join(" "))
            };
            s.push_str(&format!(
                "  host {h} ({}, {} cores, {} NUMA node(s){gpus}): ranks {:?}, leader {}\n",
                p.hostname, p.cores, p.numa_nodes, members, members[0]
            ));
        }
        s.push_str("  tree (parent <- children):\n");
        for (r, c) in self.children.iter().enumerate() {
            if !c.is_empty() {
                let kinds: Vec<String> = c
                    .iter()
                    .map(|x| format!("{x} [{}]", self.link_label(r, *x, shm, cuda_ipc)))
                    .collect();
                s.push_str(&format!("    {r} <- {}\n", kinds.join(", ")));
            }
        }
        let ring: Vec<String> = self.ring.iter().map(|r| r.to_string()).collect();
        s.push_str(&format!("  ring: {}\n", ring.join(" -> ")));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(rank: usize, host: &str) -> Probe {
        Probe {
            rank,
            host_id: host.into(),
            hostname: host.into(),
            addr: "127.0.0.1".into(),
            port: 1000 + rank as u16,
            cores: 2,
            numa_nodes: 1,
            pid: 1,
            gpus: Vec::new(),
        }
    }

    #[test]
    fn plan_shows_gpus_and_cuda_ipc_links_between_ranks_that_both_see_gpus() {
        let mut probes: Vec<Probe> = ["a", "a", "a", "b"]
            .iter()
            .enumerate()
            .map(|(r, h)| probe(r, h))
            .collect();
        probes[0].gpus = vec!["0000:3b:00.0".into()];
        probes[1].gpus = vec!["0000:3b:00.0".into()];
        probes[3].gpus = vec!["0000:86:00.0".into()];
        let back = Probe::from_value(&probes[0].to_value()).unwrap();
        assert_eq!(back.gpus, probes[0].gpus);
        let plan = Plan::build(probes).unwrap();
        assert_eq!(plan.link_label(0, 1, true, true), "shm + cuda-ipc");
        assert_eq!(plan.link_label(0, 1, true, false), "shm");
        assert_eq!(
            plan.link_label(0, 2, true, true),
            "shm",
            "rank 2 sees no GPU"
        );
        assert_eq!(
            plan.link_label(0, 3, true, true),
            "tcp",
            "across hosts: staged"
        );
        let d = plan.describe(true, true);
        assert!(d.contains("GPUs 0000:3b:00.0)"), "{d}");
        assert!(d.contains("[shm + cuda-ipc]"), "{d}");
    }

    #[test]
    fn plan_4_links_are_the_kinds_choice_shm_on_one_host_tcp_across_or_when_shm_is_off() {
        let hosts = ["a", "a", "b"];
        let plan =
            Plan::build(hosts.iter().enumerate().map(|(r, h)| probe(r, h)).collect()).unwrap();
        assert_eq!(plan.link_kind(0, 1, true), "shm", "same host, shm allowed");
        assert_eq!(plan.link_kind(0, 2, true), "tcp", "different hosts");
        assert_eq!(plan.link_kind(0, 1, false), "tcp", "PARALLEL_SHM=0");
        assert_eq!(
            plan.link_label(0, 1, false, true),
            "tcp",
            "no IPC without shm"
        );
    }

    #[test]
    fn plan_2_hierarchical_tree_only_leaders_cross_hosts() {
        let hosts = ["a", "b", "a", "b", "c", "a", "c", "b"];
        let plan =
            Plan::build(hosts.iter().enumerate().map(|(r, h)| probe(r, h)).collect()).unwrap();
        assert_eq!(plan.hosts, vec![vec![0, 2, 5], vec![1, 3, 7], vec![4, 6]]);
        for (c, p) in plan.parent.iter().enumerate() {
            match p {
                None => assert_eq!(c, 0),
                Some(p) if plan.host_of[*p] != plan.host_of[c] => {
                    assert!(
                        plan.hosts.iter().any(|h| h[0] == c),
                        "non-leader {c} crosses hosts"
                    );
                }
                _ => {}
            }
        }
        // Every rank reaches the root.
        for r in 0..8 {
            let (mut x, mut steps) = (r, 0);
            while let Some(p) = plan.parent[x] {
                x = p;
                steps += 1;
                assert!(steps < 8);
            }
            assert_eq!(x, 0);
        }
    }

    #[test]
    fn plan_3_ring_crosses_hosts_h_times() {
        let hosts = ["a", "b", "a", "b"];
        let plan =
            Plan::build(hosts.iter().enumerate().map(|(r, h)| probe(r, h)).collect()).unwrap();
        assert_eq!(plan.ring, vec![0, 2, 1, 3]);
        let crossings = (0..4)
            .filter(|i| plan.host_of[plan.ring[*i]] != plan.host_of[plan.ring[(i + 1) % 4]])
            .count();
        assert_eq!(crossings, 2);
        let back = Plan::from_value(&plan.to_value()).unwrap();
        assert_eq!(back, plan);
    }

    #[test]
    fn plan_for_every_world_size() {
        for n in 1..=9 {
            let plan = Plan::build((0..n).map(|r| probe(r, "h")).collect()).unwrap();
            assert_eq!(plan.children.iter().map(Vec::len).sum::<usize>(), n - 1);
            assert!(plan.describe(true, true).contains(&format!("{n} ranks")));
        }
    }
}

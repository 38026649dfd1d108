//! Host identity and the hardware topology: cores, NUMA nodes, caches, and where GPUs and NICs sit.
//!
//! Invariants:
//! - TOPO-1: two processes get the same [`host_identity`] exactly when they run on the same kernel
//!   boot *and* in the same network namespace, which is when a shared-memory link can be set up
//!   between them (abstract Unix sockets, used to pass the memory, are per namespace). IP
//!   addresses are never compared.
//! - TOPO-2: one [`Topology`] whatever the probe: hwloc through `hwlocality` (cargo feature
//!   `hwloc`, [`hwloc`]) or the sysfs reader ([`sysfs`], always built: the fallback). A field a
//!   probe cannot see is `None` or empty, never a guess.
//! - TOPO-3: probing never fails the program: when hwloc is not built in or fails at run time the
//!   sysfs probe runs; an unreadable sysfs file leaves its field empty. Which probe ran, and why,
//!   is logged once at info ([`topology`]).
//! - TOPO-4: pinning is advice ([`pin`]): PARALLEL_PIN=0 skips it, a refused pin is a log line.
//!
//! The process topology is probed once, on first use, by whichever thread asks first; it is
//! immutable afterwards.

use std::os::unix::fs::MetadataExt;
use std::sync::OnceLock;

#[cfg(feature = "hwloc")]
pub mod hwloc;
pub mod pin;
pub mod sysfs;

pub use pin::{Share, pin_current_thread, reactor_cpus, reactor_share};

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

/// Which probe produced a [`Topology`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// libhwloc, through the `hwlocality` crate (cargo feature `hwloc`).
    Hwloc,
    /// Files under /sys (always available on Linux).
    Sysfs,
}

impl ProbeKind {
    pub fn name(self) -> &'static str {
        match self {
            ProbeKind::Hwloc => "hwloc",
            ProbeKind::Sysfs => "sysfs",
        }
    }
}

/// A physical core: its logical CPUs (SMT siblings, ascending), package and NUMA node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Core {
    /// The physical package (socket); `None` when the probe cannot tell.
    pub package: Option<usize>,
    /// The NUMA node holding the core's first CPU; `None` without NUMA information.
    pub numa: Option<usize>,
    /// OS indexes of the logical CPUs (hardware threads), ascending, never empty.
    pub cpus: Vec<usize>,
}

/// A NUMA node: its OS index, CPUs and memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NumaNode {
    pub id: usize,
    /// Logical CPUs of the node, ascending (empty for a memory-only node).
    pub cpus: Vec<usize>,
    /// Local memory in bytes; `None` when the probe cannot read it.
    pub memory_bytes: Option<u64>,
}

/// One data or unified CPU cache (instruction caches are left out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cache {
    /// 1, 2 or 3.
    pub level: u8,
    pub bytes: u64,
    /// The logical CPUs sharing this cache, ascending.
    pub cpus: Vec<usize>,
}

/// The kinds of device whose locality matters to the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A compute GPU ([`is_compute_gpu`]).
    Gpu,
    /// A network interface backed by a PCI device (virtual interfaces are left out).
    Nic,
}

/// A GPU or NIC and the part of the machine it is near.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    pub kind: DeviceKind,
    /// A NIC's interface name (`eth0`); a GPU's PCI bus id.
    pub name: String,
    /// `dddd:bb:dd.f`, lower case; `None` when the probe cannot tell.
    pub pci_bus_id: Option<String>,
    /// The NUMA node the device is attached to; `None` when unknown (or not one node).
    pub numa: Option<usize>,
    /// The logical CPUs near the device, ascending; empty when unknown.
    pub cpus: Vec<usize>,
}

/// What this host looks like (TOPO-2). Both probes fill the same fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    pub probe: ProbeKind,
    /// Why this probe was used (for the log and `python -m torch_parallel info`).
    pub reason: String,
    /// Physical cores, ordered by their first logical CPU.
    pub cores: Vec<Core>,
    /// NUMA nodes by id; empty when the machine reports none (treat it as one node).
    pub numa_nodes: Vec<NumaNode>,
    /// Data and unified caches, by level then first CPU.
    pub caches: Vec<Cache>,
    /// Compute GPUs by PCI bus id, then NICs by name.
    pub devices: Vec<Device>,
}

/// Whether a PCI function of this class and vendor is a GPU the plan cares about: a 3D
/// controller, or a VGA controller from NVIDIA, AMD or Intel (leaves out a server's BMC display).
pub fn is_compute_gpu(class: u32, vendor: u16) -> bool {
    let base_sub = class >> 8; // 0x0302 of 0x030200
    base_sub == 0x0302 || (base_sub == 0x0300 && matches!(vendor, 0x10de | 0x1002 | 0x8086))
}

/// The PCI bus id `dddd:bb:dd.f` if `s` is one (sysfs names PCI devices by it).
pub fn pci_bus_id(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let hex = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_hexdigit);
    let ok = b.len() == 12
        && hex(0..4)
        && b[4] == b':'
        && hex(5..7)
        && b[7] == b':'
        && hex(8..10)
        && b[10] == b'.'
        && b[11].is_ascii_digit();
    ok.then(|| s.to_ascii_lowercase())
}

/// `dddd:bb:dd.f` in lower case from a bus id with a domain of any width (`00000000:3B:00.0`).
pub fn normalize_bus_id(s: &str) -> Option<String> {
    let (domain, rest) = s.split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    pci_bus_id(&format!("{domain:04x}:{rest}"))
}

impl Topology {
    /// Logical CPUs (hardware threads) of all cores.
    pub fn logical_cpus(&self) -> usize {
        self.cores.iter().map(|c| c.cpus.len()).sum()
    }

    /// NUMA nodes, counting a machine that reports none as one.
    pub fn numa_count(&self) -> usize {
        self.numa_nodes.len().max(1)
    }

    /// The size of one cache of this level (the largest, if they differ).
    pub fn cache_bytes(&self, level: u8) -> Option<u64> {
        self.caches
            .iter()
            .filter(|c| c.level == level)
            .map(|c| c.bytes)
            .max()
    }

    /// The NUMA node of a logical CPU.
    pub fn numa_of_cpu(&self, cpu: usize) -> Option<usize> {
        self.numa_nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.id)
    }

    pub fn gpus(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.kind == DeviceKind::Gpu)
    }

    pub fn nics(&self) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(|d| d.kind == DeviceKind::Nic)
    }

    /// The NIC of an interface name (`eth0`), if it is a PCI device.
    pub fn nic(&self, ifname: &str) -> Option<&Device> {
        self.nics().find(|d| d.name == ifname)
    }

    /// The GPU of a PCI bus id, in any case and with the 4- or 8-digit domain (CUDA writes 8).
    pub fn gpu(&self, bus_id: &str) -> Option<&Device> {
        let want = normalize_bus_id(bus_id)?;
        self.gpus()
            .find(|d| d.pci_bus_id.as_deref() == Some(want.as_str()))
    }

    /// Fills what one probe's fields imply about another, the same way for every probe: a core's
    /// NUMA node from the nodes' CPUs, a device's CPUs from its node and its node from its CPUs.
    /// Sorts everything into the documented order.
    pub(crate) fn finish(mut self) -> Topology {
        for list in self.cores.iter_mut().map(|c| &mut c.cpus) {
            list.sort_unstable();
            list.dedup();
        }
        self.cores.retain(|c| !c.cpus.is_empty());
        self.cores.sort_by_key(|c| c.cpus[0]);
        self.numa_nodes.sort_by_key(|n| n.id);
        let numa_of = |cpu: usize| {
            self.numa_nodes
                .iter()
                .find(|n| n.cpus.contains(&cpu))
                .map(|n| n.id)
        };
        let core_numa: Vec<Option<usize>> = self.cores.iter().map(|c| numa_of(c.cpus[0])).collect();
        for (c, n) in self.cores.iter_mut().zip(core_numa) {
            c.numa = c.numa.or(n);
        }
        for d in &mut self.devices {
            if d.cpus.is_empty()
                && let Some(node) = self.numa_nodes.iter().find(|n| Some(n.id) == d.numa)
            {
                d.cpus = node.cpus.clone();
            }
            if d.numa.is_none() && !d.cpus.is_empty() {
                let nodes: Vec<usize> = self
                    .numa_nodes
                    .iter()
                    .filter(|n| n.cpus.iter().any(|c| d.cpus.contains(c)))
                    .map(|n| n.id)
                    .collect();
                if let [one] = nodes[..] {
                    d.numa = Some(one);
                }
            }
        }
        self.devices.sort_by(|a, b| {
            (a.kind == DeviceKind::Nic, &a.name).cmp(&(b.kind == DeviceKind::Nic, &b.name))
        });
        self.caches
            .sort_by_key(|c| (c.level, c.cpus.first().copied().unwrap_or(0)));
        self
    }

    /// A few lines for people: cores, NUMA nodes, caches, devices and their locality, the probe.
    pub fn describe(&self) -> Vec<(String, String)> {
        let mut out = vec![(
            "topology probe".to_string(),
            format!("{} ({})", self.probe.name(), self.reason),
        )];
        let smt = self.cores.iter().map(|c| c.cpus.len()).max().unwrap_or(1);
        out.push((
            "cores".into(),
            format!(
                "{} physical, {} logical ({smt} per core)",
                self.cores.len(),
                self.logical_cpus()
            ),
        ));
        let nodes: Vec<String> = self
            .numa_nodes
            .iter()
            .map(|n| {
                let mem = n
                    .memory_bytes
                    .map(|b| format!(", {:.1} GiB", b as f64 / (1u64 << 30) as f64))
                    .unwrap_or_default();
                format!("node {}: cpus {}{mem}", n.id, cpu_list(&n.cpus))
            })
            .collect();
        out.push((
            "numa".into(),
            if nodes.is_empty() {
                "none reported (one node)".into()
            } else {
                nodes.join("; ")
            },
        ));
        let caches: Vec<String> = (1..=3)
            .filter_map(|l| {
                let n = self.caches.iter().filter(|c| c.level == l).count();
                self.cache_bytes(l)
                    .map(|b| format!("L{l} {} KiB x{n}", b / 1024))
            })
            .collect();
        out.push((
            "caches".into(),
            if caches.is_empty() {
                "unknown".into()
            } else {
                caches.join(", ")
            },
        ));
        for d in &self.devices {
            let kind = match d.kind {
                DeviceKind::Gpu => "gpu",
                DeviceKind::Nic => "nic",
            };
            let pci = match (&d.pci_bus_id, d.kind) {
                (Some(id), DeviceKind::Nic) => format!(" (pci {id})"),
                _ => String::new(),
            };
            let numa = d
                .numa
                .map_or("numa unknown".into(), |n| format!("numa {n}"));
            let cpus = if d.cpus.is_empty() {
                String::new()
            } else {
                format!(", cpus {}", cpu_list(&d.cpus))
            };
            out.push((kind.into(), format!("{}{pci}: {numa}{cpus}", d.name)));
        }
        out
    }
}

/// `0-3,8,10-11` for an ascending list of CPUs.
pub fn cpu_list(cpus: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        parts.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    parts.join(",")
}

/// Probes now: hwloc when built in and it works, sysfs otherwise (TOPO-3). No log.
pub fn probe() -> Topology {
    #[cfg(feature = "hwloc")]
    {
        match hwloc::probe() {
            Ok(t) => t,
            Err(why) => sysfs::probe(
                std::path::Path::new("/sys"),
                &format!("hwloc failed: {why}"),
            ),
        }
    }
    #[cfg(not(feature = "hwloc"))]
    sysfs::probe(
        std::path::Path::new("/sys"),
        "built without the `hwloc` feature",
    )
}

/// This host's topology, probed on first use; which probe ran and why is logged once at info.
pub fn topology() -> &'static Topology {
    static TOPO: OnceLock<Topology> = OnceLock::new();
    TOPO.get_or_init(|| {
        let t = probe();
        tracing::info!(
            "topology from {} ({}): {} cores ({} logical), {} NUMA node(s), {} GPU(s), {} NIC(s)",
            t.probe.name(),
            t.reason,
            t.cores.len(),
            t.logical_cpus(),
            t.numa_count(),
            t.gpus().count(),
            t.nics().count()
        );
        t
    })
}

#[cfg(test)]
mod tests;

//! The sysfs probe: the topology from files under /sys (the fallback of TOPO-3).
//!
//! Everything is read relative to a root directory, so tests run it on a fake tree. Invariants:
//! - SYSFS-1: no file read here can fail the probe: a missing or malformed file leaves its field
//!   `None` or empty (TOPO-2), and a CPU without topology files is a core of its own.
//! - SYSFS-2: only online CPUs count (`devices/system/cpu/online`; every `cpuN` directory when
//!   that file is missing).
//!
//! Files read: `devices/system/cpu/cpuN/topology/{physical_package_id,core_id}`,
//! `devices/system/cpu/cpuN/cache/indexK/{level,type,size,shared_cpu_list}`,
//! `devices/system/node/nodeN/{cpulist,meminfo}`, `bus/pci/devices/*/{class,vendor,numa_node,
//! local_cpulist}`, `class/net/*/device` (a link into the PCI tree).

use super::{Cache, Core, Device, DeviceKind, NumaNode, ProbeKind, Topology};
use crate::config::parse_cpu_list;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_num(p: &Path) -> Option<usize> {
    read(p)?.parse().ok()
}

fn read_hex(p: &Path) -> Option<u32> {
    let s = read(p)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn read_cpus(p: &Path) -> Option<Vec<usize>> {
    let mut v = parse_cpu_list(&read(p)?)?;
    v.sort_unstable();
    v.dedup();
    Some(v)
}

/// Entries of `dir` named `<prefix><number>`, by number.
fn numbered(dir: &Path, prefix: &str) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort_by_key(|(n, _)| *n);
    out
}

/// Probes the tree under `root` (normally `/sys`); `reason` says why this probe is used.
pub fn probe(root: &Path, reason: &str) -> Topology {
    let cpu_dir = root.join("devices/system/cpu");
    let online = read_cpus(&cpu_dir.join("online")).unwrap_or_else(|| {
        numbered(&cpu_dir, "cpu")
            .into_iter()
            .map(|(n, _)| n)
            .collect()
    });
    Topology {
        probe: ProbeKind::Sysfs,
        reason: reason.to_string(),
        cores: cores(&cpu_dir, &online),
        numa_nodes: numa_nodes(&root.join("devices/system/node")),
        caches: caches(&cpu_dir, &online),
        devices: [gpus(root), nics(root)].concat(),
    }
    .finish()
}

/// Online CPUs grouped by (package, core id) (SYSFS-1: a CPU without those is its own core).
fn cores(cpu_dir: &Path, online: &[usize]) -> Vec<Core> {
    let mut by_core: BTreeMap<(Option<usize>, usize), Vec<usize>> = BTreeMap::new();
    for &cpu in online {
        let t = cpu_dir.join(format!("cpu{cpu}/topology"));
        let package = read_num(&t.join("physical_package_id"));
        let key = match read_num(&t.join("core_id")) {
            Some(core) => (package, core),
            // usize::MAX - cpu never collides with a real core id.
            None => (package, usize::MAX - cpu),
        };
        by_core.entry(key).or_default().push(cpu);
    }
    by_core
        .into_iter()
        .map(|((package, _), cpus)| Core {
            package,
            numa: None,
            cpus,
        })
        .collect()
}

fn numa_nodes(node_dir: &Path) -> Vec<NumaNode> {
    numbered(node_dir, "node")
        .into_iter()
        .map(|(id, dir)| NumaNode {
            id,
            cpus: read_cpus(&dir.join("cpulist")).unwrap_or_default(),
            memory_bytes: read(&dir.join("meminfo")).and_then(|m| mem_total(&m)),
        })
        .collect()
}

/// `Node 0 MemTotal:  16384 kB` -> bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.contains("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().rev().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// `32K`, `1024K`, `8M` -> bytes.
fn cache_size(s: &str) -> Option<u64> {
    let (num, mult) = match s.as_bytes().last()? {
        b'K' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' => (&s[..s.len() - 1], 1 << 20),
        b'G' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// Data and unified caches of levels 1-3, each listed once (by level and sharing CPUs).
fn caches(cpu_dir: &Path, online: &[usize]) -> Vec<Cache> {
    let mut seen: BTreeMap<(u8, Vec<usize>), u64> = BTreeMap::new();
    for &cpu in online {
        for (_, idx) in numbered(&cpu_dir.join(format!("cpu{cpu}/cache")), "index") {
            if read(&idx.join("type")).as_deref() == Some("Instruction") {
                continue;
            }
            let level = read_num(&idx.join("level")).and_then(|l| u8::try_from(l).ok());
            let bytes = read(&idx.join("size")).and_then(|s| cache_size(&s));
            let cpus = read_cpus(&idx.join("shared_cpu_list")).unwrap_or_else(|| vec![cpu]);
            if let (Some(level @ 1..=3), Some(bytes)) = (level, bytes) {
                seen.insert((level, cpus), bytes);
            }
        }
    }
    seen.into_iter()
        .map(|((level, cpus), bytes)| Cache { level, bytes, cpus })
        .collect()
}

/// A PCI function's NUMA node (`-1`: none) and local CPUs.
fn pci_locality(dev: &Path) -> (Option<usize>, Vec<usize>) {
    let numa = read(&dev.join("numa_node")).and_then(|s| s.parse::<usize>().ok());
    let cpus = read_cpus(&dev.join("local_cpulist")).unwrap_or_default();
    (numa, cpus)
}

fn gpus(root: &Path) -> Vec<Device> {
    let dir = root.join("bus/pci/devices");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let Some(id) = super::pci_bus_id(&e.file_name().to_string_lossy()) else {
            continue;
        };
        let p = e.path();
        let (Some(class), Some(vendor)) = (read_hex(&p.join("class")), read_hex(&p.join("vendor")))
        else {
            continue;
        };
        if !super::is_compute_gpu(class, vendor as u16) {
            continue;
        }
        let (numa, cpus) = pci_locality(&p);
        out.push(Device {
            kind: DeviceKind::Gpu,
            name: id.clone(),
            pci_bus_id: Some(id),
            numa,
            cpus,
        });
    }
    out
}

/// Interfaces whose `device` link leads into the PCI tree; the nearest PCI function on the way
/// (a virtio NIC's `device` is the virtio device under it) gives the bus id and locality.
fn nics(root: &Path) -> Vec<Device> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(root.join("class/net"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let Ok(dev) = std::fs::canonicalize(e.path().join("device")) else {
            continue; // virtual: lo, bridges, veth, ifb
        };
        let pci = dev
            .ancestors()
            .find(|a| {
                a.file_name()
                    .and_then(|n| super::pci_bus_id(&n.to_string_lossy()))
                    .is_some()
            })
            .map(Path::to_path_buf);
        let Some(pci) = pci else {
            continue;
        };
        let (numa, cpus) = pci_locality(&pci);
        out.push(Device {
            kind: DeviceKind::Nic,
            name: e.file_name().to_string_lossy().into_owned(),
            pci_bus_id: pci
                .file_name()
                .and_then(|n| super::pci_bus_id(&n.to_string_lossy())),
            numa,
            cpus,
        });
    }
    out
}

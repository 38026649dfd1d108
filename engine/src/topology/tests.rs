//! Topology tests: the sysfs probe on fake /sys trees, the core split between local ranks, pinning,
//! and (with the `hwloc` feature) hwloc against sysfs on this machine.

use super::pin::plan_share;
use super::*;
use std::path::{Path, PathBuf};

/// A fake /sys in a fresh directory, removed on drop.
struct FakeSys(PathBuf);

impl FakeSys {
    fn new(tag: &str) -> FakeSys {
        let dir = std::env::temp_dir().join(format!("parallel-topo-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        FakeSys(dir)
    }

    fn file(&self, rel: &str, text: &str) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, format!("{text}\n")).unwrap();
    }

    fn link(&self, rel: &str, target: &Path) {
        let p = self.0.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    fn probe(&self) -> Topology {
        sysfs::probe(&self.0, "test")
    }
}

impl Drop for FakeSys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two packages, one NUMA node each; 4 cores with 2 SMT threads (cpu c and c+4); per core L1i,
/// L1d and L2, per package L3. GPUs on node 1 (3b:00.0) and node 0 (86:00.0), a BMC display
/// (not a GPU), eth0 on node 0, eth1 a virtio NIC without a node, lo virtual.
fn two_node_machine(tag: &str) -> FakeSys {
    let s = FakeSys::new(tag);
    s.file("devices/system/cpu/online", "0-7");
    for cpu in 0..8usize {
        let core = cpu % 4;
        let package = core / 2;
        let t = format!("devices/system/cpu/cpu{cpu}/topology");
        s.file(&format!("{t}/core_id"), &(core % 2).to_string());
        s.file(&format!("{t}/physical_package_id"), &package.to_string());
        let c = format!("devices/system/cpu/cpu{cpu}/cache");
        let siblings = format!("{core},{}", core + 4);
        let pkg = format!(
            "{}-{},{}-{}",
            package * 2,
            package * 2 + 1,
            package * 2 + 4,
            package * 2 + 5
        );
        for (i, (level, ty, size, shared)) in [
            (1, "Data", "48K", &siblings),
            (1, "Instruction", "32K", &siblings),
            (2, "Unified", "2048K", &siblings),
            (3, "Unified", "32M", &pkg),
        ]
        .into_iter()
        .enumerate()
        {
            s.file(&format!("{c}/index{i}/level"), &level.to_string());
            s.file(&format!("{c}/index{i}/type"), ty);
            s.file(&format!("{c}/index{i}/size"), size);
            s.file(&format!("{c}/index{i}/shared_cpu_list"), shared);
        }
    }
    s.file("devices/system/node/node0/cpulist", "0-1,4-5");
    s.file("devices/system/node/node1/cpulist", "2-3,6-7");
    s.file(
        "devices/system/node/node0/meminfo",
        "Node 0 MemTotal:       16777216 kB\nNode 0 MemFree: 1 kB",
    );
    s.file(
        "devices/system/node/node1/meminfo",
        "Node 1 MemTotal:       8388608 kB",
    );
    for (id, class, vendor, node, cpus) in [
        ("0000:3b:00.0", "0x030200", "0x10de", "1", "2-3,6-7"),
        ("0000:86:00.0", "0x030200", "0x10de", "0", "0-1,4-5"),
        ("0000:03:00.0", "0x030000", "0x1a03", "0", "0-1,4-5"),
        ("0000:5e:00.0", "0x020000", "0x15b3", "0", "0-1,4-5"),
        ("0000:00:03.0", "0x020000", "0x1af4", "-1", "0-7"),
    ] {
        let d = format!("devices/pci0000:00/{id}");
        s.file(&format!("{d}/class"), class);
        s.file(&format!("{d}/vendor"), vendor);
        s.file(&format!("{d}/numa_node"), node);
        s.file(&format!("{d}/local_cpulist"), cpus);
        s.link(&format!("bus/pci/devices/{id}"), &s.0.join(&d));
    }
    s.file("devices/pci0000:00/0000:00:03.0/virtio2/vendor", "0x1af4");
    s.link(
        "class/net/eth0/device",
        &s.0.join("devices/pci0000:00/0000:5e:00.0"),
    );
    s.link(
        "class/net/eth1/device",
        &s.0.join("devices/pci0000:00/0000:00:03.0/virtio2"),
    );
    s.file("class/net/lo/address", "00:00:00:00:00:00");
    s
}

#[test]
fn sysfs_probe_groups_smt_siblings_into_cores_and_cores_into_numa_nodes() {
    let t = two_node_machine("cores").probe();
    assert_eq!(t.probe, ProbeKind::Sysfs);
    let cores: Vec<(Option<usize>, Option<usize>, Vec<usize>)> = t
        .cores
        .iter()
        .map(|c| (c.package, c.numa, c.cpus.clone()))
        .collect();
    assert_eq!(
        cores,
        vec![
            (Some(0), Some(0), vec![0, 4]),
            (Some(0), Some(0), vec![1, 5]),
            (Some(1), Some(1), vec![2, 6]),
            (Some(1), Some(1), vec![3, 7]),
        ]
    );
    assert_eq!(t.logical_cpus(), 8);
    assert_eq!(t.numa_count(), 2);
    assert_eq!(t.numa_nodes[0].cpus, vec![0, 1, 4, 5]);
    assert_eq!(t.numa_nodes[0].memory_bytes, Some(16 << 30));
    assert_eq!(t.numa_nodes[1].memory_bytes, Some(8 << 30));
    assert_eq!(t.numa_of_cpu(6), Some(1));
}

#[test]
fn sysfs_probe_lists_each_shared_data_cache_once_and_skips_instruction_caches() {
    let t = two_node_machine("caches").probe();
    let count = |l: u8| t.caches.iter().filter(|c| c.level == l).count();
    assert_eq!((count(1), count(2), count(3)), (4, 4, 2));
    assert_eq!(
        t.cache_bytes(1),
        Some(48 << 10),
        "the L1 instruction cache (32K) is left out"
    );
    assert_eq!(t.cache_bytes(2), Some(2 << 20));
    assert_eq!(t.cache_bytes(3), Some(32 << 20));
    let l3: Vec<&Vec<usize>> = t
        .caches
        .iter()
        .filter(|c| c.level == 3)
        .map(|c| &c.cpus)
        .collect();
    assert_eq!(l3, vec![&vec![0, 1, 4, 5], &vec![2, 3, 6, 7]]);
}

#[test]
fn sysfs_probe_finds_compute_gpus_and_pci_nics_with_their_numa_node() {
    let t = two_node_machine("devices").probe();
    let gpus: Vec<(&str, Option<usize>)> = t.gpus().map(|d| (d.name.as_str(), d.numa)).collect();
    assert_eq!(
        gpus,
        vec![("0000:3b:00.0", Some(1)), ("0000:86:00.0", Some(0))],
        "the BMC display is no GPU"
    );
    let eth0 = t.nic("eth0").expect("eth0 is a PCI NIC");
    assert_eq!(eth0.pci_bus_id.as_deref(), Some("0000:5e:00.0"));
    assert_eq!((eth0.numa, eth0.cpus.clone()), (Some(0), vec![0, 1, 4, 5]));
    let eth1 = t
        .nic("eth1")
        .expect("a virtio NIC is found through its PCI parent");
    assert_eq!(eth1.pci_bus_id.as_deref(), Some("0000:00:03.0"));
    assert_eq!(
        eth1.numa, None,
        "numa_node -1 and CPUs on both nodes: no single node"
    );
    assert!(t.nic("lo").is_none(), "virtual interfaces are left out");
    assert_eq!(
        t.gpu("00000000:3B:00.0").map(|d| d.numa),
        Some(Some(1)),
        "CUDA's form of a bus id"
    );
    let text: Vec<String> = t
        .describe()
        .into_iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    assert!(
        text.contains(&"nic: eth0 (pci 0000:5e:00.0): numa 0, cpus 0-1,4-5".to_string()),
        "{text:?}"
    );
    assert!(
        text.contains(&"caches: L1 48 KiB x4, L2 2048 KiB x4, L3 32768 KiB x2".to_string()),
        "{text:?}"
    );
}

#[test]
fn sysfs_probe_of_a_tree_without_topology_files_is_empty_not_an_error() {
    let s = FakeSys::new("empty");
    s.file("devices/system/cpu/online", "0-1");
    s.file("devices/system/cpu/cpu0/topology/core_id", "not a number");
    let t = s.probe();
    assert_eq!(
        t.cores.len(),
        2,
        "each CPU without a core id is a core of its own"
    );
    assert!(t.numa_nodes.is_empty() && t.caches.is_empty() && t.devices.is_empty());
    assert_eq!(t.numa_count(), 1);
}

#[test]
fn local_ranks_get_disjoint_physical_cores_near_their_gpu() {
    let t = two_node_machine("split").probe();
    let all: Vec<usize> = (0..8).collect();
    let r0 = plan_share(&t, &all, Some((0, 2)), false);
    let r1 = plan_share(&t, &all, Some((1, 2)), false);
    // GPU 0 (3b:00.0) is on node 1, GPU 1 (86:00.0) on node 0; physical cores before siblings.
    assert_eq!(r0.cpus, vec![2, 3, 6, 7], "{}", r0.why);
    assert_eq!(r1.cpus, vec![0, 1, 4, 5], "{}", r1.why);
    let four: Vec<Vec<usize>> = (0..4)
        .map(|r| plan_share(&t, &all, Some((r, 4)), false).cpus)
        .collect();
    let mut seen: Vec<usize> = four.concat();
    seen.sort_unstable();
    assert_eq!(
        seen, all,
        "four ranks split the eight CPUs without overlap: {four:?}"
    );
}

#[test]
fn without_gpus_the_host_leader_gets_the_cores_near_the_nic() {
    let s = two_node_machine("leader");
    for gpu in ["0000:3b:00.0", "0000:86:00.0"] {
        std::fs::remove_file(s.0.join(format!("bus/pci/devices/{gpu}"))).unwrap();
    }
    s.file("devices/pci0000:00/0000:5e:00.0/numa_node", "1");
    s.file("devices/pci0000:00/0000:5e:00.0/local_cpulist", "2-3,6-7");
    let t = s.probe();
    assert_eq!(t.gpus().count(), 0);
    let all: Vec<usize> = (0..8).collect();
    let leader = plan_share(&t, &all, Some((0, 2)), false);
    assert_eq!(leader.cpus, vec![2, 3, 6, 7], "{}", leader.why);
    assert_eq!(
        plan_share(&t, &all, Some((1, 2)), false).cpus,
        vec![0, 1, 4, 5]
    );
}

#[test]
fn more_local_ranks_than_cores_share_cores_instead_of_failing() {
    let t = two_node_machine("crowd").probe();
    let all: Vec<usize> = (0..8).collect();
    let s = plan_share(&t, &all, Some((5, 6)), false);
    assert_eq!(s.cpus.len(), 2, "one core (two threads): {s:?}");
    assert!(s.why.contains("shared"), "{}", s.why);
}

#[test]
fn a_launcher_narrowed_mask_or_a_single_process_is_not_split() {
    let t = two_node_machine("narrow").probe();
    let s = plan_share(&t, &[1, 5], Some((0, 2)), true);
    assert_eq!(s.cpus, vec![1, 5]);
    assert!(
        !s.pin,
        "local ranks that may share the mask float within it (PIN-5)"
    );
    let alone = plan_share(&t, &(0..8).collect::<Vec<_>>(), None, false);
    assert!(alone.pin);
    assert_eq!(
        alone.cpus,
        vec![0, 1, 2, 3, 4, 5, 6, 7],
        "physical cores first, by node"
    );
}

#[test]
fn cpu_lists_print_as_ranges() {
    assert_eq!(cpu_list(&[0, 1, 2, 3, 6, 8, 9]), "0-3,6,8-9");
    assert_eq!(cpu_list(&[]), "");
    assert_eq!(
        normalize_bus_id("00000000:3B:00.0").as_deref(),
        Some("0000:3b:00.0")
    );
    assert_eq!(normalize_bus_id("3b:00.0"), None);
}

#[test]
fn this_machine_has_cores_and_the_reactor_cpus_are_among_them() {
    let t = topology();
    assert!(!t.cores.is_empty(), "{t:?}");
    assert!(t.logical_cpus() >= usable_cores(), "{t:?}");
    let cpus = reactor_cpus();
    assert!(!cpus.is_empty());
    let known: Vec<usize> = t.cores.iter().flat_map(|c| c.cpus.clone()).collect();
    assert!(
        cpus.iter().all(|c| known.contains(c)),
        "{cpus:?} vs {known:?}"
    );
}

#[test]
fn pinning_to_an_allowed_cpu_works_and_a_refused_pin_is_false_not_a_panic() {
    let cpu = reactor_cpus()[0];
    let ok = std::thread::spawn(move || pin_current_thread(cpu))
        .join()
        .unwrap();
    assert!(ok, "pinning to cpu {cpu} of our own mask");
    let refused = std::thread::spawn(|| (pin_current_thread(1023), pin_current_thread(1 << 20)))
        .join()
        .unwrap();
    assert_eq!(refused, (false, false));
}

#[cfg(feature = "hwloc")]
#[test]
fn hwloc_and_sysfs_agree_on_cores_and_numa_nodes_here() {
    let h = hwloc::probe().expect("hwloc probes this machine");
    let s = sysfs::probe(Path::new("/sys"), "test");
    let cpus = |t: &Topology| t.cores.iter().map(|c| c.cpus.clone()).collect::<Vec<_>>();
    assert_eq!(cpus(&h), cpus(&s), "physical cores and their threads");
    assert_eq!(h.numa_count(), s.numa_count());
    let nodes = |t: &Topology| {
        t.numa_nodes
            .iter()
            .map(|n| (n.id, n.cpus.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(nodes(&h), nodes(&s));
    let nics = |t: &Topology| {
        t.nics()
            .map(|n| (n.name.clone(), n.pci_bus_id.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(nics(&h), nics(&s), "PCI NICs");
    for level in 2..=3 {
        assert_eq!(h.cache_bytes(level), s.cache_bytes(level), "L{level} size");
    }
    assert_eq!(probe().probe, ProbeKind::Hwloc);
}

//! The hwloc probe (cargo feature `hwloc`): the topology from libhwloc through `hwlocality`.
//!
//! Invariants:
//! - HWLOC-1: every error hwloc reports is returned as text, so [`super::probe`] falls back to
//!   sysfs (TOPO-3); nothing here panics on what the library returns (hwlocality, unlike the
//!   hwloc2 crate, does not panic on NUMA queries with hwloc 2.9).
//! - HWLOC-2: the fields mean what the sysfs probe's mean (TOPO-2): the same GPU rule
//!   ([`super::is_compute_gpu`]), PCI-backed NICs only, data and unified caches of levels 1-3,
//!   a device's locality from its first non-I/O ancestor (its cpuset, and its node when that
//!   ancestor covers exactly one).

use super::{Cache, Core, Device, DeviceKind, NumaNode, ProbeKind, Topology};
use hwlocality::object::TopologyObject;
use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::topology::builder::TypeFilter;

/// Probes with hwloc; the error says what failed (HWLOC-1).
pub fn probe() -> Result<Topology, String> {
    let topo = hwlocality::Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|e| format!("setting the I/O filter: {e}"))?
        .build()
        .map_err(|e| format!("loading the topology: {e}"))?;
    Ok(Topology {
        probe: ProbeKind::Hwloc,
        reason: "libhwloc through hwlocality".into(),
        cores: cores(&topo),
        numa_nodes: numa_nodes(&topo),
        caches: caches(&topo),
        devices: devices(&topo),
    }
    .finish())
}

fn cpus_of(o: &TopologyObject) -> Vec<usize> {
    o.cpuset()
        .map(|s| s.iter_set().map(usize::from).collect())
        .unwrap_or_default()
}

/// The one NUMA node `o` covers, if exactly one.
fn single_node(o: &TopologyObject) -> Option<usize> {
    let set = o.nodeset()?;
    match set.weight() {
        Some(1) => set.first_set().map(usize::from),
        _ => None,
    }
}

fn cores(topo: &hwlocality::Topology) -> Vec<Core> {
    topo.objects_with_type(ObjectType::Core)
        .map(|c| Core {
            package: c
                .first_ancestor_with_type(ObjectType::Package)
                .and_then(TopologyObject::os_index),
            numa: None, // from the nodes' CPUs in finish(), as for sysfs
            cpus: cpus_of(c),
        })
        .collect()
}

fn numa_nodes(topo: &hwlocality::Topology) -> Vec<NumaNode> {
    topo.objects_with_type(ObjectType::NUMANode)
        .filter_map(|n| {
            let memory_bytes = match n.attributes() {
                Some(ObjectAttributes::NUMANode(a)) => a.local_memory().map(|m| m.get()),
                _ => None,
            };
            Some(NumaNode {
                id: n.os_index()?,
                cpus: cpus_of(n),
                memory_bytes,
            })
        })
        .collect()
}

fn caches(topo: &hwlocality::Topology) -> Vec<Cache> {
    let levels = [
        (1u8, ObjectType::L1Cache),
        (2, ObjectType::L2Cache),
        (3, ObjectType::L3Cache),
    ];
    let mut out = Vec::new();
    for (level, ty) in levels {
        for c in topo.objects_with_type(ty) {
            if let Some(ObjectAttributes::Cache(a)) = c.attributes()
                && let Some(bytes) = a.size()
            {
                out.push(Cache {
                    level,
                    bytes: bytes.get(),
                    cpus: cpus_of(c),
                });
            }
        }
    }
    out
}

/// Where an I/O object sits: its first non-I/O ancestor's node (if one) and CPUs.
fn locality(o: &TopologyObject) -> (Option<usize>, Vec<usize>) {
    match o.first_non_io_ancestor() {
        Some(a) => (single_node(a), cpus_of(a)),
        None => (None, Vec::new()),
    }
}

fn bus_id_of(pci: &TopologyObject) -> Option<String> {
    match pci.attributes() {
        Some(ObjectAttributes::PCIDevice(a)) => super::pci_bus_id(&format!(
            "{:04x}:{:02x}:{:02x}.{:x}",
            a.domain(),
            a.bus_id(),
            a.bus_device(),
            a.function()
        )),
        _ => None,
    }
}

fn devices(topo: &hwlocality::Topology) -> Vec<Device> {
    let mut out = Vec::new();
    for p in topo.pci_devices() {
        let Some(ObjectAttributes::PCIDevice(a)) = p.attributes() else {
            continue;
        };
        // hwloc's class id is base and subclass (0x0302); the sysfs class also has the prog-if.
        if !super::is_compute_gpu(u32::from(a.class_id()) << 8, a.vendor_id()) {
            continue;
        }
        let Some(id) = bus_id_of(p) else { continue };
        let (numa, cpus) = locality(p);
        out.push(Device {
            kind: DeviceKind::Gpu,
            name: id.clone(),
            pci_bus_id: Some(id),
            numa,
            cpus,
        });
    }
    for o in topo.os_devices() {
        let is_net = matches!(o.attributes(), Some(ObjectAttributes::OSDevice(a))
            if a.device_type() == OSDeviceType::Network);
        let pci = o
            .ancestors()
            .find(|a| a.object_type() == ObjectType::PCIDevice);
        let (true, Some(pci), Some(name)) = (is_net, pci, o.name()) else {
            continue;
        };
        let (numa, cpus) = locality(o);
        out.push(Device {
            kind: DeviceKind::Nic,
            name: name.to_string_lossy().into_owned(),
            pci_bus_id: bus_id_of(pci),
            numa,
            cpus,
        });
    }
    out
}

//! A simulated CUDA device for tests on machines without a GPU (feature `cuda-sim`).
//!
//! "Device memory" is a shared memory file (memfd) per allocation, mapped in this process; an IPC
//! handle names the owner's pid and descriptor, and an importer maps the same pages through
//! `/proc/<pid>/fd/<fd>`: like CUDA IPC, the importer sees the exporter's memory itself, so the
//! offset handling, the keep-alive acknowledgement and the staging pipeline are exercised for
//! real. Copies are synchronous (events are always complete); kernels do not exist here (the
//! collectives reduce simulated device memory on the CPU).

use super::{DevPtr, Event, Gpu, IpcRecord, Kernel, Mem};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Deadline;
use std::collections::{BTreeMap, HashMap};
use std::ffi::c_void;
use std::sync::Mutex;

const MAGIC: &[u8; 8] = b"PARSIM01";
/// Simulated devices.
pub const DEVICES: usize = 2;

#[derive(Debug)]
struct Alloc {
    len: usize,
    fd: i32,
    dev: i32,
}

#[derive(Debug)]
pub struct Sim {
    /// Our allocations and imported mappings: base -> allocation.
    allocs: Mutex<BTreeMap<u64, Alloc>>,
    imported: Mutex<HashMap<[u8; 64], u64>>,
}

impl Sim {
    pub(super) fn new() -> Sim {
        Sim {
            allocs: Mutex::new(BTreeMap::new()),
            imported: Mutex::new(HashMap::new()),
        }
    }

    fn find(&self, ptr: u64) -> Option<(u64, usize, i32, i32)> {
        let a = self.allocs.lock().unwrap_or_else(|p| p.into_inner());
        let (base, al) = a.range(..=ptr).next_back()?;
        (ptr < base + al.len.max(1) as u64).then_some((*base, al.len, al.fd, al.dev))
    }

    fn check_dev(dev: i32) -> Result<()> {
        if (0..DEVICES as i32).contains(&dev) {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::Unsupported,
                "cuda",
                format!("CUDA device {dev} does not exist here ({DEVICES} visible, simulated)"),
            ))
        }
    }
}

fn map_fd(fd: i32, len: usize) -> Result<u64> {
    // SAFETY: a shared mapping of a file we hold open; checked for failure.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len.max(1),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::os(
            "cuda",
            "mapping simulated device memory",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(p as u64)
}

impl Gpu for Sim {
    fn describe(&self) -> String {
        format!("simulated CUDA ({DEVICES} devices in host memory)")
    }

    fn simulated(&self) -> bool {
        true
    }

    fn device_count(&self) -> usize {
        DEVICES
    }

    fn pci_bus_id(&self, dev: i32) -> Result<String> {
        Self::check_dev(dev)?;
        Ok(format!("sim:{dev}"))
    }

    fn device_of(&self, ptr: DevPtr) -> Result<i32> {
        self.find(ptr).map(|f| f.3).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "cuda",
                format!("{ptr:#x} is not simulated device memory"),
            )
        })
    }

    fn stream(&self, dev: i32) -> Result<u64> {
        Self::check_dev(dev)?;
        Ok(0)
    }

    fn alloc(&self, dev: i32, len: usize) -> Result<DevPtr> {
        Self::check_dev(dev)?;
        // SAFETY: a fresh anonymous file; the name is for /proc listings only.
        let fd = unsafe { libc::memfd_create(c"parallel-sim-device".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::os(
                "cuda",
                "memfd_create",
                std::io::Error::last_os_error(),
            ));
        }
        // SAFETY: our descriptor.
        if unsafe { libc::ftruncate(fd, len.max(1) as i64) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: ours.
            unsafe { libc::close(fd) };
            return Err(Error::os("cuda", "sizing simulated device memory", e));
        }
        let base = map_fd(fd, len)?;
        self.allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(base, Alloc { len, fd, dev });
        Ok(base)
    }

    unsafe fn free(&self, _dev: i32, ptr: DevPtr) {
        if let Some(a) = self
            .allocs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ptr)
        {
            // SAFETY: our mapping and descriptor, released once.
            unsafe {
                libc::munmap(ptr as *mut c_void, a.len.max(1));
                libc::close(a.fd);
            }
        }
    }

    fn host_alloc(&self, len: usize) -> Result<*mut u8> {
        // SAFETY: anonymous private mapping, checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::os(
                "cuda",
                "allocating staging memory",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(p.cast())
    }

    unsafe fn host_free(&self, p: *mut u8, len: usize) {
        // SAFETY: the caller's contract.
        unsafe { libc::munmap(p.cast(), len.max(1)) };
    }

    unsafe fn copy(&self, dev: i32, dst: Mem, src: Mem, len: usize) -> Result<()> {
        Self::check_dev(dev)?;
        for m in [dst, src] {
            if let Mem::Dev(p) = m
                && len > 0
                && self.find(p).is_none()
                && self.find(p + len as u64 - 1).is_none()
                && !self.imported_contains(p)
            {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "cuda",
                    format!("{p:#x} is not simulated device memory"),
                ));
            }
        }
        let a = |m: Mem| match m {
            Mem::Host(p) => p,
            Mem::Dev(d) => d as *mut u8,
        };
        // SAFETY: the caller's contract (both ranges valid for len bytes).
        unsafe { std::ptr::copy(a(src), a(dst), len) };
        Ok(())
    }

    fn record(&self, dev: i32, _interprocess: bool) -> Result<Event> {
        Self::check_dev(dev)?;
        Ok(Event { raw: 0, dev })
    }

    fn wait_event(&self, _ev: Event, _deadline: Deadline) -> Result<()> {
        Ok(())
    }

    fn release_event(&self, _ev: Event) {}

    fn drain(&self, _dev: i32) {}

    fn ipc_done(&self, _rec: &IpcRecord) {}

    fn sync(&self, dev: i32, _deadline: Deadline) -> Result<()> {
        Self::check_dev(dev)
    }

    fn ipc_export(&self, dev: i32, ptr: DevPtr, len: usize) -> Result<(IpcRecord, Event)> {
        let (base, alen, fd, _) = self.find(ptr).ok_or_else(|| {
            Error::new(
                ErrorKind::Unsupported,
                "send",
                format!("{ptr:#x} is not simulated device memory of this process"),
            )
        })?;
        let offset = ptr - base;
        if offset + len as u64 > alen as u64 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "send",
                format!(
                    "a CUDA tensor of {len} bytes at offset {offset} overruns its allocation of {alen} bytes"
                ),
            ));
        }
        let mut mem = [0u8; 64];
        mem[..8].copy_from_slice(MAGIC);
        mem[8..12].copy_from_slice(&std::process::id().to_le_bytes());
        mem[12..16].copy_from_slice(&fd.to_le_bytes());
        mem[16..24].copy_from_slice(&(alen as u64).to_le_bytes());
        mem[24..32].copy_from_slice(&base.to_le_bytes());
        Ok((
            IpcRecord {
                mem,
                event: [0; 64],
                offset,
                len: len as u64,
            },
            self.record(dev, true)?,
        ))
    }

    fn ipc_import(&self, dev: i32, rec: &IpcRecord) -> Result<DevPtr> {
        Self::check_dev(dev)?;
        if &rec.mem[..8] != MAGIC {
            return Err(Error::new(
                ErrorKind::Protocol,
                "recv",
                "not a simulated IPC handle",
            ));
        }
        let pid = u32::from_le_bytes(rec.mem[8..12].try_into().expect("4"));
        let fd = i32::from_le_bytes(rec.mem[12..16].try_into().expect("4"));
        let alen = u64::from_le_bytes(rec.mem[16..24].try_into().expect("8"));
        if rec.offset.checked_add(rec.len).is_none_or(|e| e > alen) {
            return Err(Error::new(
                ErrorKind::Protocol,
                "recv",
                "IPC record beyond its allocation",
            ));
        }
        if pid == std::process::id() {
            let base = u64::from_le_bytes(rec.mem[24..32].try_into().expect("8"));
            return Ok(base + rec.offset);
        }
        let mut imp = self.imported.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = imp.get(&rec.mem) {
            return Ok(b + rec.offset);
        }
        let path = format!("/proc/{pid}/fd/{fd}");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::os("recv", &format!("opening {path}"), e))?;
        use std::os::fd::AsRawFd;
        let base = map_fd(f.as_raw_fd(), alen as usize)?;
        imp.insert(rec.mem, base);
        Ok(base + rec.offset)
    }

    fn kernel(&self, _dev: i32, name: &str, _source: &dyn Fn() -> String) -> Result<Kernel> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "cuda",
            format!("kernel {name}: the simulated device runs no kernels"),
        ))
    }

    unsafe fn launch(&self, _k: Kernel, _n: usize, _args: &mut [*mut c_void]) -> Result<()> {
        Err(Error::new(
            ErrorKind::Unsupported,
            "cuda",
            "the simulated device runs no kernels",
        ))
    }
}

impl Sim {
    fn imported_contains(&self, p: u64) -> bool {
        let imp = self.imported.lock().unwrap_or_else(|p| p.into_inner());
        imp.iter().any(|(h, b)| {
            let alen = u64::from_le_bytes(h[16..24].try_into().expect("8"));
            p >= *b && p < b + alen.max(1)
        })
    }
}

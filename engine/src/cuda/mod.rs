//! CUDA: device memory, copies, events and IPC handles, behind one small interface.
//!
//! The driver API is reached through cudarc with dynamic loading, so nothing CUDA is needed to
//! build or to run: [`cuda()`] looks for libcuda with `dlopen` first (cudarc panics when the
//! library is missing) and answers `None` on a machine without a GPU, which then simply has no
//! CUDA link kinds. Tests on such machines use a simulated device (feature `cuda-sim`, chosen by
//! calling [`use_simulator`] first), whose "device memory" is shared host memory that other
//! processes map by handle, like CUDA IPC.
//!
//! Invariants:
//! - CUDA-1: no cudarc function is called before the probe found libcuda and `cuInit` succeeded;
//!   a failure anywhere in the probe is a reason string, never a panic.
//! - CUDA-2: all work of the engine on device `d` runs on one stream of ours per device (created
//!   in the device's primary context, the one torch uses). Callers order the producer's work
//!   before ours through DLPack's stream argument (`stream()` gives the handle); every engine call
//!   that writes device memory synchronizes that stream before it returns, so the result is
//!   complete for any stream.
//! - CUDA-3: an IPC export names the allocation's base and the tensor's offset inside it (the
//!   original sent the base and users got wrong data); the exporter keeps the memory alive until
//!   the importer acknowledges its copy.

use crate::config::config;
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::Deadline;
use std::any::Any;
use std::sync::OnceLock;

mod driver;
pub mod nvrtc;
#[cfg(feature = "cuda-sim")]
pub mod sim;

/// A device address (a `CUdeviceptr`).
pub type DevPtr = u64;

/// Either side of a copy: host memory or device memory. With unified addressing both are plain
/// addresses; the distinction matters to the simulated device and to error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mem {
    Host(*mut u8),
    Dev(DevPtr),
}

// SAFETY: a Mem is an address; the code that dereferences it states its own contract.
unsafe impl Send for Mem {}

/// An event recorded on our stream of one device.
#[derive(Debug)]
pub struct Event {
    pub(crate) raw: u64,
    pub(crate) dev: i32,
}

/// What an importer needs to read an exported tensor (CUDA-3): 144 bytes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcRecord {
    pub mem: [u8; 64],
    pub event: [u8; 64],
    /// Offset of the tensor's first byte from the allocation's base.
    pub offset: u64,
    pub len: u64,
}

pub const IPC_RECORD_LEN: usize = 144;

impl IpcRecord {
    pub fn encode(&self) -> [u8; IPC_RECORD_LEN] {
        let mut b = [0u8; IPC_RECORD_LEN];
        b[..64].copy_from_slice(&self.mem);
        b[64..128].copy_from_slice(&self.event);
        b[128..136].copy_from_slice(&self.offset.to_le_bytes());
        b[136..].copy_from_slice(&self.len.to_le_bytes());
        b
    }
    pub fn decode(b: &[u8; IPC_RECORD_LEN]) -> IpcRecord {
        let mut mem = [0u8; 64];
        let mut event = [0u8; 64];
        mem.copy_from_slice(&b[..64]);
        event.copy_from_slice(&b[64..128]);
        IpcRecord {
            mem,
            event,
            offset: u64::from_le_bytes(b[128..136].try_into().expect("8")),
            len: u64::from_le_bytes(b[136..].try_into().expect("8")),
        }
    }
}

/// A kernel loaded on one device (from NVRTC output).
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    pub(crate) func: u64,
    pub dev: i32,
}

/// The operations the engine and the collectives need from a GPU backend.
pub trait Gpu: Send + Sync + std::fmt::Debug {
    /// "CUDA driver 12.8, 1 device(s)" or "simulated".
    fn describe(&self) -> String;
    fn simulated(&self) -> bool;
    fn device_count(&self) -> usize;
    /// The PCI bus id of a device ("0000:3b:00.0").
    fn pci_bus_id(&self, dev: i32) -> Result<String>;
    /// The device owning a device address (an error for host memory).
    fn device_of(&self, ptr: DevPtr) -> Result<i32>;
    /// Our stream on `dev`, as a raw handle (for DLPack's `stream=` argument).
    fn stream(&self, dev: i32) -> Result<u64>;
    fn alloc(&self, dev: i32, len: usize) -> Result<DevPtr>;
    /// # Safety
    /// `ptr` came from `alloc(dev, ..)` and no work using it is pending.
    unsafe fn free(&self, dev: i32, ptr: DevPtr);
    /// Page-locked host memory (staging buffers).
    fn host_alloc(&self, len: usize) -> Result<*mut u8>;
    /// # Safety
    /// `p` came from `host_alloc(len)` and no copy using it is pending.
    unsafe fn host_free(&self, p: *mut u8, len: usize);
    /// Queues a copy of `len` bytes on our stream of `dev`.
    ///
    /// # Safety
    /// Both ranges are valid for `len` bytes until the copy completes (an event or `sync`).
    unsafe fn copy(&self, dev: i32, dst: Mem, src: Mem, len: usize) -> Result<()>;
    /// Records an event after the work queued so far on our stream of `dev`.
    fn record(&self, dev: i32, interprocess: bool) -> Result<Event>;
    /// Waits (polling, bounded by `deadline`) for an event; consumes it.
    fn wait_event(&self, ev: Event, deadline: Deadline) -> Result<()>;
    /// Releases an event without waiting for it.
    fn release_event(&self, ev: Event);
    /// Waits for everything queued on our stream of `dev`.
    fn sync(&self, dev: i32, deadline: Deadline) -> Result<()>;
    /// Waits for our stream of `dev` without deadline or interrupt (error paths: no copy may
    /// still be writing memory that is about to be reused or released).
    fn drain(&self, dev: i32);
    /// Exports `len` bytes at `ptr` (an event recorded now orders the importer after our stream).
    fn ipc_export(&self, dev: i32, ptr: DevPtr, len: usize) -> Result<(IpcRecord, Event)>;
    /// Maps an exported allocation (cached) and makes our stream of `dev` wait for its event;
    /// returns the address of the exported tensor's first byte.
    fn ipc_import(&self, dev: i32, rec: &IpcRecord) -> Result<DevPtr>;
    /// The copy from an imported record finished (its stream synchronized): the mapping may be
    /// closed (`PARALLEL_CUDA_IPC_CACHE`).
    fn ipc_done(&self, rec: &IpcRecord);
    /// Loads (once per device and name) a kernel from CUDA C source compiled by NVRTC.
    fn kernel(&self, dev: i32, name: &str, source: &dyn Fn() -> String) -> Result<Kernel>;
    /// Launches `k` over `n` elements (1-D grid) on our stream with the given arguments.
    ///
    /// # Safety
    /// `args` point to values matching the kernel's parameters; the memory it touches is valid
    /// until the stream is synchronized.
    unsafe fn launch(&self, k: Kernel, n: usize, args: &mut [*mut std::ffi::c_void]) -> Result<()>;
}

static GPU: OnceLock<std::result::Result<Box<dyn Gpu>, String>> = OnceLock::new();

/// The process's GPU backend, probed once (CUDA-1); `None` without one.
pub fn cuda() -> Option<&'static dyn Gpu> {
    GPU.get_or_init(probe).as_ref().ok().map(|b| b.as_ref())
}

/// Why [`cuda()`] is `None` (empty when it is not).
pub fn unavailable_reason() -> String {
    match GPU.get_or_init(probe) {
        Ok(_) => String::new(),
        Err(e) => e.clone(),
    }
}

/// The backend, or an error saying why there is none (for calls that were given CUDA tensors).
pub fn require(op: &'static str) -> Result<&'static dyn Gpu> {
    cuda().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            op,
            format!(
                "a CUDA tensor was given but this process cannot use CUDA: {} (move the tensor to the CPU, or run where the NVIDIA driver is installed)",
                unavailable_reason()
            ),
        )
    })
}

/// The CUDA devices this process sees, by PCI bus id (for the Tree's probe; empty without CUDA).
pub fn gpu_ids() -> Vec<String> {
    let Some(g) = cuda() else {
        return Vec::new();
    };
    (0..g.device_count() as i32)
        .map(|d| g.pci_bus_id(d).unwrap_or_else(|_| format!("cuda:{d}")))
        .collect()
}

/// Whether this process offers CUDA IPC to same-host peers (advertised in the handshake).
/// Cheap: only checks that the driver library can be loaded; the import itself reports failures.
pub fn ipc_offered() -> bool {
    if !(config().cuda && config().cuda_ipc) {
        return false;
    }
    // Loading libcuda is cheap; a process that has it but cannot use CUDA (no visible device)
    // must not offer IPC, so CUDA is initialised here when the library is there.
    (simulating() || driver::library_loadable()) && cuda().is_some()
}

#[cfg(feature = "cuda-sim")]
static SIMULATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tests without a GPU: use the simulated device instead of the driver. Call it before anything
/// touches CUDA in the process (the backend is chosen once).
#[cfg(feature = "cuda-sim")]
pub fn use_simulator() {
    SIMULATE.store(true, std::sync::atomic::Ordering::SeqCst);
}

#[cfg(feature = "cuda-sim")]
fn simulating() -> bool {
    SIMULATE.load(std::sync::atomic::Ordering::SeqCst)
}

#[cfg(not(feature = "cuda-sim"))]
fn simulating() -> bool {
    false
}

fn probe() -> std::result::Result<Box<dyn Gpu>, String> {
    // A malformed environment: no CUDA, and the reason says why (CONFIG-4).
    if !crate::config::try_config().map_err(|e| e.to_string())?.cuda {
        return Err("PARALLEL_CUDA=0".into());
    }
    #[cfg(feature = "cuda-sim")]
    if simulating() {
        return Ok(Box::new(sim::Sim::new()));
    }
    driver::Driver::probe().map(|d| Box::new(d) as Box<dyn Gpu>)
}

/// Allocates `len` bytes on a device for the engine, returning the address and the owner whose
/// drop frees it (the bindings install torch's caching allocator: `cuMemFree` synchronizes the
/// whole device, a cached block does not).
pub type DeviceAllocator =
    Box<dyn Fn(i32, usize) -> Result<(DevPtr, Box<dyn Any + Send + Sync>)> + Send + Sync>;

static ALLOCATOR: OnceLock<DeviceAllocator> = OnceLock::new();

/// Installs the allocator of device memory the engine creates (once per process).
pub fn set_allocator(f: DeviceAllocator) {
    let _ = ALLOCATOR.set(f);
}

/// A device allocation freed when dropped (the storage of CUDA tensors the engine creates).
pub struct DeviceAlloc {
    pub ptr: DevPtr,
    pub len: usize,
    pub dev: i32,
    /// The installed allocator's owner of the memory; `None`: ours (`cuMemAlloc`).
    pub owner: Option<Box<dyn Any + Send + Sync>>,
}

impl std::fmt::Debug for DeviceAlloc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceAlloc({} bytes on cuda:{})", self.len, self.dev)
    }
}

impl DeviceAlloc {
    pub fn new(dev: i32, len: usize) -> Result<DeviceAlloc> {
        let g = require("alloc")?;
        if len == 0 {
            return Ok(DeviceAlloc {
                ptr: 0,
                len,
                dev,
                owner: None,
            });
        }
        if let Some(a) = ALLOCATOR.get() {
            match a(dev, len) {
                Ok((ptr, owner)) => {
                    return Ok(DeviceAlloc {
                        ptr,
                        len,
                        dev,
                        owner: Some(owner),
                    });
                }
                // (torch without CUDA, say): the driver's own allocation still works.
                Err(e) => tracing::debug!("{e}; allocating with cuMemAlloc instead"),
            }
        }
        Ok(DeviceAlloc {
            ptr: g.alloc(dev, len)?,
            len,
            dev,
            owner: None,
        })
    }
}

impl Drop for DeviceAlloc {
    fn drop(&mut self) {
        if self.owner.take().is_some() {
            return;
        }
        if self.ptr != 0
            && let Some(g) = cuda()
        {
            // Engine calls synchronize before returning (CUDA-2): nothing is pending on it; a
            // consumer's own work on it is ordered by the caching of its owner (torch) or ended.
            // SAFETY: allocated by `new` with this device; freed once.
            unsafe { g.free(self.dev, self.ptr) };
        }
    }
}

/// Page-locked staging buffers of one thread, reused across transfers.
#[derive(Debug)]
pub(crate) struct Staging {
    bufs: Vec<(*mut u8, usize)>,
}

impl Staging {
    /// `n` buffers of at least `size` bytes.
    pub(crate) fn get(&mut self, n: usize, size: usize) -> Result<&[(*mut u8, usize)]> {
        let g = require("staging")?;
        if self.bufs.first().is_some_and(|b| b.1 < size) {
            self.release();
        }
        while self.bufs.len() < n {
            self.bufs.push((g.host_alloc(size)?, size));
        }
        Ok(&self.bufs[..n])
    }

    fn release(&mut self) {
        if let Some(g) = cuda() {
            for (p, n) in self.bufs.drain(..) {
                // SAFETY: our own host allocation; transfers wait for their copies before
                // returning, so none is pending.
                unsafe { g.host_free(p, n) };
            }
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        self.release();
    }
}

/// The plan of one staged transfer of `len` bytes: `nchunks` chunks of (at most) `chunk` bytes
/// through this thread's pinned buffers (`PARALLEL_CUDA_CHUNK`, `PARALLEL_CUDA_STAGING`).
pub(crate) struct Stage {
    pub g: &'static dyn Gpu,
    pub chunk: usize,
    pub nchunks: usize,
    pub bufs: Vec<(*mut u8, usize)>,
}

impl Stage {
    pub(crate) fn plan(op: &'static str, len: usize, sending: bool) -> Result<Stage> {
        let g = require(op)?;
        let chunk = config().cuda_chunk;
        let nchunks = len.div_ceil(chunk);
        let nb = config().cuda_staging.min(nchunks);
        let bufs = STAGING.with(|s| {
            let mut s = s.borrow_mut();
            let set = if sending { &mut s.0 } else { &mut s.1 };
            set.get(nb, chunk).map(<[_]>::to_vec)
        })?;
        Ok(Stage {
            g,
            chunk,
            nchunks,
            bufs,
        })
    }
}

thread_local! {
    /// Staging buffers of this thread (sends and receives run on the caller's thread).
    pub(crate) static STAGING: std::cell::RefCell<(Staging, Staging)> =
        const { std::cell::RefCell::new((Staging { bufs: Vec::new() }, Staging { bufs: Vec::new() })) };
}

/// A one-off synchronous copy (test helpers, small control data).
///
/// # Safety
/// As [`Gpu::copy`].
pub unsafe fn copy_sync(dev: i32, dst: Mem, src: Mem, len: usize) -> Result<()> {
    let g = require("copy")?;
    // SAFETY: forwarded contract.
    unsafe { g.copy(dev, dst, src, len)? };
    g.sync(dev, Deadline::or_default(None))
}

//! The real backend: the CUDA driver API through cudarc (dynamic loading).

use super::{DevPtr, Event, Gpu, IpcRecord, Kernel, Mem};
use crate::error::{Error, ErrorKind, Result};
use crate::runtime::{Deadline, relax};
use cudarc::driver::sys;
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_void};
use std::sync::{Mutex, OnceLock};

/// CUDA-1: `dlopen` before any cudarc call (cudarc panics when libcuda is missing).
fn driver_library_present() -> std::result::Result<(), String> {
    for name in [c"libcuda.so.1", c"libcuda.so"] {
        // SAFETY: NUL-terminated names; the handle stays open for the process's life.
        if !unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) }.is_null() {
            // SAFETY: only probes library names (no symbol is resolved).
            if unsafe { sys::is_culib_present() } {
                return Ok(());
            }
        }
    }
    // SAFETY: dlerror returns a thread-local message or null.
    let why = unsafe {
        let p = libc::dlerror();
        if p.is_null() {
            "not found".to_string()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    Err(format!(
        "the NVIDIA driver library libcuda.so.1 cannot be loaded ({why})"
    ))
}

/// Whether libcuda can be loaded (without initialising CUDA): cheap, for the handshake.
pub(super) fn library_loadable() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| driver_library_present().is_ok())
}

fn name_of(r: sys::CUresult) -> String {
    let mut p: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: the driver is loaded (only called after the probe); p receives a static string.
    let ok = unsafe { sys::cuGetErrorName(r, &mut p) } == sys::CUresult::CUDA_SUCCESS;
    if ok && !p.is_null() {
        // SAFETY: a static NUL-terminated string from the driver.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    } else {
        format!("{r:?}")
    }
}

fn ck(r: sys::CUresult, op: &'static str, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let kind = match r {
        sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY => ErrorKind::Resource,
        sys::CUresult::CUDA_ERROR_INVALID_VALUE => ErrorKind::Unsupported,
        _ => ErrorKind::Resource,
    };
    Err(Error::new(
        kind,
        op,
        format!("{what} failed: {}", name_of(r)),
    ))
}

struct DevState {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    arch: String,
}

// SAFETY: a CUDA context and stream may be used from any thread (the driver is thread-safe).
unsafe impl Send for DevState {}
// SAFETY: as above.
unsafe impl Sync for DevState {}

struct Module(#[allow(dead_code)] sys::CUmodule);
// SAFETY: a loaded module is a driver object usable from any thread.
unsafe impl Send for Module {}

pub(super) struct Driver {
    version: i32,
    count: usize,
    devs: Vec<OnceLock<std::result::Result<DevState, Error>>>,
    /// Opened IPC allocations: (device, handle) -> base address.
    ipc: Mutex<HashMap<(i32, [u8; 64]), DevPtr>>,
    /// Our own exports (a process cannot open its own handles): handle -> base address, and
    /// event handle -> event (alive until the exporter's send returns, after the importer's ack).
    own_mem: Mutex<HashMap<[u8; 64], DevPtr>>,
    own_events: Mutex<HashMap<[u8; 64], u64>>,
    kernels: Mutex<HashMap<(i32, String), (Module, u64)>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe())
    }
}

impl Driver {
    pub(super) fn probe() -> std::result::Result<Driver, String> {
        driver_library_present()?;
        // SAFETY: libcuda is loaded (checked above).
        let r = unsafe { sys::cuInit(0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(format!("cuInit failed: {}", name_of(r)));
        }
        let mut version = 0;
        let mut count = 0;
        // SAFETY: out-pointers to locals.
        unsafe {
            sys::cuDriverGetVersion(&mut version);
            let r = sys::cuDeviceGetCount(&mut count);
            if r != sys::CUresult::CUDA_SUCCESS {
                return Err(format!("cuDeviceGetCount failed: {}", name_of(r)));
            }
        }
        if count <= 0 {
            return Err("the CUDA driver sees no device (CUDA_VISIBLE_DEVICES?)".into());
        }
        Ok(Driver {
            version,
            count: count as usize,
            devs: (0..count).map(|_| OnceLock::new()).collect(),
            ipc: Mutex::new(HashMap::new()),
            own_mem: Mutex::new(HashMap::new()),
            own_events: Mutex::new(HashMap::new()),
            kernels: Mutex::new(HashMap::new()),
        })
    }

    /// Makes `dev`'s primary context current on this thread; returns its state.
    fn enter(&self, dev: i32) -> Result<&DevState> {
        let slot = usize::try_from(dev)
            .ok()
            .and_then(|d| self.devs.get(d))
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Unsupported,
                    "cuda",
                    format!(
                        "CUDA device {dev} does not exist here ({} visible)",
                        self.count
                    ),
                )
            })?;
        let st = slot
            .get_or_init(|| {
                let mut d: sys::CUdevice = 0;
                let mut ctx: sys::CUcontext = std::ptr::null_mut();
                let mut stream: sys::CUstream = std::ptr::null_mut();
                let (mut major, mut minor) = (0, 0);
                // SAFETY: out-pointers to locals; the driver is initialised.
                unsafe {
                    ck(sys::cuDeviceGet(&mut d, dev), "cuda", "cuDeviceGet")?;
                    ck(
                        sys::cuDevicePrimaryCtxRetain(&mut ctx, d),
                        "cuda",
                        "cuDevicePrimaryCtxRetain",
                    )?;
                    ck(sys::cuCtxSetCurrent(ctx), "cuda", "cuCtxSetCurrent")?;
                    ck(
                        sys::cuStreamCreate(&mut stream, 1 /* CU_STREAM_NON_BLOCKING */),
                        "cuda",
                        "cuStreamCreate",
                    )?;
                    sys::cuDeviceGetAttribute(
                        &mut major,
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR,
                        d,
                    );
                    sys::cuDeviceGetAttribute(
                        &mut minor,
                        sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR,
                        d,
                    );
                }
                Ok(DevState {
                    ctx,
                    stream,
                    arch: format!("{major}{minor}"),
                })
            })
            .as_ref()
            .map_err(Error::clone)?;
        // SAFETY: a retained primary context.
        ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuCtxSetCurrent(st.ctx) },
            "cuda",
            "cuCtxSetCurrent",
        )?;
        Ok(st)
    }
}

fn addr(m: Mem) -> sys::CUdeviceptr {
    match m {
        Mem::Host(p) => p as sys::CUdeviceptr,
        Mem::Dev(d) => d,
    }
}

impl Gpu for Driver {
    fn describe(&self) -> String {
        format!(
            "CUDA driver {}.{}, {} device(s)",
            self.version / 1000,
            (self.version % 1000) / 10,
            self.count
        )
    }

    fn simulated(&self) -> bool {
        false
    }

    fn device_count(&self) -> usize {
        self.count
    }

    fn device_of(&self, ptr: DevPtr) -> Result<i32> {
        let mut ord: i32 = -1;
        // SAFETY: out-pointer to a local int (the attribute's type).
        let r = unsafe {
            sys::cuPointerGetAttribute(
                (&mut ord as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        };
        ck(
            r,
            "cuda",
            "finding the device of a pointer (cuPointerGetAttribute)",
        )?;
        Ok(ord)
    }

    fn stream(&self, dev: i32) -> Result<u64> {
        Ok(self.enter(dev)?.stream as u64)
    }

    fn alloc(&self, dev: i32, len: usize) -> Result<DevPtr> {
        self.enter(dev)?;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: out-pointer to a local.
        ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuMemAlloc_v2(&mut p, len.max(1)) },
            "cuda",
            &format!("allocating {len} bytes on CUDA device {dev}"),
        )?;
        Ok(p)
    }

    unsafe fn free(&self, dev: i32, ptr: DevPtr) {
        if self.enter(dev).is_ok() {
            // SAFETY: the caller's contract.
            unsafe { sys::cuMemFree_v2(ptr) };
        }
    }

    fn host_alloc(&self, len: usize) -> Result<*mut u8> {
        self.enter(0)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: out-pointer; PORTABLE: pinned for every context.
        ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE) },
            "cuda",
            &format!("allocating {len} bytes of pinned host memory"),
        )?;
        Ok(p.cast())
    }

    unsafe fn host_free(&self, p: *mut u8, _len: usize) {
        // SAFETY: the caller's contract.
        unsafe { sys::cuMemFreeHost(p.cast()) };
    }

    unsafe fn copy(&self, dev: i32, dst: Mem, src: Mem, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let st = self.enter(dev)?;
        // SAFETY: the caller's contract; unified addressing makes every direction one call.
        ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuMemcpyAsync(addr(dst), addr(src), len, st.stream) },
            "cuda",
            "cuMemcpyAsync",
        )
    }

    fn record(&self, dev: i32, interprocess: bool) -> Result<Event> {
        let st = self.enter(dev)?;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let flags = 2 /* DISABLE_TIMING */ | if interprocess { 4 } else { 0 };
        // SAFETY: out-pointer; the stream belongs to the current context.
        unsafe {
            ck(sys::cuEventCreate(&mut ev, flags), "cuda", "cuEventCreate")?;
            if let Err(e) = ck(sys::cuEventRecord(ev, st.stream), "cuda", "cuEventRecord") {
                sys::cuEventDestroy_v2(ev);
                return Err(e);
            }
        }
        Ok(Event {
            raw: ev as u64,
            dev,
        })
    }

    fn wait_event(&self, ev: Event, deadline: Deadline) -> Result<()> {
        let raw = ev.raw as sys::CUevent;
        let r = (|| {
            self.enter(ev.dev)?;
            let mut step = 0u32;
            loop {
                // SAFETY: an event we created.
                match unsafe { sys::cuEventQuery(raw) } {
                    sys::CUresult::CUDA_SUCCESS => return Ok(()),
                    sys::CUresult::CUDA_ERROR_NOT_READY => {
                        deadline.slice("cuda", "a GPU copy to finish")?;
                        relax(&mut step);
                    }
                    r => return ck(r, "cuda", "waiting for a GPU copy (cuEventQuery)"),
                }
            }
        })();
        // SAFETY: created by record(); destroyed once (destroy of a pending event is deferred).
        unsafe { sys::cuEventDestroy_v2(raw) };
        r
    }

    fn release_event(&self, ev: Event) {
        self.own_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, e| *e != ev.raw);
        if self.enter(ev.dev).is_ok() {
            // SAFETY: created by record(); destroyed once (the driver defers a pending one).
            unsafe { sys::cuEventDestroy_v2(ev.raw as sys::CUevent) };
        }
    }

    fn sync(&self, dev: i32, deadline: Deadline) -> Result<()> {
        let st = self.enter(dev)?;
        let mut step = 0u32;
        loop {
            // SAFETY: our stream.
            match unsafe { sys::cuStreamQuery(st.stream) } {
                sys::CUresult::CUDA_SUCCESS => return Ok(()),
                sys::CUresult::CUDA_ERROR_NOT_READY => {
                    deadline.slice("cuda", "the GPU stream to finish")?;
                    relax(&mut step);
                }
                r => return ck(r, "cuda", "waiting for the GPU stream (cuStreamQuery)"),
            }
        }
    }

    fn ipc_export(&self, dev: i32, ptr: DevPtr, len: usize) -> Result<(IpcRecord, Event)> {
        self.enter(dev)?;
        let mut base: sys::CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: out-pointers to locals.
        ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) },
            "cuda",
            "finding the allocation of a tensor (cuMemGetAddressRange)",
        )?;
        let offset = ptr - base;
        if offset + len as u64 > size as u64 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "send",
                format!(
                    "a CUDA tensor of {len} bytes at offset {offset} overruns its allocation of {size} bytes"
                ),
            ));
        }
        // SAFETY: zeroed handles are valid out-values for the driver to fill.
        let mut mh: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
        // SAFETY: `base` is the start of a device allocation.
        ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuIpcGetMemHandle(&mut mh, base) },
            "cuda",
            "exporting a CUDA allocation (cuIpcGetMemHandle; memory from cudaMallocAsync pools or virtual memory management cannot be shared: set PARALLEL_CUDA_IPC=0)",
        )?;
        let ev = self.record(dev, true)?;
        // SAFETY: as above.
        let mut eh: sys::CUipcEventHandle = unsafe { std::mem::zeroed() };
        // SAFETY: an interprocess event we created.
        if let Err(e) = ck(
            // SAFETY: out-pointers to locals / handles owned by this backend.
            unsafe { sys::cuIpcGetEventHandle(&mut eh, ev.raw as sys::CUevent) },
            "cuda",
            "cuIpcGetEventHandle",
        ) {
            // SAFETY: ours.
            unsafe { sys::cuEventDestroy_v2(ev.raw as sys::CUevent) };
            return Err(e);
        }
        let mut rec = IpcRecord {
            mem: [0; 64],
            event: [0; 64],
            offset,
            len: len as u64,
        };
        for i in 0..64 {
            rec.mem[i] = mh.reserved[i] as u8;
            rec.event[i] = eh.reserved[i] as u8;
        }
        self.own_mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.mem, base);
        self.own_events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.event, ev.raw);
        Ok((rec, ev))
    }

    fn ipc_import(&self, dev: i32, rec: &IpcRecord) -> Result<DevPtr> {
        let st = self.enter(dev)?;
        // A peer in this same process (threads, or a tree with several ranks here).
        let own_base = self
            .own_mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&rec.mem)
            .copied();
        if let Some(base) = own_base {
            let ev = self
                .own_events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&rec.event)
                .copied();
            if let Some(ev) = ev {
                ck(
                    // SAFETY: our own event, alive until the exporter's send returns (after our
                    // ack).
                    unsafe { sys::cuStreamWaitEvent(st.stream, ev as sys::CUevent, 0) },
                    "recv",
                    "cuStreamWaitEvent",
                )?;
            }
            return Ok(base + rec.offset);
        }
        let base = {
            let mut cache = self.ipc.lock().unwrap_or_else(|p| p.into_inner());
            match cache.get(&(dev, rec.mem)) {
                Some(b) => *b,
                None => {
                    // SAFETY: zeroed then filled from the record.
                    let mut mh: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
                    for i in 0..64 {
                        mh.reserved[i] = rec.mem[i] as std::ffi::c_char;
                    }
                    let mut b: sys::CUdeviceptr = 0;
                    // SAFETY: out-pointer; a handle from a peer (the driver validates it).
                    ck(
                        // SAFETY: out-pointers to locals / handles owned by this backend.
                        unsafe { sys::cuIpcOpenMemHandle_v2(&mut b, mh, 1) },
                        "recv",
                        "opening a peer's CUDA memory (cuIpcOpenMemHandle; set PARALLEL_CUDA_IPC=0 to stage through host memory instead)",
                    )?;
                    if cache.len() >= 4096 {
                        tracing::warn!(
                            "{} CUDA IPC mappings are open in this process",
                            cache.len()
                        );
                    }
                    cache.insert((dev, rec.mem), b);
                    b
                }
            }
        };
        // SAFETY: zeroed then filled from the record.
        let mut eh: sys::CUipcEventHandle = unsafe { std::mem::zeroed() };
        for i in 0..64 {
            eh.reserved[i] = rec.event[i] as std::ffi::c_char;
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: out-pointer; the peer's event handle; our stream waits on it, then it is
        // released (the wait is already enqueued).
        unsafe {
            ck(
                sys::cuIpcOpenEventHandle(&mut ev, eh),
                "recv",
                "opening a peer's CUDA event (cuIpcOpenEventHandle)",
            )?;
            let r = sys::cuStreamWaitEvent(st.stream, ev, 0);
            sys::cuEventDestroy_v2(ev);
            ck(r, "recv", "cuStreamWaitEvent")?;
        }
        Ok(base + rec.offset)
    }

    fn kernel(&self, dev: i32, name: &str, source: &dyn Fn() -> String) -> Result<Kernel> {
        let st = self.enter(dev)?;
        let mut ks = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, f)) = ks.get(&(dev, name.to_string())) {
            return Ok(Kernel { func: *f, dev });
        }
        // A CUBIN for this device first (no JIT; loads on an older driver of the same major
        // version), PTX when this NVRTC does not know the device's architecture.
        let src = source();
        let ptx = super::nvrtc::compile(
            &src,
            name,
            vec![format!("--gpu-architecture=sm_{}", st.arch)],
        )
        .or_else(|e| {
            tracing::debug!("{e}; compiling {name} to PTX instead");
            super::nvrtc::compile(
                &src,
                name,
                vec![format!("--gpu-architecture=compute_{}", st.arch)],
            )
        })?;
        let image = ptx;
        let mut m: sys::CUmodule = std::ptr::null_mut();
        let mut f: sys::CUfunction = std::ptr::null_mut();
        let cname = CString::new(name)
            .map_err(|_| Error::new(ErrorKind::Config, "cuda", "kernel name with a NUL byte"))?;
        // SAFETY: NUL-terminated PTX; out-pointers.
        unsafe {
            ck(
                sys::cuModuleLoadData(&mut m, image.as_ptr().cast()),
                "cuda",
                &format!(
                    "loading kernel {name} (PTX newer than the driver? update the driver or use an older NVRTC via PARALLEL_NVRTC_LIB)"
                ),
            )?;
            ck(
                sys::cuModuleGetFunction(&mut f, m, cname.as_ptr()),
                "cuda",
                &format!("finding kernel {name}"),
            )?;
        }
        ks.insert((dev, name.to_string()), (Module(m), f as u64));
        Ok(Kernel {
            func: f as u64,
            dev,
        })
    }

    unsafe fn launch(&self, k: Kernel, n: usize, args: &mut [*mut c_void]) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        let st = self.enter(k.dev)?;
        let block: u32 = 256;
        let blocks = n.div_ceil(block as usize).min(65535 * 8) as u32;
        // SAFETY: the caller's contract (kernels loop with a grid stride over n).
        ck(
            unsafe {
                sys::cuLaunchKernel(
                    k.func as sys::CUfunction,
                    blocks,
                    1,
                    1,
                    block,
                    1,
                    1,
                    0,
                    st.stream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            "cuda",
            "cuLaunchKernel",
        )
    }
}

//! The real backend: the CUDA driver API through cudarc (dynamic loading).
//!
//! Every call makes the device's primary context current on the calling thread for its duration
//! and restores the thread's previous context afterwards ([`Entered`]): torch's notion of the
//! current device (taken from the current context) is left as the caller had it.
//!
//! Over 600 lines on purpose: most of it is the one `impl Gpu for Driver` block (a trait impl
//! cannot be split across files), each method a short `unsafe` driver call with its SAFETY note.

use super::{DevPtr, Event, Gpu, IpcRecord, Kernel, Mem};
use crate::config::config;
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

/// Whether libcuda can be loaded (without initialising CUDA).
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

/// A failed driver call: `Resource`, so a collective that meets it aborts on every rank.
fn ck(r: sys::CUresult, op: &'static str, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    Err(Error::new(
        ErrorKind::Resource,
        op,
        format!("{what} failed: {}", name_of(r)),
    ))
}

struct DevState {
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    /// Compute capability as digits ("90").
    arch: String,
}

// SAFETY: a CUDA context and stream may be used from any thread (the driver is thread-safe).
unsafe impl Send for DevState {}
// SAFETY: as above.
unsafe impl Sync for DevState {}

/// A device's context made current for the length of one call; the previous one comes back.
struct Entered<'a> {
    st: &'a DevState,
    prev: sys::CUcontext,
}

impl std::ops::Deref for Entered<'_> {
    type Target = DevState;
    fn deref(&self) -> &DevState {
        self.st
    }
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        if self.prev != self.st.ctx {
            // SAFETY: restores the context that was current (possibly none) on this thread.
            unsafe { sys::cuCtxSetCurrent(self.prev) };
        }
    }
}

struct Module(#[allow(dead_code)] sys::CUmodule);
// SAFETY: a loaded module is a driver object usable from any thread.
unsafe impl Send for Module {}

/// A peer's allocation mapped by CUDA IPC.
struct Mapping {
    base: DevPtr,
    size: u64,
    /// The context it was opened in (closed there).
    dev: i32,
    /// Copies in progress from it.
    users: usize,
    last_use: u64,
}

#[derive(Default)]
struct IpcState {
    /// Peer allocations by handle (`PARALLEL_CUDA_IPC_CACHE` kept once unused).
    open: HashMap<[u8; 64], Mapping>,
    tick: u64,
    /// Our own exports (a process cannot open its own handles): handle -> (base, exports in
    /// flight), and event handle -> event (alive until the exporter's send returns).
    own_mem: HashMap<[u8; 64], (DevPtr, u64, usize)>,
    own_events: HashMap<[u8; 64], (u64, [u8; 64])>,
}

pub(super) struct Driver {
    version: i32,
    count: usize,
    devs: Vec<OnceLock<std::result::Result<DevState, Error>>>,
    ipc: Mutex<IpcState>,
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
            ipc: Mutex::new(IpcState::default()),
            kernels: Mutex::new(HashMap::new()),
        })
    }

    fn ipc_state(&self) -> std::sync::MutexGuard<'_, IpcState> {
        self.ipc.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `dev`'s primary context current on this thread until the guard drops.
    fn enter(&self, dev: i32) -> Result<Entered<'_>> {
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
        let mut prev: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: out-pointer to a local.
        unsafe { sys::cuCtxGetCurrent(&mut prev) };
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
            .map_err(|e| {
                // A first use that failed half way may have left its context current.
                // SAFETY: restores the context that was current (possibly none).
                unsafe { sys::cuCtxSetCurrent(prev) };
                e.clone()
            })?;
        let guard = Entered { st, prev };
        if prev != st.ctx {
            ck(
                // SAFETY: a retained primary context.
                unsafe { sys::cuCtxSetCurrent(st.ctx) },
                "cuda",
                "cuCtxSetCurrent",
            )?;
        }
        Ok(guard)
    }

    /// Closes a mapping in the context it was opened in.
    fn close_mapping(&self, m: &Mapping) {
        // The guard must live across the call: the mapping is closed in its own context.
        if let Ok(_e) = self.enter(m.dev) {
            // SAFETY: opened by cuIpcOpenMemHandle in this context; no copy uses it (users 0).
            let r = unsafe { sys::cuIpcCloseMemHandle(m.base) };
            if r != sys::CUresult::CUDA_SUCCESS {
                tracing::warn!(
                    "closing a CUDA IPC mapping failed: {} (the peer's memory stays mapped)",
                    name_of(r)
                );
            }
        }
    }
}

fn addr(m: Mem) -> sys::CUdeviceptr {
    match m {
        Mem::Host(p) => p as sys::CUdeviceptr,
        Mem::Dev(d) => d,
    }
}

fn poll(deadline: Deadline, what: &str, mut query: impl FnMut() -> sys::CUresult) -> Result<()> {
    let mut step = 0u32;
    loop {
        match query() {
            sys::CUresult::CUDA_SUCCESS => return Ok(()),
            sys::CUresult::CUDA_ERROR_NOT_READY => {
                deadline.slice("cuda", what)?;
                relax(&mut step);
            }
            r => return ck(r, "cuda", &format!("waiting for {what}")),
        }
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

    fn pci_bus_id(&self, dev: i32) -> Result<String> {
        let _e = self.enter(dev)?;
        let mut d: sys::CUdevice = 0;
        let mut buf = [0 as std::ffi::c_char; 32];
        // SAFETY: out-pointers; the buffer's length is passed.
        unsafe {
            ck(sys::cuDeviceGet(&mut d, dev), "cuda", "cuDeviceGet")?;
            ck(
                sys::cuDeviceGetPCIBusId(buf.as_mut_ptr(), buf.len() as i32, d),
                "cuda",
                "cuDeviceGetPCIBusId",
            )?;
        }
        // SAFETY: the driver wrote a NUL-terminated string into the buffer.
        Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned())
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
        let _e = self.enter(dev)?;
        let mut p: sys::CUdeviceptr = 0;
        ck(
            // SAFETY: out-pointer to a local.
            unsafe { sys::cuMemAlloc_v2(&mut p, len.max(1)) },
            "cuda",
            &format!("allocating {len} bytes on CUDA device {dev}"),
        )?;
        Ok(p)
    }

    unsafe fn free(&self, dev: i32, ptr: DevPtr) {
        if let Ok(_e) = self.enter(dev) {
            // SAFETY: the caller's contract.
            unsafe { sys::cuMemFree_v2(ptr) };
        }
    }

    fn host_alloc(&self, len: usize) -> Result<*mut u8> {
        let _e = self.enter(0)?;
        let mut p: *mut c_void = std::ptr::null_mut();
        ck(
            // SAFETY: out-pointer; PORTABLE: pinned for every context.
            unsafe { sys::cuMemHostAlloc(&mut p, len, sys::CU_MEMHOSTALLOC_PORTABLE) },
            "cuda",
            &format!("allocating {len} bytes of pinned host memory"),
        )?;
        Ok(p.cast())
    }

    unsafe fn host_free(&self, p: *mut u8, _len: usize) {
        if let Ok(_e) = self.enter(0) {
            // SAFETY: the caller's contract.
            unsafe { sys::cuMemFreeHost(p.cast()) };
        }
    }

    unsafe fn copy(&self, dev: i32, dst: Mem, src: Mem, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let st = self.enter(dev)?;
        ck(
            // SAFETY: the caller's contract; unified addressing makes every direction one call.
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
        let r = self.enter(ev.dev).and_then(|_e| {
            // SAFETY: an event we created.
            poll(deadline, "a GPU copy to finish", || unsafe {
                sys::cuEventQuery(raw)
            })
        });
        // SAFETY: created by record(); destroyed once (destroy of a pending event is deferred).
        unsafe { sys::cuEventDestroy_v2(raw) };
        r
    }

    fn release_event(&self, ev: Event) {
        {
            let mut s = self.ipc_state();
            let mine: Vec<[u8; 64]> = s
                .own_events
                .iter()
                .filter(|(_, (e, _))| *e == ev.raw)
                .map(|(h, _)| *h)
                .collect();
            for h in mine {
                if let Some((_, mem)) = s.own_events.remove(&h)
                    && let Some(entry) = s.own_mem.get_mut(&mem)
                {
                    entry.2 = entry.2.saturating_sub(1);
                    if entry.2 == 0 {
                        s.own_mem.remove(&mem);
                    }
                }
            }
        }
        if let Ok(_e) = self.enter(ev.dev) {
            // SAFETY: created by record(); destroyed once (the driver defers a pending one).
            unsafe { sys::cuEventDestroy_v2(ev.raw as sys::CUevent) };
        }
    }

    fn sync(&self, dev: i32, deadline: Deadline) -> Result<()> {
        let st = self.enter(dev)?;
        // SAFETY: our stream.
        poll(deadline, "the GPU stream to finish", || unsafe {
            sys::cuStreamQuery(st.stream)
        })
    }

    fn drain(&self, dev: i32) {
        if let Ok(st) = self.enter(dev) {
            // SAFETY: our stream; blocks until its work is done (no interrupt, no deadline: used
            // on error paths so no copy is left writing memory that is about to be reused).
            unsafe { sys::cuStreamSynchronize(st.stream) };
        }
    }

    fn ipc_export(&self, dev: i32, ptr: DevPtr, len: usize) -> Result<(IpcRecord, Event)> {
        let _e = self.enter(dev)?;
        let mut base: sys::CUdeviceptr = 0;
        let mut size: usize = 0;
        ck(
            // SAFETY: out-pointers to locals.
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
        ck(
            // SAFETY: `base` is the start of a device allocation.
            unsafe { sys::cuIpcGetMemHandle(&mut mh, base) },
            "cuda",
            "exporting a CUDA allocation (cuIpcGetMemHandle; memory from cudaMallocAsync pools or virtual memory management cannot be shared)",
        )?;
        let ev = self.record(dev, true)?;
        // SAFETY: as above.
        let mut eh: sys::CUipcEventHandle = unsafe { std::mem::zeroed() };
        if let Err(e) = ck(
            // SAFETY: an interprocess event we created.
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
        let mut s = self.ipc_state();
        s.own_mem.entry(rec.mem).or_insert((base, size as u64, 0)).2 += 1;
        s.own_events.insert(rec.event, (ev.raw, rec.mem));
        Ok((rec, ev))
    }

    fn ipc_import(&self, dev: i32, rec: &IpcRecord) -> Result<DevPtr> {
        let st = self.enter(dev)?;
        let own = {
            let s = self.ipc_state();
            s.own_mem
                .get(&rec.mem)
                .map(|(b, size, _)| (*b, *size, s.own_events.get(&rec.event).map(|(e, _)| *e)))
        };
        // A peer in this same process (threads, or a tree with several ranks here).
        if let Some((base, size, ev)) = own {
            if rec.offset.checked_add(rec.len).is_none_or(|e| e > size) {
                return Err(overrun(rec, size));
            }
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
            let mut s = self.ipc_state();
            s.tick += 1;
            let tick = s.tick;
            match s.open.get_mut(&rec.mem) {
                Some(m) => {
                    m.users += 1;
                    m.last_use = tick;
                    if rec.offset.checked_add(rec.len).is_none_or(|e| e > m.size) {
                        m.users -= 1;
                        return Err(overrun(rec, m.size));
                    }
                    m.base
                }
                None => {
                    // SAFETY: zeroed then filled from the record.
                    let mut mh: sys::CUipcMemHandle = unsafe { std::mem::zeroed() };
                    for i in 0..64 {
                        mh.reserved[i] = rec.mem[i] as std::ffi::c_char;
                    }
                    let mut b: sys::CUdeviceptr = 0;
                    ck(
                        // SAFETY: out-pointer; a handle from a peer (the driver validates it).
                        unsafe { sys::cuIpcOpenMemHandle_v2(&mut b, mh, 1) },
                        "recv",
                        "opening a peer's CUDA memory (cuIpcOpenMemHandle; set PARALLEL_CUDA_IPC=0 to stage through host memory instead)",
                    )?;
                    let (mut b2, mut size) = (0 as sys::CUdeviceptr, 0usize);
                    // SAFETY: out-pointers; `b` is the mapping just opened.
                    unsafe { sys::cuMemGetAddressRange_v2(&mut b2, &mut size, b) };
                    let m = Mapping {
                        base: b,
                        size: size as u64,
                        dev,
                        users: 1,
                        last_use: tick,
                    };
                    // A peer naming bytes outside its allocation would make the copy fault,
                    // which poisons every CUDA context of the process: refuse it here.
                    if rec.offset.checked_add(rec.len).is_none_or(|e| e > m.size) {
                        let e = overrun(rec, m.size);
                        drop(s);
                        self.close_mapping(&m);
                        return Err(e);
                    }
                    s.open.insert(rec.mem, m);
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
        // SAFETY: out-pointer; the peer's event handle; our stream waits on it, then our copy of
        // the event is released (the wait is already enqueued).
        let r = unsafe {
            ck(
                sys::cuIpcOpenEventHandle(&mut ev, eh),
                "recv",
                "opening a peer's CUDA event (cuIpcOpenEventHandle)",
            )
            .and_then(|_| {
                let r = sys::cuStreamWaitEvent(st.stream, ev, 0);
                sys::cuEventDestroy_v2(ev);
                ck(r, "recv", "cuStreamWaitEvent")
            })
        };
        if let Err(e) = r {
            self.ipc_done(rec);
            return Err(e);
        }
        Ok(base + rec.offset)
    }

    fn ipc_done(&self, rec: &IpcRecord) {
        let cap = config().cuda_ipc_cache;
        let mut closing = Vec::new();
        {
            let mut s = self.ipc_state();
            if let Some(m) = s.open.get_mut(&rec.mem) {
                m.users = m.users.saturating_sub(1);
            }
            // Keep at most `cap` idle mappings, closing the least recently used.
            loop {
                let idle: Vec<([u8; 64], u64)> = s
                    .open
                    .iter()
                    .filter(|(_, m)| m.users == 0)
                    .map(|(h, m)| (*h, m.last_use))
                    .collect();
                if idle.len() <= cap {
                    break;
                }
                let oldest = idle.iter().min_by_key(|(_, t)| *t).expect("non-empty").0;
                if let Some(m) = s.open.remove(&oldest) {
                    closing.push(m);
                }
            }
        }
        for m in closing {
            self.close_mapping(&m);
        }
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
        let image = super::nvrtc::compile(
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
        let mut m: sys::CUmodule = std::ptr::null_mut();
        let mut f: sys::CUfunction = std::ptr::null_mut();
        let cname = CString::new(name)
            .map_err(|_| Error::new(ErrorKind::Config, "cuda", "kernel name with a NUL byte"))?;
        // SAFETY: a CUBIN or NUL-terminated PTX image; out-pointers.
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
        ck(
            // SAFETY: the caller's contract (kernels loop with a grid stride over n).
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

fn overrun(rec: &IpcRecord, size: u64) -> Error {
    Error::new(
        ErrorKind::Protocol,
        "recv",
        format!(
            "a CUDA IPC record names {} bytes at offset {} of a {size}-byte allocation",
            rec.len, rec.offset
        ),
    )
}

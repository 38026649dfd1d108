//! The real CUDA driver backend (engine/src/cuda/driver.rs) against a fake libcuda
//! (tests/fake_cuda/libcuda.c, compiled here with `cc`), so its driver calls run in CI without a
//! GPU: argument passing, the caller's current context kept (driver.rs's `Entered`), IPC export,
//! import and close (CUDA-3: base plus offset), bounds checks, events and the staging pipeline.
//!
//! `dlopen` reads LD_LIBRARY_PATH once, at process start: each test re-runs this binary
//! (`--exact <test>`) with the fake's directory in LD_LIBRARY_PATH and does its work in that
//! child; the cross-process test's child spawns a grandchild the same way. The simulator is never
//! selected here, so the engine must choose the driver backend.
//!
//! The fake counts open IPC mappings, live events, allocations and pinned buffers, context
//! switches, and every misuse the real driver would reject (a call without a context, a stream of
//! another device, a copy past an allocation, a handle of one's own process, a double destroy);
//! the tests read the counters through `dlsym`. With `PARALLEL_CUDA_IPC_CACHE=0` (set for the
//! children) every mapping must be closed once its copy is done. Skipped when `cc` is missing.

use parallel_engine::config::config;
use parallel_engine::cuda::{self, DeviceAlloc, IpcRecord, Mem};
use parallel_engine::value::{DType, Device, Tensor, Value};
use parallel_engine::{Client, ErrorKind, Server};
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Names the test a child process runs (or `<test>/sender` for the grandchild).
const ROLE: &str = "PARALLEL_TEST_FAKE_CUDA";
/// The port the grandchild connects to.
const PORT: &str = "PARALLEL_TEST_FAKE_CUDA_PORT";
/// What the fake reports (see libcuda.c).
const PCI_IDS: [&str; 2] = ["0000:1a:00.0", "0000:3d:00.0"];
const DESCRIBE: &str = "CUDA driver 12.34, 2 device(s)";

fn t(secs: f64) -> Option<Duration> {
    Some(Duration::from_secs_f64(secs))
}

#[allow(clippy::disallowed_methods)] // the process's role comes from its environment
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

// ---- the fake library and its process ---------------------------------------------------------

/// Compiles the fake once per test process; `None` (with the reason printed) without `cc`.
#[allow(clippy::print_stderr)] // why the test is skipped
fn fake_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fake_cuda/libcuda.c");
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake_cuda");
        std::fs::create_dir_all(&dir).unwrap();
        // Built under a private name, then renamed: concurrent runs never see half a library.
        let tmp = dir.join(format!("libcuda.so.1.{}", std::process::id()));
        let out = match Command::new("cc")
            .args([
                "-shared",
                "-fPIC",
                "-O1",
                "-Wall",
                "-Wl,-soname,libcuda.so.1",
                "-o",
            ])
            .arg(&tmp)
            .arg(src)
            .output()
        {
            Ok(o) => o,
            Err(e) => {
                eprintln!("skipped: no C compiler to build the fake libcuda (cc: {e})");
                return None;
            }
        };
        assert!(
            out.status.success(),
            "building the fake libcuda failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, dir.join("libcuda.so.1")).unwrap();
        // cudarc opens "libcuda.so" first: the same file, found before any real driver.
        match std::os::unix::fs::symlink("libcuda.so.1", dir.join("libcuda.so")) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("symlink: {e}"),
            _ => {}
        }
        Some(dir)
    })
    .clone()
}

/// Runs `body` in a child process of this binary that loads the fake driver (this is the child
/// when its role says so).
fn under_fake_driver(test: &str, body: fn()) {
    if env(ROLE).as_deref() == Some(test) {
        body();
        return;
    }
    let Some(dir) = fake_dir() else { return };
    let mut path = dir.into_os_string();
    #[allow(clippy::disallowed_methods)] // the loader's path, extended for the child
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    let st = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test, "--nocapture"])
        .env("LD_LIBRARY_PATH", path)
        .env(ROLE, test)
        .env("PARALLEL_CUDA", "1")
        .env("PARALLEL_CUDA_IPC_CACHE", "0")
        .status()
        .unwrap();
    assert!(st.success(), "{test} under the fake libcuda: {st}");
}

/// A symbol of the loaded driver library, which must be the fake.
fn sym(name: &str) -> *mut c_void {
    static LIB: OnceLock<usize> = OnceLock::new();
    let lib = *LIB.get_or_init(|| {
        let g = cuda::cuda().unwrap_or_else(|| panic!("no CUDA: {}", cuda::unavailable_reason()));
        assert!(!g.simulated(), "the simulator was chosen");
        // SAFETY: a NUL-terminated name; NOLOAD only finds the library the engine loaded.
        let h =
            unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
        assert!(!h.is_null(), "libcuda.so.1 is not loaded");
        h as usize
    });
    let c = CString::new(name).unwrap();
    // SAFETY: a live library handle and a NUL-terminated name.
    let p = unsafe { libc::dlsym(lib as *mut c_void, c.as_ptr()) };
    assert!(
        !p.is_null(),
        "{name} missing: the loaded libcuda is not the fake"
    );
    p
}

/// A counter of the fake (`fake_cuda_<name>`).
fn count(name: &str) -> i32 {
    let f = sym(&format!("fake_cuda_{name}"));
    // SAFETY: the fake's counters are `int f(void)`.
    unsafe { std::mem::transmute::<*mut c_void, extern "C" fn() -> i32>(f)() }
}

/// This thread's current context (the fake's `cuCtxGetCurrent`).
fn current_ctx() -> usize {
    let f = sym("cuCtxGetCurrent");
    let mut c: *mut c_void = std::ptr::null_mut();
    // SAFETY: cuCtxGetCurrent(CUcontext *); an out-pointer to a local.
    let r = unsafe {
        std::mem::transmute::<*mut c_void, extern "C" fn(*mut *mut c_void) -> i32>(f)(&mut c)
    };
    assert_eq!(r, 0);
    c as usize
}

fn set_ctx(c: usize) {
    let f = sym("cuCtxSetCurrent");
    // SAFETY: cuCtxSetCurrent(CUcontext); a primary context of the fake or null.
    let r = unsafe {
        std::mem::transmute::<*mut c_void, extern "C" fn(*mut c_void) -> i32>(f)(c as *mut c_void)
    };
    assert_eq!(r, 0);
}

/// The primary context of `dev` (the engine's).
fn primary_ctx(dev: i32) -> usize {
    let f = sym("cuDevicePrimaryCtxRetain");
    let mut c: *mut c_void = std::ptr::null_mut();
    // SAFETY: cuDevicePrimaryCtxRetain(CUcontext *, CUdevice); an out-pointer to a local.
    let r = unsafe {
        std::mem::transmute::<*mut c_void, extern "C" fn(*mut *mut c_void, i32) -> i32>(f)(
            &mut c, dev,
        )
    };
    assert_eq!(r, 0);
    c as usize
}

/// Runs `f` with `ctx` current on this thread and checks the engine left it so.
fn keeping_context<R>(ctx: usize, what: &str, f: impl FnOnce() -> R) -> R {
    set_ctx(ctx);
    let r = f();
    assert_eq!(
        current_ctx(),
        ctx,
        "{what}: the thread's current context changed"
    );
    r
}

/// Nothing leaked or misused so far.
fn clean(what: &str) {
    assert_eq!(
        count("misuses"),
        0,
        "{what}: driver misuse (stderr says which)"
    );
    assert_eq!(count("open_mappings"), 0, "{what}: IPC mappings left open");
    assert_eq!(count("live_events"), 0, "{what}: events not destroyed");
}

/// Pinned staging buffers are per thread, freed when it exits: none left once every thread
/// that staged was joined (a scope's implicit join may return before thread-local destructors).
fn no_pinned_left(what: &str) {
    assert_eq!(
        count("live_host_allocs"),
        0,
        "{what}: pinned buffers not freed"
    );
}

// ---- tensors ----------------------------------------------------------------------------------

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

/// Device memory of `len` bytes holding `bytes` from `offset` (the rest stays as allocated).
fn dev_alloc(dev: i32, len: usize, bytes: &[u8], offset: usize) -> Arc<DeviceAlloc> {
    let a = Arc::new(DeviceAlloc::new(dev, len).unwrap());
    assert!(offset + bytes.len() <= len);
    // SAFETY: inside our allocation.
    unsafe {
        cuda::copy_sync(
            dev,
            Mem::Dev(a.ptr + offset as u64),
            Mem::Host(bytes.as_ptr() as *mut u8),
            bytes.len(),
        )
    }
    .unwrap();
    a
}

/// A u8 CUDA tensor viewing `len` bytes at `offset` of `a` (kept alive by the tensor).
fn view(a: &Arc<DeviceAlloc>, offset: usize, len: usize) -> Tensor {
    assert!(offset + len <= a.len.max(1));
    // SAFETY: the view lies inside `a`, which the tensor keeps.
    unsafe {
        Tensor::from_raw(
            DType::U8,
            vec![len],
            None,
            Device::Cuda(a.dev),
            (a.ptr + offset as u64) as *mut u8,
            len,
            a.clone(),
        )
    }
}

fn read_dev(dev: i32, ptr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    // SAFETY: `len` device bytes at `ptr` (the caller's), into a buffer of the same size.
    unsafe { cuda::copy_sync(dev, Mem::Host(v.as_mut_ptr()), Mem::Dev(ptr), len) }.unwrap();
    v
}

fn read_back(t: &Tensor) -> Vec<u8> {
    match t.device() {
        Device::Cuda(d) => read_dev(d, t.data_ptr() as u64, t.nbytes()),
        Device::Cpu => t.bytes().unwrap().to_vec(),
    }
}

fn ipc_expected() -> bool {
    config().shm && config().cuda_ipc
}

/// Whether a message with `len` device bytes goes by CUDA IPC on this run's links.
fn by_ipc(len: usize) -> bool {
    ipc_expected() && len as u64 >= config().cuda_ipc_threshold
}

fn pair() -> (Server, Client) {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let c = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    s.wait_for(1, t(10.0)).unwrap();
    (s, c)
}

// ---- in one process ---------------------------------------------------------------------------

#[test]
fn the_driver_backend_runs_on_the_fake() {
    under_fake_driver("the_driver_backend_runs_on_the_fake", || {
        let g = cuda::cuda().unwrap_or_else(|| panic!("{}", cuda::unavailable_reason()));
        assert!(!g.simulated());
        assert_eq!(g.describe(), DESCRIBE);
        assert_eq!(g.device_count(), 2);
        let ids = keeping_context(0, "gpu_ids", cuda::gpu_ids);
        assert_eq!(ids, PCI_IDS);
        // Allocations land on the device asked for, whatever context the caller has current.
        let ctx1 = primary_ctx(1);
        let (a0, a1) = keeping_context(ctx1, "alloc", || {
            (
                dev_alloc(0, 8192, &[1; 10], 0),
                dev_alloc(1, 100, &[2; 10], 0),
            )
        });
        assert_eq!(count("live_allocs"), 2);
        assert_eq!(g.device_of(a0.ptr + 8191).unwrap(), 0);
        assert_eq!(g.device_of(a1.ptr).unwrap(), 1);
        let host = [0u8; 16];
        assert!(g.device_of(host.as_ptr() as u64).is_err());
        // The device's context already current: no switch at all.
        let ctx0 = primary_ctx(0);
        set_ctx(ctx0);
        let before = count("ctx_switches");
        keeping_context(ctx0, "copy", || {
            assert_eq!(read_dev(0, a0.ptr, 10), [1; 10])
        });
        assert_eq!(
            count("ctx_switches"),
            before + 1,
            "only the test's own switch"
        );
        // Exports name the allocation and the offset (CUDA-3); overruns are refused.
        let (rec, ev) =
            keeping_context(0, "export", || g.ipc_export(0, a0.ptr + 100, 8092)).unwrap();
        assert_eq!((rec.offset, rec.len), (100, 8092));
        g.release_event(ev);
        let e = g.ipc_export(0, a0.ptr + 100, 8093).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
        assert!(g.ipc_export(0, host.as_ptr() as u64, 8).is_err());
        assert_eq!(count("ipc_exports"), 1);
        // A handle of this same process maps to our own memory (the driver would refuse it).
        let (rec, ev) = g.ipc_export(1, a1.ptr + 3, 7).unwrap();
        assert_eq!(g.ipc_import(0, &rec).unwrap(), a1.ptr + 3);
        g.ipc_done(&rec);
        g.release_event(ev);
        drop((a0, a1));
        assert_eq!(count("live_allocs"), 0);
        clean("driver calls");
    });
}

#[test]
fn cuda_tensors_between_threads() {
    under_fake_driver("cuda_tensors_between_threads", || {
        let (s, c) = pair();
        assert_eq!(c.conn().link().cuda_ipc(), ipc_expected());
        let conn = s.connections().pop().unwrap();
        // Empty, one element, odd, IPC-sized, more chunks than staging buffers.
        let sizes = [0usize, 4, 4 * 1001, 2 << 20, 20 << 20];
        let ctx1 = primary_ctx(1);
        for (k, n) in sizes.into_iter().enumerate() {
            let data = pattern(n, k as u8);
            let dev = (k % 2) as i32;
            let off = 4096 + 4 * k;
            let a = dev_alloc(dev, off + n + 64, &data, off);
            let x = view(&a, off, n);
            let exports = count("ipc_exports");
            let v = Value::List(vec![Value::Int(k as i64), Value::Tensor(x)]);
            let (got, sent) = std::thread::scope(|sc| {
                let r = sc.spawn(|| keeping_context(ctx1, "recv", || conn.recv(t(30.0))));
                let c = &c;
                let w =
                    sc.spawn(move || keeping_context(0, "send", || c.send_timeout(&v, t(30.0))));
                (r.join().unwrap(), w.join().unwrap())
            });
            sent.unwrap();
            let got = got.unwrap();
            let Value::List(items) = &got else {
                panic!("not a list")
            };
            let rt = items[1].as_tensor().unwrap();
            assert_eq!(
                (rt.device(), rt.nbytes()),
                (Device::Cuda(dev), n),
                "size {n}"
            );
            assert!(read_back(rt) == data, "contents of {n} bytes");
            let ipc = by_ipc(n) && n > 0;
            assert_eq!(count("ipc_exports") - exports, ipc as i32, "size {n}");
            // A peer in this process: its own memory, never a mapping.
            assert_eq!(count("ipc_opens"), 0);
            drop(got);
            clean(&format!("size {n}"));
            no_pinned_left(&format!("size {n}"));
            assert_eq!(
                count("live_allocs"),
                1,
                "only the sender's allocation is left"
            );
        }
    });
}

#[test]
fn into_cuda_and_cpu_out_between_threads() {
    under_fake_driver("into_cuda_and_cpu_out_between_threads", || {
        let (s, c) = pair();
        let conn = s.connections().pop().unwrap();
        for n in [4000usize, 3 << 20] {
            let data = pattern(n, 7);
            let src = dev_alloc(1, n + 200, &data, 123);
            // CUDA out on the other device, as a view with guard bytes on both sides.
            let guard = vec![0x11u8; n + 8192];
            let dst = dev_alloc(0, guard.len(), &guard, 0);
            let mut out_dev = view(&dst, 4096, n);
            let mut out_cpu = Tensor::from_bytes(DType::U8, vec![n], vec![0; n]).unwrap();
            for out in [&mut out_dev, &mut out_cpu] {
                let x = view(&src, 123, n);
                let (got, sent) = std::thread::scope(|sc| {
                    let w = sc.spawn(|| c.send_timeout(&Value::Tensor(x), t(30.0)));
                    let r = sc.spawn(|| {
                        keeping_context(primary_ctx(1), "recv_into", || {
                            conn.recv_into(std::slice::from_mut(out), t(30.0))
                        })
                    });
                    (r.join().unwrap(), w.join().unwrap())
                });
                sent.unwrap();
                assert!(matches!(got.unwrap(), Value::Out(0)));
                assert!(read_back(out) == data, "{n} bytes into {:?}", out.device());
            }
            let all = read_dev(0, dst.ptr, guard.len());
            assert!(
                all[..4096]
                    .iter()
                    .chain(&all[4096 + n..])
                    .all(|b| *b == 0x11)
            );
            // CPU -> CUDA out (staged host-to-device copies).
            let inv: Vec<u8> = data.iter().map(|b| !b).collect();
            let cpu = Tensor::from_bytes(DType::U8, vec![n], inv.clone()).unwrap();
            std::thread::scope(|sc| {
                let w = sc.spawn(|| c.send_timeout(&Value::Tensor(cpu), t(30.0)));
                let r = sc.spawn(|| conn.recv_into(std::slice::from_mut(&mut out_dev), t(30.0)));
                r.join().unwrap().unwrap();
                w.join().unwrap().unwrap();
            });
            assert!(read_back(&out_dev) == inv);
            clean(&format!("out= of {n} bytes"));
            no_pinned_left(&format!("out= of {n} bytes"));
        }
    });
}

// ---- across processes -------------------------------------------------------------------------

/// Views the grandchild sends: (device, offset, length) in its 3 MiB allocation per device. The
/// last one ends exactly at its allocation's end.
const VIEWS: [(i32, usize, usize); 5] = [
    (0, 0, 0),
    (0, 0, 100),
    (1, 1000, 4000),
    (0, 5 << 10, 2 << 20),
    (1, 4097, (3 << 20) - 4097),
];
/// The receiving thread's current context for each view: none or a device's primary context
/// (the other device's for the last view).
const RECV_CTX: [Option<i32>; 5] = [None, Some(1), Some(0), None, Some(0)];
const ALLOC: usize = 3 << 20;

fn base_pattern(dev: i32) -> Vec<u8> {
    pattern(ALLOC, 9 + dev as u8)
}

/// The child: receives the grandchild's views (IPC when the link has shared memory), receives
/// into `out=`, imports raw records, and sends one tensor back.
#[test]
fn cuda_tensors_across_processes() {
    const NAME: &str = "cuda_tensors_across_processes";
    if env(ROLE).as_deref() == Some("cuda_tensors_across_processes/sender") {
        return sender();
    }
    under_fake_driver(NAME, || {
        let s = Server::bind("127.0.0.1", 0).unwrap();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture"])
            .env(ROLE, format!("{NAME}/sender"))
            .env(PORT, s.port().to_string())
            .spawn()
            .unwrap();
        s.wait_for(1, t(30.0)).unwrap();
        let conn = s.connections().pop().unwrap();
        assert_eq!(conn.link().cuda_ipc(), ipc_expected());
        let ctx1 = primary_ctx(1);
        let bases = [base_pattern(0), base_pattern(1)];
        // 1. Views at offsets, each received with RECV_CTX current.
        for ((dev, off, len), ctx) in VIEWS.into_iter().zip(RECV_CTX) {
            let opens = count("ipc_opens");
            let ctx = ctx.map_or(0, primary_ctx);
            let got = keeping_context(ctx, "recv", || conn.recv(t(30.0))).unwrap();
            let x = got.as_tensor().unwrap();
            assert_eq!((x.device(), x.nbytes()), (Device::Cuda(dev), len));
            assert!(
                read_back(x) == bases[dev as usize][off..off + len],
                "view of {len} bytes at offset {off} on device {dev}"
            );
            let ipc = by_ipc(len) && len > 0;
            assert_eq!(count("ipc_opens") - opens, ipc as i32, "{len} bytes");
            drop(got);
            clean(&format!("view of {len} bytes at {off}"));
            assert_eq!(count("live_allocs"), 0, "received tensors freed");
        }
        // 2. Into out= (CUDA on another device with guard bytes, CPU), then a wrong shape.
        let (off, len) = (4096usize, 2 << 20);
        let want = &bases[1][off..off + len];
        let guard = vec![0x11u8; len + 8192];
        let dst = dev_alloc(0, guard.len(), &guard, 0);
        let mut out_dev = view(&dst, 4096, len);
        let mut out_cpu = Tensor::from_bytes(DType::U8, vec![len], vec![0; len]).unwrap();
        for out in [&mut out_dev, &mut out_cpu] {
            let v = keeping_context(0, "recv_into", || {
                conn.recv_into(std::slice::from_mut(out), t(30.0))
            });
            assert!(matches!(v.unwrap(), Value::Out(0)));
            assert!(read_back(out) == want, "into {:?}", out.device());
            clean("recv_into");
        }
        let all = read_dev(0, dst.ptr, guard.len());
        assert!(
            all[..4096]
                .iter()
                .chain(&all[4096 + len..])
                .all(|b| *b == 0x11)
        );
        let opens = count("ipc_opens");
        let mut wrong = Tensor::from_bytes(DType::U8, vec![len - 1], vec![0; len - 1]).unwrap();
        let e = conn
            .recv_into(std::slice::from_mut(&mut wrong), t(30.0))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        assert_eq!(count("ipc_opens"), opens, "a refused record is not opened");
        clean("a refused message");
        // 3. Raw records through the backend: the tensor's address, bounds checked, closed.
        let g = cuda::cuda().unwrap();
        let got = conn.recv(t(30.0)).unwrap();
        let Value::Bytes(b) = &got else {
            panic!("not bytes")
        };
        let rec = IpcRecord::decode(b[..].try_into().unwrap());
        assert_eq!((rec.offset, rec.len), (12345, 1000));
        let p = keeping_context(0, "ipc_import", || g.ipc_import(1, &rec)).unwrap();
        assert_eq!(count("open_mappings"), 1);
        assert_eq!(g.device_of(p).unwrap(), 1, "opened in device 1's context");
        assert!(read_dev(1, p, 1000) == bases[0][12345..13345]);
        keeping_context(ctx1, "ipc_done", || g.ipc_done(&rec));
        clean("raw import");
        for (offset, len) in [
            (ALLOC as u64 - 999, 1000),
            (u64::MAX - 10, 1000),
            (0, ALLOC as u64 + 1),
        ] {
            let bad = IpcRecord { offset, len, ..rec };
            let e = g.ipc_import(0, &bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            clean(&format!("a record naming {len} bytes at {offset}"));
        }
        conn.send(&Value::None, t(10.0)).unwrap();
        // 4. The other direction: a view of ours into the grandchild (checked there).
        let mine = pattern(len, 42);
        let a = dev_alloc(0, len + 1000, &mine, 777);
        keeping_context(0, "send", || {
            conn.send(&Value::Tensor(view(&a, 777, len)), t(30.0))
        })
        .unwrap();
        assert!(child.wait().unwrap().success(), "the sender failed");
        drop((a, dst, out_dev));
        clean("the end");
        assert_eq!(count("live_allocs"), 0);
    });
}

/// The grandchild: sends what `cuda_tensors_across_processes` expects, in that order.
fn sender() {
    let port: u16 = env(PORT).unwrap().parse().unwrap();
    let c = Client::connect("127.0.0.1", port, t(10.0)).unwrap();
    let allocs = [0, 1].map(|d| dev_alloc(d, ALLOC, &base_pattern(d), 0));
    for (dev, off, len) in VIEWS {
        let x = view(&allocs[dev as usize], off, len);
        keeping_context(0, "send", || c.send_timeout(&Value::Tensor(x), t(30.0))).unwrap();
    }
    for _ in 0..3 {
        let x = view(&allocs[1], 4096, 2 << 20);
        c.send_timeout(&Value::Tensor(x), t(30.0)).unwrap();
    }
    let g = cuda::cuda().unwrap();
    let (rec, ev) = g.ipc_export(0, allocs[0].ptr + 12345, 1000).unwrap();
    c.send_timeout(&Value::bytes(rec.encode().to_vec()), t(30.0))
        .unwrap();
    // The peer is done with the record: our event may go.
    c.recv(t(30.0)).unwrap();
    g.release_event(ev);
    let back = keeping_context(primary_ctx(1), "recv", || c.recv(t(30.0))).unwrap();
    let x = back.as_tensor().unwrap();
    assert_eq!(x.device(), Device::Cuda(0));
    assert!(read_back(x) == pattern(2 << 20, 42));
    drop(back);
    clean("the sender");
}

//! The ring over device memory through the real driver backend (`engine/src/cuda/driver.rs`),
//! loaded by cudarc from the fake libcuda of `engine/tests/fake_cuda/libcuda.c` (memfd "device
//! memory", IPC through /proc/<pid>/fd, counters of open mappings, live events and misuses the
//! real driver would refuse). The fake runs no kernels, so the all-reduces use a user function
//! (the device memory of the fake is addressable from the host); copies, events, IPC of chunks
//! and staging are the driver backend's own. Ranks are processes (CUDA IPC needs two), this
//! test binary re-run under the fake; skipped without a C compiler.

mod common;

use parallel_collectives::algorithms::Algorithm;
use parallel_collectives::ops::{self, Op};
use parallel_collectives::tree::DeviceReduce;
use parallel_collectives::{Tree, TreeOptions};
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::value::DType;
use std::ffi::{CString, c_void};
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

const ROLE: &str = "PARALLEL_TEST_RING_FAKE_CUDA";

#[allow(clippy::disallowed_methods)] // the process's role comes from its environment
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// The fake libcuda, built once per test run into the target's temporary directory.
#[allow(clippy::print_stderr)] // why the test is skipped
fn fake_dir() -> Option<PathBuf> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        let src = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../engine/tests/fake_cuda/libcuda.c"
        );
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fake_cuda_ring");
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join(format!("libcuda.so.1.{}", std::process::id()));
        let out = match Command::new("cc")
            .args(["-shared", "-fPIC", "-O1", "-Wl,-soname,libcuda.so.1", "-o"])
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
        Some(dir)
    })
    .clone()
}

/// A counter of the fake (`fake_cuda_<name>`), through the library the engine loaded.
fn count(name: &str) -> i32 {
    // SAFETY: a NUL-terminated name; NOLOAD only finds the library the engine loaded.
    let h = unsafe { libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    assert!(!h.is_null(), "libcuda.so.1 is not loaded");
    let c = CString::new(format!("fake_cuda_{name}")).unwrap();
    // SAFETY: a live library handle and a NUL-terminated name.
    let f = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(
        !f.is_null(),
        "{name} missing: the loaded libcuda is not the fake"
    );
    // SAFETY: the fake's counters are `int f(void)`.
    unsafe { std::mem::transmute::<*mut c_void, extern "C" fn() -> i32>(f)() }
}

/// Rank r's element i (small integers: sums are exact).
fn input(r: usize, count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| (((r * 5 + i * 7) % 13) as f32 - 6.0).to_le_bytes())
        .collect()
}

/// A sum on device memory, which the fake lets the host address.
fn host_sum() -> (Op, DeviceReduce) {
    let host: ops::UserReduce = Arc::new(|d, s, dt, _| ops::reduce_into(&Op::Sum, dt, d, s));
    let dev: DeviceReduce = Arc::new(|dst, src, dtype, n, _dev| {
        let len = n * dtype.itemsize();
        // SAFETY: the ring passes two distinct device buffers of n elements; the fake's device
        // memory is mapped in this process.
        let (d, s) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst as *mut u8, len),
                std::slice::from_raw_parts(src as *const u8, len),
            )
        };
        ops::reduce_into(&Op::Sum, dtype, d, s)
    });
    (Op::User(host), dev)
}

/// One rank (a child process): ring all-reduces of device memory with whole-segment chunks (by
/// CUDA IPC where the link offers it) and with small ones (staged), checked against the sum
/// computed here; then nothing open, leaked or misused in the driver.
fn rank(spec: &str) {
    let f: Vec<&str> = spec.split(',').collect();
    let (r, n): (usize, usize) = (f[0].parse().unwrap(), f[1].parse().unwrap());
    let g = cuda::cuda().unwrap_or_else(|| panic!("no CUDA: {}", cuda::unavailable_reason()));
    assert!(!g.simulated(), "the simulator was chosen");
    let mut t = Tree::new(TreeOptions {
        rank: Some(r),
        world_size: Some(n),
        root: Some(f[2].to_string()),
        timeout: Some(Duration::from_secs(30)),
        ..Default::default()
    })
    .unwrap();
    t.tuning_mut().ring_threshold = 1024;
    let (op, dev) = host_sum();
    for (count, device_chunk) in [((1 << 20) + 3, 64 << 20), (50_001, 20_000)] {
        t.tuning_mut().device_chunk = device_chunk;
        let mine = input(r, count);
        let a = DeviceAlloc::new(0, mine.len() + 512).unwrap();
        let p = a.ptr + 256; // a view inside the allocation
        // SAFETY: inside our allocation.
        unsafe {
            cuda::copy_sync(
                0,
                Mem::Dev(p),
                Mem::Host(mine.as_ptr() as *mut u8),
                mine.len(),
            )
            .unwrap()
        };
        // SAFETY: our allocation, used by nothing else during the call.
        unsafe { t.all_reduce_cuda(DType::F32, 0, p, mine.len(), &op, Some(&dev)) }.unwrap();
        assert_eq!(t.last_all_reduce_algorithm(), Algorithm::Ring);
        let mut got = vec![0u8; mine.len()];
        // SAFETY: as above.
        unsafe {
            cuda::copy_sync(0, Mem::Host(got.as_mut_ptr()), Mem::Dev(p), mine.len()).unwrap()
        };
        let mut want = input(0, count);
        for q in 1..n {
            ops::reduce_into(&Op::Sum, DType::F32, &mut want, &input(q, count)).unwrap();
        }
        assert!(
            got == want,
            "rank {r}: {count} x f32 (device chunk {device_chunk})"
        );
    }
    t.barrier().unwrap();
    if parallel_engine::config::config().shm {
        // Segments of over 1 MiB (PARALLEL_CUDA_IPC_THRESHOLD) went by CUDA IPC.
        assert!(
            count("ipc_exports") > 0,
            "rank {r}: no chunk went by CUDA IPC"
        );
        assert!(
            count("ipc_opens") > 0,
            "rank {r}: no chunk was mapped by CUDA IPC"
        );
    } else {
        assert_eq!(count("ipc_exports"), 0, "rank {r}: CUDA IPC over TCP");
    }
    assert_eq!(count("misuses"), 0, "driver misuse (stderr says which)");
    assert_eq!(count("open_mappings"), 0, "IPC mappings left open");
    assert_eq!(count("live_events"), 0, "events not destroyed");
}

#[test]
fn ring_over_the_driver_backend_leaves_no_mapping_event_or_misuse() {
    if let Some(spec) = env(ROLE) {
        rank(&spec);
        return;
    }
    let Some(dir) = fake_dir() else { return };
    let mut path = dir.into_os_string();
    #[allow(clippy::disallowed_methods)] // the loader's path, extended for the children
    if let Some(old) = std::env::var_os("LD_LIBRARY_PATH") {
        path.push(":");
        path.push(old);
    }
    // CUDA IPC over shared-memory links (the defaults), and staged over TCP.
    for (mode, extra) in [
        ("ipc", ("PARALLEL_SHM", "1")),
        ("tcp", ("PARALLEL_SHM", "0")),
    ] {
        let root = format!("127.0.0.1:{}", common::free_port());
        let mut kids: Vec<_> = (0..3)
            .map(|r| {
                Command::new(std::env::current_exe().unwrap())
                    .args([
                        "--exact",
                        "ring_over_the_driver_backend_leaves_no_mapping_event_or_misuse",
                        "--nocapture",
                    ])
                    .env("LD_LIBRARY_PATH", &path)
                    .env(ROLE, format!("{r},3,{root}"))
                    .env("PARALLEL_CUDA", "1")
                    .env("PARALLEL_CUDA_IPC_CACHE", "0")
                    .env(extra.0, extra.1)
                    .spawn()
                    .unwrap()
            })
            .collect();
        let end = Instant::now() + Duration::from_secs(90);
        for (r, k) in kids.iter_mut().enumerate() {
            let st = loop {
                if let Some(st) = k.try_wait().unwrap() {
                    break st;
                }
                assert!(Instant::now() < end, "{mode}: rank {r} did not finish");
                std::thread::sleep(Duration::from_millis(20));
            };
            assert!(
                st.success(),
                "{mode}: rank {r} under the fake libcuda: {st}"
            );
        }
    }
}

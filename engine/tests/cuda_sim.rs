//! CUDA tensors over links, against the simulated device (feature `cuda-sim`: "device memory" is
//! shared host memory another process maps by handle, as with CUDA IPC). Runs under every
//! PARALLEL_SHM setting in CI: with shm the link carries CUDA IPC records, with tcp the tensors
//! are staged through the pipeline of pinned buffers. The real GPU runs the same paths through
//! tests/gpu (torch CUDA tensors) on a machine with one.

use parallel_engine::config::config;
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::value::{DType, Device, Tensor, Value};
use parallel_engine::{Client, ErrorKind, Server};
use std::sync::Arc;
use std::time::Duration;

fn t(secs: f64) -> Option<Duration> {
    Some(Duration::from_secs_f64(secs))
}

fn pair() -> (Server, Client) {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let c = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    s.wait_for(1, t(10.0)).unwrap();
    (s, c)
}

/// A CUDA tensor over `bytes`, placed `offset` bytes into a larger allocation (a view).
fn dev_tensor(dev: i32, dtype: DType, shape: Vec<usize>, bytes: &[u8], offset: usize) -> Tensor {
    let a = Arc::new(DeviceAlloc::new(dev, offset + bytes.len() + 64).unwrap());
    let ptr = a.ptr + offset as u64;
    // SAFETY: inside our allocation.
    unsafe {
        cuda::copy_sync(
            dev,
            Mem::Dev(ptr),
            Mem::Host(bytes.as_ptr() as *mut u8),
            bytes.len(),
        )
    }
    .unwrap();
    // SAFETY: the view lies inside `a`, which `keep` holds.
    unsafe {
        Tensor::from_raw(
            dtype,
            shape,
            None,
            Device::Cuda(dev),
            ptr as *mut u8,
            bytes.len(),
            a,
        )
    }
}

fn read_back(t: &Tensor) -> Vec<u8> {
    let mut v = vec![0u8; t.nbytes()];
    match t.device() {
        Device::Cuda(d) => unsafe {
            // SAFETY: the tensor's bytes, into a buffer of the same size.
            cuda::copy_sync(
                d,
                Mem::Host(v.as_mut_ptr()),
                Mem::Dev(t.data_ptr() as u64),
                v.len(),
            )
            .unwrap()
        },
        Device::Cpu => v.copy_from_slice(t.bytes().unwrap()),
    }
    v
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 9) as u8)
        .collect()
}

fn ipc_expected() -> bool {
    config().shm && config().cuda_ipc
}

#[test]
fn cuda_tensors_arrive_as_cuda_tensors_on_the_same_device() {
    cuda::use_simulator();
    let (s, c) = pair();
    assert_eq!(c.conn().link().cuda_ipc(), ipc_expected());
    let conn = s.connections().pop().unwrap();
    assert_eq!(conn.link().cuda_ipc(), ipc_expected());
    // Sizes: empty, one element, odd, several chunks (more chunks than staging buffers).
    let sizes = [0usize, 4, 4 * 1001, 20 << 20];
    for (k, n) in sizes.iter().enumerate() {
        let data = pattern(*n, k as u8);
        let dev = (k % 2) as i32;
        let x = dev_tensor(dev, DType::F32, vec![n / 4], &data, 4096 + 4 * k);
        let empty = dev_tensor(dev, DType::F32, vec![0], &[], 0);
        let v = Value::List(vec![
            Value::Int(k as i64),
            Value::Tensor(x),
            Value::Tensor(empty),
        ]);
        std::thread::scope(|sc| {
            let h = sc.spawn(|| conn.recv(t(30.0)).unwrap());
            c.send_timeout(&v, t(30.0)).unwrap();
            let got = h.join().unwrap();
            let Value::List(items) = &got else {
                panic!("{got:?}")
            };
            let rt = items[1].as_tensor().unwrap();
            assert_eq!(rt.device(), Device::Cuda(dev), "size {n}");
            assert_eq!(rt.shape(), vec![n / 4]);
            assert!(read_back(rt) == data, "contents of {n} bytes");
            let e = items[2].as_tensor().unwrap();
            assert_eq!((e.device(), e.nbytes()), (Device::Cuda(dev), 0));
        });
    }
}

#[test]
fn into_cuda_and_cpu_out_and_from_cpu_into_cuda() {
    cuda::use_simulator();
    let (s, c) = pair();
    let conn = s.connections().pop().unwrap();
    let data = pattern(data_len(), 7);
    let x = dev_tensor(1, DType::U8, vec![data.len()], &data, 123);
    // CUDA -> CUDA out (in place, on another device), CUDA -> CPU out.
    let mut out_dev = dev_tensor(0, DType::U8, vec![data.len()], &vec![0u8; data.len()], 1);
    let mut out_cpu = Tensor::from_bytes(DType::U8, vec![data.len()], vec![0; data.len()]).unwrap();
    for out in [&mut out_dev, &mut out_cpu] {
        let xp = x.data_ptr() as usize;
        let c = &c;
        std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                c.send_timeout(&Value::Tensor(dev_at(xp, 1 << 0, data_len())), t(30.0))
                    .unwrap()
            });
            let v = conn.recv_into(std::slice::from_mut(out), t(30.0)).unwrap();
            h.join().unwrap();
            assert!(matches!(v, Value::Out(0)), "{v:?}");
        });
        assert!(read_back(out) == data);
    }
    // CPU -> CUDA out.
    let cpu = Tensor::from_bytes(
        DType::U8,
        vec![data.len()],
        data.iter().map(|b| !b).collect(),
    )
    .unwrap();
    std::thread::scope(|sc| {
        let h = sc.spawn(|| {
            conn.recv_into(std::slice::from_mut(&mut out_dev), t(30.0))
                .map(|_| ())
        });
        c.send_timeout(&Value::Tensor(cpu), t(30.0)).unwrap();
        h.join().unwrap().unwrap();
    });
    assert!(read_back(&out_dev).iter().zip(&data).all(|(a, b)| *a == !b));
}

fn data_len() -> usize {
    6 << 20
}

/// A u8 CUDA tensor at a device address (memory kept alive by the test).
fn dev_at(ptr: usize, dev: i32, len: usize) -> Tensor {
    // SAFETY: the caller's allocation outlives the use.
    unsafe {
        Tensor::from_raw(
            DType::U8,
            vec![len],
            None,
            Device::Cuda(dev),
            ptr as *mut u8,
            len,
            Arc::new(()),
        )
    }
}

/// The same device memory, as a second tensor value (tensors are not Clone).
fn dev_clone(x: &Tensor) -> Tensor {
    let Device::Cuda(d) = x.device() else {
        unreachable!()
    };
    // SAFETY: the original outlives every use in the tests.
    unsafe {
        Tensor::from_raw(
            x.dtype(),
            x.shape().to_vec(),
            None,
            Device::Cuda(d),
            x.data_ptr() as *mut u8,
            x.nbytes(),
            Arc::new(()),
        )
    }
}

#[test]
fn the_sender_may_reuse_its_tensor_once_send_returns() {
    cuda::use_simulator();
    let (s, c) = pair();
    let conn = s.connections().pop().unwrap();
    let data = pattern(1 << 20, 3);
    let x = dev_tensor(0, DType::F64, vec![data.len() / 8], &data, 8);
    std::thread::scope(|sc| {
        let r = sc.spawn(|| conn.recv(t(30.0)).unwrap());
        c.send_timeout(&Value::Tensor(dev_clone(&x)), t(30.0))
            .unwrap();
        // Overwrite right away: the receiver must already hold (or have copied) the original.
        let junk = vec![0xAAu8; data.len()];
        // SAFETY: `x`'s own bytes, from a buffer of the same size.
        unsafe {
            cuda::copy_sync(
                0,
                Mem::Dev(x.data_ptr() as u64),
                Mem::Host(junk.as_ptr() as *mut u8),
                junk.len(),
            )
        }
        .unwrap();
        let got = r.join().unwrap();
        assert!(read_back(got.as_tensor().unwrap()) == data);
    });
}

#[test]
fn a_refused_cuda_message_keeps_the_link_usable() {
    cuda::use_simulator();
    let (s, c) = pair();
    let conn = s.connections().pop().unwrap();
    let data = pattern(4096, 1);
    let x = dev_tensor(0, DType::F32, vec![1024], &data, 0);
    let mut wrong = dev_tensor(0, DType::F32, vec![1023], &vec![0; 4092], 0);
    let xp = x.data_ptr() as usize;
    let cr = &c;
    std::thread::scope(|sc| {
        let h = sc.spawn(move || {
            cr.send_timeout(&Value::Tensor(dev_at(xp, 0, 4096)), t(30.0))
                .unwrap()
        });
        let e = conn
            .recv_into(std::slice::from_mut(&mut wrong), t(30.0))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        h.join().unwrap();
    });
    // A send over CUDA IPC returns once the receiver copied the tensor: receive concurrently.
    let got = std::thread::scope(|sc| {
        let h = sc.spawn(|| conn.recv(t(30.0)).unwrap());
        c.send_timeout(&Value::Tensor(dev_clone(&x)), t(30.0))
            .unwrap();
        h.join().unwrap()
    });
    assert!(read_back(got.as_tensor().unwrap()) == data);
}

#[test]
fn non_contiguous_cuda_tensors_are_refused_before_anything_is_sent() {
    cuda::use_simulator();
    let (_s, c) = pair();
    let data = pattern(64, 0);
    let base = dev_tensor(0, DType::F32, vec![4, 4], &data, 0);
    let ptr = base.data_ptr() as *mut u8;
    // SAFETY: the transposed view addresses the same 16 elements of `base`, which `keep` holds.
    let x = unsafe {
        Tensor::from_raw(
            DType::F32,
            vec![4, 4],
            Some(vec![1, 4]),
            Device::Cuda(0),
            ptr,
            64,
            Arc::new(base),
        )
    };
    let e = c.send_timeout(&Value::Tensor(x), t(5.0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    c.send_timeout(&Value::Int(1), t(5.0)).unwrap();
}

/// Across processes: a child process (this test binary, re-run) sends views with offsets into
/// its device memory; the parent maps them (simulated IPC through /proc/<pid>/fd) or receives
/// them staged.
#[test]
fn cuda_views_across_processes() {
    cuda::use_simulator();
    #[allow(clippy::disallowed_methods)] // the child's role comes from its environment
    if let Ok(port) = std::env::var("PARALLEL_TEST_CUDA_CHILD") {
        let c = Client::connect("127.0.0.1", port.parse().unwrap(), t(10.0)).unwrap();
        let base = pattern(3 << 20, 9);
        let a = dev_tensor(0, DType::U8, vec![base.len()], &base, 0);
        for (off, len) in [(0usize, 100usize), (1000, 4000), (5 << 10, 2 << 20)] {
            // SAFETY: a view inside `a`'s allocation, alive until the send returns.
            let v = unsafe {
                Tensor::from_raw(
                    DType::U8,
                    vec![len],
                    None,
                    Device::Cuda(0),
                    (a.data_ptr() as usize + off) as *mut u8,
                    len,
                    Arc::new(()),
                )
            };
            c.send_timeout(
                &Value::List(vec![Value::Int(off as i64), Value::Tensor(v)]),
                t(30.0),
            )
            .unwrap();
        }
        c.recv(t(30.0)).unwrap();
        return;
    }
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "cuda_views_across_processes", "--nocapture"])
        .env("PARALLEL_TEST_CUDA_CHILD", s.port().to_string())
        .spawn()
        .unwrap();
    s.wait_for(1, t(30.0)).unwrap();
    let conn = s.connections().pop().unwrap();
    assert_eq!(conn.link().cuda_ipc(), ipc_expected());
    let base = pattern(3 << 20, 9);
    for _ in 0..3 {
        let got = conn.recv(t(30.0)).unwrap();
        let Value::List(items) = &got else { panic!() };
        let off = items[0].as_int().unwrap() as usize;
        let x = items[1].as_tensor().unwrap();
        assert_eq!(x.device(), Device::Cuda(0));
        assert!(
            read_back(x) == base[off..off + x.nbytes()],
            "view at offset {off}"
        );
    }
    conn.send(&Value::None, t(10.0)).unwrap();
    assert!(child.wait().unwrap().success());
}

#[test]
fn small_cuda_messages_do_not_wait_for_the_receiver() {
    cuda::use_simulator();
    // Below PARALLEL_CUDA_IPC_THRESHOLD a CUDA tensor is staged: the send returns before the
    // peer receives (a symmetric send-then-receive exchange must not deadlock).
    let data = pattern(64 << 10, 5);
    if ipc_expected() && config().cuda_ipc_threshold <= data.len() as u64 {
        return; // this run sends everything by IPC (the CI run with a zero threshold)
    }
    let (s, c) = pair();
    let conn = s.connections().pop().unwrap();
    let x = dev_tensor(0, DType::U8, vec![data.len()], &data, 0);
    c.send_timeout(&Value::Tensor(dev_clone(&x)), t(10.0))
        .unwrap();
    conn.send(&Value::Tensor(dev_clone(&x)), t(10.0)).unwrap();
    assert!(read_back(conn.recv(t(10.0)).unwrap().as_tensor().unwrap()) == data);
    assert!(read_back(c.recv(t(10.0)).unwrap().as_tensor().unwrap()) == data);
}

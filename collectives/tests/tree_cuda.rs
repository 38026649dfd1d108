//! The Tree's GPU path (all-reduce of CUDA tensors) against the engine's simulated CUDA device:
//! "device memory" is shared host memory, links carry it by (simulated) CUDA IPC inside a host
//! and staged across simulated hosts; reductions run the CPU kernels where the GPU would run the
//! NVRTC ones (whose semantics collectives/src/cuda_ops.rs checks against the same CPU kernels).

mod common;

use common::world_on;
use parallel_collectives::Tree;
use parallel_collectives::ops::{self, Op};
use parallel_collectives::tree::DeviceReduce;
use parallel_engine::cuda::{self, DeviceAlloc, Mem};
use parallel_engine::value::DType;
use parallel_engine::{ErrorKind, Result};
use std::sync::Arc;

/// Rank r's element i, as bytes of `dtype` (small integers: exact in every dtype and op).
fn data(dtype: DType, r: usize, count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| {
            let v = ((r * 7 + i * 3) % 5) as f64 + 1.0;
            match dtype {
                DType::F32 => (v as f32).to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
                DType::I32 => (v as i32).to_le_bytes().to_vec(),
                DType::U8 => vec![v as u8],
                _ => unreachable!(),
            }
        })
        .collect()
}

/// The CPU reference: contributions of `ranks` reduced in rank order.
fn reference(op: &Op, dtype: DType, ranks: &[usize], count: usize) -> Vec<u8> {
    let mut acc = data(dtype, ranks[0], count);
    for r in &ranks[1..] {
        ops::reduce_into(op, dtype, &mut acc, &data(dtype, *r, count)).unwrap();
    }
    if matches!(op, Op::Avg) {
        ops::divide(dtype, &mut acc, ranks.len());
    }
    acc
}

/// `bytes` in a new allocation on `dev`, `offset` bytes in (a view, as torch tensors often are);
/// the allocation (which must outlive the uses) and the view's address.
fn upload(dev: i32, bytes: &[u8], offset: usize) -> Result<(DeviceAlloc, u64)> {
    let a = DeviceAlloc::new(dev, offset + bytes.len())?;
    let p = a.ptr + offset as u64;
    // SAFETY: inside our allocation.
    unsafe {
        cuda::copy_sync(
            dev,
            Mem::Dev(p),
            Mem::Host(bytes.as_ptr() as *mut u8),
            bytes.len(),
        )?
    };
    Ok((a, p))
}

/// `len` bytes of device memory at `p` on `dev`.
fn download(dev: i32, p: u64, len: usize) -> Result<Vec<u8>> {
    let mut out = vec![0u8; len];
    // SAFETY: the caller's allocation holds `len` bytes at `p`.
    unsafe { cuda::copy_sync(dev, Mem::Host(out.as_mut_ptr()), Mem::Dev(p), len)? };
    Ok(out)
}

/// Rank r's all-reduce on simulated device memory (device r % 2); returns the result bytes.
fn reduce_on_device(
    t: &Tree,
    op: &Op,
    dtype: DType,
    count: usize,
    user: Option<&DeviceReduce>,
) -> Result<Vec<u8>> {
    let r = t.rank();
    let dev = (r % 2) as i32;
    let mine = data(dtype, r, count);
    // A view 256 bytes into its allocation, as torch tensors often are.
    let (_a, p) = upload(dev, &mine, 256)?;
    // SAFETY: our allocation, used by nothing else during the call.
    let n = unsafe { t.all_reduce_cuda(dtype, dev, p, mine.len(), op, user)? };
    assert_eq!(n, t.world_size());
    let out = download(dev, p, mine.len())?;
    Ok(out)
}

#[test]
fn gpu_1_all_reduce_of_cuda_memory_equals_the_cpu_reference() {
    cuda::use_simulator();
    for n in [1usize, 2, 3, 5] {
        for (op, dtype) in [
            (Op::Sum, DType::F32),
            (Op::Max, DType::I32),
            (Op::Avg, DType::BF16),
            (Op::Prod, DType::U8),
            (Op::Bxor, DType::I32),
        ] {
            let count = 1001;
            let want = reference(&op, dtype, &(0..n).collect::<Vec<_>>(), count);
            let op2 = op.clone();
            for (r, got) in world_on(n, None, move |t| {
                reduce_on_device(&t, &op2, dtype, count, None)
            })
            .into_iter()
            .enumerate()
            {
                assert!(
                    got.unwrap() == want,
                    "n={n} {op:?} {} rank {r}",
                    dtype.name()
                );
            }
        }
    }
}

#[test]
fn gpu_staged_across_simulated_hosts_and_large_buffers() {
    cuda::use_simulator();
    // Two hosts of two ranks: CUDA IPC inside a host, pinned staging across (several chunks).
    let count = 3 << 20;
    let want = reference(&Op::Sum, DType::F32, &[0, 1, 2, 3], count);
    let hosts = Some(vec!["host-a", "host-a", "host-b", "host-b"]);
    for got in world_on(4, hosts, move |t| {
        reduce_on_device(&t, &Op::Sum, DType::F32, count, None)
    }) {
        assert!(got.unwrap() == want);
    }
}

#[test]
fn gpu_user_reduce_function_runs_in_its_device_form() {
    cuda::use_simulator();
    let user: DeviceReduce = Arc::new(|dst, src, dtype, n, _dev| {
        // The simulated device is host memory: a stand-in for a torch CUDA callable.
        let len = n * dtype.itemsize();
        // SAFETY: the tree passes two distinct buffers of n elements.
        let (d, s) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst as *mut u8, len),
                std::slice::from_raw_parts(src as *const u8, len),
            )
        };
        ops::reduce_into(&Op::Max, dtype, d, s)
    });
    let host_form: ops::UserReduce = Arc::new(|d, s, dt, _| ops::reduce_into(&Op::Max, dt, d, s));
    let want = reference(&Op::Max, DType::F32, &[0, 1, 2], 77);
    for got in world_on(3, None, move |t| {
        reduce_on_device(
            &t,
            &Op::User(host_form.clone()),
            DType::F32,
            77,
            Some(&user),
        )
    }) {
        assert!(got.unwrap() == want);
    }
}

#[test]
fn gpu_uneven_endings_and_mismatch() {
    cuda::use_simulator();
    // Rank 2 is done: it serves with the identity in host memory; the others get 2 contributors.
    let want = reference(&Op::Sum, DType::I32, &[0, 1], 100);
    let res = world_on(3, None, move |t| {
        if t.rank() == 2 {
            t.done(None, None)?;
            return Ok(None);
        }
        let dev = 0;
        let mine = data(DType::I32, t.rank(), 100);
        let (_a, p) = upload(dev, &mine, 0)?;
        // SAFETY: as above.
        let n = unsafe { t.all_reduce_cuda(DType::I32, dev, p, mine.len(), &Op::Sum, None)? };
        let out = download(dev, p, mine.len())?;
        t.done(None, None)?;
        Ok(Some((n, out)))
    });
    for r in res.into_iter().take(2) {
        let (n, out) = r.unwrap().unwrap();
        assert_eq!(n, 2);
        assert!(out == want);
    }
    // One rank passes host memory, the other CUDA memory: a mismatch on both, naming the call.
    let res = world_on(2, None, |t| {
        let mut mine = data(DType::F32, t.rank(), 10);
        if t.rank() == 0 {
            t.all_reduce(DType::F32, &mut mine, &Op::Sum).map(|_| ())
        } else {
            let a = DeviceAlloc::new(0, mine.len())?;
            // SAFETY: our allocation.
            unsafe { t.all_reduce_cuda(DType::F32, 0, a.ptr, mine.len(), &Op::Sum, None) }
                .map(|_| ())
        }
    });
    for r in res {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        assert!(e.to_string().contains("on CUDA"), "{e}");
    }
}

#[test]
fn gpu_broadcast_from_every_root_and_through_a_finished_rank() {
    cuda::use_simulator();
    for n in [1usize, 2, 3, 5] {
        for root in 0..n {
            let want = data(DType::F32, root, 999);
            let res = world_on(n, None, move |t| {
                let dev = (t.rank() % 2) as i32;
                let mine = data(DType::F32, t.rank(), 999);
                let (_a, p) = upload(dev, &mine, 64)?;
                // SAFETY: our allocation, used by nothing else during the call.
                unsafe { t.broadcast_cuda(DType::F32, dev, p, mine.len(), root)? };
                let out = download(dev, p, mine.len())?;
                Ok(out)
            });
            for (r, got) in res.into_iter().enumerate() {
                assert!(got.unwrap() == want, "n={n} root={root} rank {r}");
            }
        }
    }
    // A finished rank in the middle of the tree relays the data in host memory.
    let want = data(DType::I32, 3, 50);
    let res = world_on(4, None, move |t| {
        if t.rank() == 2 {
            t.done(None, None)?;
            return Ok(None);
        }
        let mine = data(DType::I32, t.rank(), 50);
        let (_a, p) = upload(0, &mine, 0)?;
        // SAFETY: as above.
        unsafe { t.broadcast_cuda(DType::I32, 0, p, mine.len(), 3)? };
        let out = download(0, p, mine.len())?;
        t.done(None, None)?;
        Ok(Some(out))
    });
    for (r, got) in res.into_iter().enumerate() {
        if r != 2 {
            assert!(got.unwrap().unwrap() == want, "rank {r}");
        }
    }
}

#[test]
fn gpu_reduce_only_the_root_changes() {
    cuda::use_simulator();
    for root in 0..3 {
        let want = reference(&Op::Avg, DType::F32, &[0, 1, 2], 300);
        let res = world_on(3, None, move |t| {
            let mine = data(DType::F32, t.rank(), 300);
            let (_a, p) = upload(0, &mine, 0)?;
            // SAFETY: as above.
            let n = unsafe { t.reduce_cuda(DType::F32, 0, p, mine.len(), &Op::Avg, None, root)? };
            let out = download(0, p, mine.len())?;
            Ok((n, out, mine))
        });
        for (r, got) in res.into_iter().enumerate() {
            let (n, out, mine) = got.unwrap();
            assert_eq!(n, 3);
            assert!(
                out == if r == root { want.clone() } else { mine },
                "root {root} rank {r}"
            );
        }
    }
}

#[test]
fn the_safe_tensor_front_reduces_cpu_and_cuda_tensors() {
    cuda::use_simulator();
    let want = reference(&Op::Sum, DType::I32, &[0, 1], 64);
    for got in world_on(2, None, move |t| {
        let mine = data(DType::I32, t.rank(), 64);
        let mut cpu =
            parallel_engine::value::Tensor::from_bytes(DType::I32, vec![64], mine.clone())?;
        t.all_reduce_tensor(&mut cpu, &Op::Sum, None)?;
        let (a, ptr) = upload(0, &mine, 0)?;
        let a = Arc::new(a);
        let p = ptr as *mut u8;
        // SAFETY: the tensor covers our allocation, which it keeps alive.
        let mut dev = unsafe {
            parallel_engine::value::Tensor::from_raw(
                DType::I32,
                vec![64],
                None,
                parallel_engine::value::Device::Cuda(0),
                p,
                mine.len(),
                a.clone(),
            )
        };
        t.all_reduce_tensor(&mut dev, &Op::Sum, None)?;
        let out = download(0, ptr, mine.len())?;
        Ok((cpu.bytes().unwrap().to_vec(), out))
    }) {
        let (cpu, dev) = got.unwrap();
        assert!(cpu == want && dev == want);
    }
}

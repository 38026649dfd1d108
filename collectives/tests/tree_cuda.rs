//! The Tree's GPU path (all-reduce of CUDA tensors) against the engine's simulated CUDA device:
//! "device memory" is shared host memory, links carry it by (simulated) CUDA IPC inside a host
//! and staged across simulated hosts; reductions run the CPU kernels where the GPU would run the
//! NVRTC ones (whose semantics collectives/src/cuda_ops.rs checks against the same CPU kernels).
//! Over 600 lines on purpose: it is the GPU path's whole suite against one simulated world
//! (one harness); its cases mirror the CPU suites' files one for one.

mod common;

use common::world_on;
use parallel_collectives::Tree;
use parallel_collectives::algorithms::Algorithm;
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

// ---- The ring over device memory -------------------------------------------------------------

/// All-reduces of at least this many bytes take the ring in the tests below.
const RING_AT: usize = 1024;

/// A small deterministic generator (xorshift64*) for sizes; the seed is printed on failure.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) as usize % n.max(1)
    }
}

fn clock_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.as_nanos() as u64) | 1
}

/// Rank r's element i: a small integer in -1..=3, so that sums and products over four ranks are
/// exact in every floating dtype (|x| <= 81 < 2^8, bf16's precision) and order-independent.
fn small(seed: u64, r: usize, i: usize) -> i64 {
    ((seed as usize % 97 + r * 7 + i * 3) % 5) as i64 - 1
}

/// The bytes of `v` as one element of `dtype` (integers wrap, as a cast does; complex: `v` real
/// and `v2` imaginary).
fn encode(dtype: DType, v: f64, v2: f64) -> Vec<u8> {
    let i = v as i128 as u128;
    match dtype {
        DType::Bool => vec![u8::from(v != 0.0)],
        DType::U8 | DType::I8 => (i as u8).to_le_bytes().to_vec(),
        DType::U16 | DType::I16 => (i as u16).to_le_bytes().to_vec(),
        DType::U32 | DType::I32 => (i as u32).to_le_bytes().to_vec(),
        DType::U64 | DType::I64 => (i as u64).to_le_bytes().to_vec(),
        DType::F16 => half::f16::from_f64(v).to_le_bytes().to_vec(),
        DType::BF16 => half::bf16::from_f64(v).to_le_bytes().to_vec(),
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F64 => v.to_le_bytes().to_vec(),
        DType::C64 => [(v as f32).to_le_bytes(), (v2 as f32).to_le_bytes()].concat(),
        DType::C128 => [v.to_le_bytes(), v2.to_le_bytes()].concat(),
    }
}

/// Rank r's input: `small` values (Bool: whether positive; complex: imaginary part 2v - 1).
fn ring_input(dtype: DType, seed: u64, r: usize, count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| {
            let v = small(seed, r, i) as f64;
            let v = if dtype == DType::Bool {
                f64::from(v > 0.0)
            } else {
                v
            };
            encode(dtype, v, 2.0 * v - 1.0)
        })
        .collect()
}

/// The expected result, computed element by element from the inputs' values without the
/// crate's kernels: integers in 128 bits, then wrapped to the dtype's width (which is what
/// wrapping sums and products give in any order); floats exactly in f64; Bool as logic.
/// Avg: the exact sum in the dtype, divided by `ops::divide` (the division the device kernel
/// is pinned to bit for bit in collectives/src/cuda_ops).
fn independent(op: &Op, dtype: DType, seed: u64, n: usize, count: usize) -> Vec<u8> {
    let bits = 8 * dtype.itemsize() as u32;
    let unsigned = matches!(
        dtype,
        DType::U8 | DType::U16 | DType::U32 | DType::U64 | DType::Bool
    );
    let float = matches!(
        dtype,
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::C64 | DType::C128
    );
    // An integer value as the dtype holds it (unsigned: wrapped to [0, 2^bits)).
    let held = |v: i64| -> i128 {
        if unsigned && v < 0 {
            (1i128 << bits) + v as i128
        } else {
            v as i128
        }
    };
    let mut out = Vec::new();
    for i in 0..count {
        let vs: Vec<i64> = (0..n)
            .map(|r| match dtype {
                DType::Bool => i64::from(small(seed, r, i) > 0),
                _ => small(seed, r, i),
            })
            .collect();
        let (re, im) = if float {
            let f: Vec<f64> = vs.iter().map(|v| *v as f64).collect();
            let g: Vec<f64> = f.iter().map(|v| 2.0 * v - 1.0).collect();
            match op {
                Op::Sum | Op::Avg => (f.iter().sum(), g.iter().sum()),
                Op::Prod => (f.iter().product(), 0.0),
                Op::Min => (f.iter().copied().fold(f64::INFINITY, f64::min), 0.0),
                Op::Max => (f.iter().copied().fold(f64::NEG_INFINITY, f64::max), 0.0),
                _ => unreachable!("checked"),
            }
        } else if dtype == DType::Bool {
            let any = vs.iter().any(|v| *v != 0);
            let all = vs.iter().all(|v| *v != 0);
            let odd = vs.iter().filter(|v| **v != 0).count() % 2 == 1;
            let b = match op {
                Op::Sum | Op::Max | Op::Bor => any,
                Op::Prod | Op::Min | Op::Band => all,
                Op::Bxor => odd,
                _ => unreachable!("checked"),
            };
            (f64::from(b), 0.0)
        } else {
            let xs: Vec<i128> = vs.iter().map(|v| held(*v)).collect();
            let x = match op {
                Op::Sum => xs.iter().fold(0i128, |a, b| a.wrapping_add(*b)),
                Op::Prod => xs.iter().fold(1i128, |a, b| a.wrapping_mul(*b)),
                Op::Min => *xs.iter().min().unwrap(),
                Op::Max => *xs.iter().max().unwrap(),
                Op::Band => xs.iter().fold(-1i128, |a, b| a & b),
                Op::Bor => xs.iter().fold(0i128, |a, b| a | b),
                Op::Bxor => xs.iter().fold(0i128, |a, b| a ^ b),
                _ => unreachable!("checked"),
            };
            // Truncate to the dtype's width (the low bits are exact under wrapping).
            let low = (x as u128) & (u128::MAX >> (128 - bits));
            out.extend_from_slice(&low.to_le_bytes()[..dtype.itemsize()]);
            continue;
        };
        out.extend(encode(dtype, re, im));
    }
    if matches!(op, Op::Avg) {
        ops::divide(dtype, &mut out, n);
    }
    out
}

/// Every built-in op with every dtype it applies to (what the device kernels support).
fn builtin_cases() -> Vec<(Op, DType)> {
    let ops = [
        Op::Sum,
        Op::Prod,
        Op::Min,
        Op::Max,
        Op::Avg,
        Op::Band,
        Op::Bor,
        Op::Bxor,
    ];
    let mut v = Vec::new();
    for op in ops {
        for dt in DType::ALL {
            if op.check(dt).is_ok() {
                v.push((op.clone(), dt));
            }
        }
    }
    v
}

/// The ring's settings for these tests: a small threshold and a small device chunk.
fn ring_tuning(t: &mut Tree, device_chunk: usize) {
    t.tuning_mut().ring_threshold = RING_AT;
    t.tuning_mut().device_chunk = device_chunk;
}

#[test]
fn gpu_ring_every_op_and_dtype_on_2_3_4_ranks_equals_an_independent_cpu_computation() {
    cuda::use_simulator();
    let seed = clock_seed();
    let cases = builtin_cases();
    assert!(cases.len() > 60, "{} cases", cases.len());
    for n in [2usize, 3, 4] {
        let mut rng = Rng(seed ^ n as u64);
        // Sizes: random, from the threshold up, not multiples of the world or the chunk in
        // general; some below the threshold (the tree), one of exactly the threshold.
        let sizes: Vec<usize> = cases
            .iter()
            .enumerate()
            .map(|(k, (_, dt))| {
                let item = dt.itemsize();
                match k % 9 {
                    0 => 1 + rng.below(RING_AT / item - 1),
                    1 => RING_AT / item,
                    _ => RING_AT / item + rng.below(6000),
                }
            })
            .collect();
        // Odd device chunks (not multiples of the element size: the ring rounds them).
        let device_chunk = 100 + rng.below(3000);
        let (cases2, sizes2) = (cases.clone(), sizes.clone());
        let res = world_on(n, None, move |mut t| {
            ring_tuning(&mut t, device_chunk);
            let r = t.rank();
            let dev = (r % 2) as i32;
            let mut out = Vec::new();
            for ((op, dt), &count) in cases2.iter().zip(&sizes2) {
                let mine = ring_input(*dt, seed, r, count);
                let (_a, p) = upload(dev, &mine, 64)?;
                // SAFETY: our allocation, used by nothing else during the call.
                let c = unsafe { t.all_reduce_cuda(*dt, dev, p, mine.len(), op, None)? };
                assert_eq!(c, n);
                let got = download(dev, p, mine.len())?;
                out.push((got, t.last_all_reduce_algorithm()));
            }
            Ok(out)
        });
        let res: Vec<_> = res
            .into_iter()
            .enumerate()
            .map(|(r, x)| x.unwrap_or_else(|e| panic!("seed {seed} n={n} rank {r}: {e}")))
            .collect();
        for (k, ((op, dt), &count)) in cases.iter().zip(&sizes).enumerate() {
            let want = independent(op, *dt, seed, n, count);
            let algo = if count * dt.itemsize() >= RING_AT {
                Algorithm::Ring
            } else {
                Algorithm::Tree
            };
            for (r, got) in res.iter().enumerate() {
                let what = format!(
                    "seed {seed} n={n} {op:?} {} x {count} (device chunk {device_chunk}) rank {r}",
                    dt.name()
                );
                assert_eq!(got[k].1, algo, "{what}: algorithm");
                assert!(got[k].0 == want, "{what}: differs from the CPU computation");
                assert!(got[k].0 == res[0][k].0, "{what}: differs from rank 0");
            }
        }
    }
}

#[test]
fn gpu_ring_by_ipc_inside_a_host_and_staged_across_hosts() {
    cuda::use_simulator();
    // Segments of over 1 MiB (PARALLEL_CUDA_IPC_THRESHOLD) move by (simulated) CUDA IPC inside
    // a host; across simulated hosts they are staged (several staging chunks each). Four ranks
    // on two hosts would take the hierarchical algorithm with host memory: device memory takes
    // the flat ring.
    for (n, hosts, count) in [
        (2usize, None, (3 << 19) + 5),
        (3, None, (1 << 20) + 1),
        (
            4,
            Some(vec!["host-a", "host-a", "host-b", "host-b"]),
            (3 << 20) + 3,
        ),
    ] {
        let want = independent(&Op::Sum, DType::F32, 5, n, count);
        let res = world_on(n, hosts.clone(), move |t| {
            let r = t.rank();
            let mine = ring_input(DType::F32, 5, r, count);
            let (_a, p) = upload((r % 2) as i32, &mine, 256)?;
            // SAFETY: our allocation, used by nothing else during the call.
            unsafe {
                t.all_reduce_cuda(DType::F32, (r % 2) as i32, p, mine.len(), &Op::Sum, None)?
            };
            let got = download((r % 2) as i32, p, mine.len())?;
            Ok((got, t.last_all_reduce_algorithm()))
        });
        for (r, x) in res.into_iter().enumerate() {
            let (got, algo) = x.unwrap_or_else(|e| panic!("n={n} rank {r}: {e}"));
            assert_eq!(algo, Algorithm::Ring, "n={n} rank {r}");
            assert!(got == want, "n={n} rank {r}");
        }
    }
}

/// A device form of a user function for the simulated device (device memory is host memory
/// there): `Op::Max`, failing on rank `fail` (if any) from its first call on.
fn device_max(fail: Option<usize>, rank: usize) -> DeviceReduce {
    Arc::new(move |dst, src, dtype, n, _dev| {
        if fail == Some(rank) {
            return Err(parallel_engine::Error::new(
                ErrorKind::Worker,
                "reduce",
                format!("the user function raised on rank {rank}"),
            ));
        }
        let len = n * dtype.itemsize();
        // SAFETY: the ring passes two distinct device buffers of n elements.
        let (d, s) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst as *mut u8, len),
                std::slice::from_raw_parts(src as *const u8, len),
            )
        };
        ops::reduce_into(&Op::Max, dtype, d, s)
    })
}

#[test]
fn gpu_user_function_reduces_and_a_failing_one_changes_no_tensor_on_any_rank() {
    cuda::use_simulator();
    // 12 KB of f32: the ring, in several device chunks; 400 bytes: the tree.
    for (n, count) in [(2usize, 3001), (3, 3001), (3, 100)] {
        let algo = if count * 4 >= RING_AT {
            Algorithm::Ring
        } else {
            Algorithm::Tree
        };
        let want = independent(&Op::Max, DType::F32, 11, n, count);
        // In the tree only ranks with children reduce (rank 0 does); in the ring every rank.
        let bad = if algo == Algorithm::Tree { 0 } else { n - 1 };
        for fail in [None, Some(bad)] {
            let res = world_on(n, None, move |mut t| {
                ring_tuning(&mut t, 4000);
                let r = t.rank();
                let host: ops::UserReduce =
                    Arc::new(|d, s, dt, _| ops::reduce_into(&Op::Max, dt, d, s));
                let mine = ring_input(DType::F32, 11, r, count);
                let (_a, p) = upload(0, &mine, 128)?;
                let user = device_max(fail, r);
                // SAFETY: our allocation, used by nothing else during the call.
                let got = unsafe {
                    t.all_reduce_cuda(DType::F32, 0, p, mine.len(), &Op::User(host), Some(&user))
                };
                let after = download(0, p, mine.len())?;
                let ran = t.last_all_reduce_algorithm();
                // The tree stays usable after a failed user function (TREE-6).
                let mut x = vec![1u8; 8];
                t.all_reduce(DType::I32, &mut x, &Op::Sum)?;
                Ok((got.map(|_| ()), after, mine, ran))
            });
            for (r, x) in res.into_iter().enumerate() {
                let (got, after, mine, ran) = x.unwrap_or_else(|e| panic!("n={n} rank {r}: {e}"));
                match fail {
                    None => {
                        got.unwrap_or_else(|e| panic!("n={n} rank {r}: {e}"));
                        assert!(after == want, "n={n} rank {r}: result");
                        assert_eq!(ran, algo, "n={n} x{count} rank {r}");
                    }
                    Some(bad) => {
                        let e = got.expect_err("a failing user function fails every rank");
                        assert!(
                            e.to_string().contains(&format!("rank {bad}")),
                            "n={n} rank {r}: {e}"
                        );
                        assert!(after == mine, "n={n} rank {r}: the tensor changed");
                    }
                }
            }
        }
    }
}

#[test]
fn gpu_ring_forced_on_empty_and_tiny_buffers() {
    cuda::use_simulator();
    // PARALLEL_ALGO=ring: the ring also for 0 elements and fewer elements than ranks.
    for n in [2usize, 3] {
        for count in [0usize, 1, 2, 4] {
            let want = independent(&Op::Sum, DType::I64, 2, n, count);
            let res = world_on(n, None, move |mut t| {
                t.tuning_mut().algo = parallel_collectives::plan::Algo::Ring;
                let mine = ring_input(DType::I64, 2, t.rank(), count);
                let (_a, p) = upload(0, &mine, 8)?;
                // SAFETY: our allocation, used by nothing else during the call.
                unsafe { t.all_reduce_cuda(DType::I64, 0, p, mine.len(), &Op::Sum, None)? };
                let sum = download(0, p, mine.len())?;
                // A user function (which refuses empty chunks: it never gets one) agrees.
                let (_b, q) = upload(0, &mine, 0)?;
                let host: ops::UserReduce =
                    Arc::new(|d, s, dt, _| ops::reduce_into(&Op::Sum, dt, d, s));
                let user: DeviceReduce = Arc::new(|dst, src, dtype, n, _| {
                    assert!(n > 0, "a user function got an empty chunk");
                    let len = n * dtype.itemsize();
                    // SAFETY: as in device_max.
                    let (d, s) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(dst as *mut u8, len),
                            std::slice::from_raw_parts(src as *const u8, len),
                        )
                    };
                    ops::reduce_into(&Op::Sum, dtype, d, s)
                });
                // SAFETY: as above.
                unsafe {
                    t.all_reduce_cuda(DType::I64, 0, q, mine.len(), &Op::User(host), Some(&user))?
                };
                assert!(download(0, q, mine.len())? == sum, "user function");
                Ok((sum, t.last_all_reduce_algorithm()))
            });
            for (r, x) in res.into_iter().enumerate() {
                let (got, algo) = x.unwrap_or_else(|e| panic!("n={n} x{count} rank {r}: {e}"));
                assert_eq!(algo, Algorithm::Ring, "n={n} x{count} rank {r}");
                assert!(got == want, "n={n} x{count} rank {r}");
            }
        }
    }
}

#[test]
fn gpu_ring_with_a_finished_rank_serving_in_host_memory() {
    cuda::use_simulator();
    // Rank 1 called done(): it takes part in the ring with the identity in host memory, and
    // the links move its chunks to and from the others' device memory.
    for op in [Op::Sum, Op::Avg, Op::Min] {
        let count = 5003;
        let op2 = op.clone();
        let res = world_on(3, None, move |mut t| {
            ring_tuning(&mut t, 3000);
            if t.rank() == 1 {
                t.done(None, None)?;
                return Ok(None);
            }
            let mine = ring_input(DType::F64, 3, t.rank(), count);
            let (_a, p) = upload(0, &mine, 0)?;
            // SAFETY: as above.
            let c = unsafe { t.all_reduce_cuda(DType::F64, 0, p, mine.len(), &op2, None)? };
            let got = download(0, p, mine.len())?;
            let algo = t.last_all_reduce_algorithm();
            t.done(None, None)?;
            Ok(Some((c, got, algo)))
        });
        // The reference over ranks 0 and 2: their inputs are those of ranks 0 and 1 of a
        // world with seed shifted by 14 (7 per rank), so compute it directly instead.
        let mut want = ring_input(DType::F64, 3, 0, count);
        let other = ring_input(DType::F64, 3, 2, count);
        let (a, b): (Vec<f64>, Vec<f64>) = (
            want.chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            other
                .chunks(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
        );
        want = a
            .iter()
            .zip(&b)
            .flat_map(|(x, y)| {
                match op {
                    Op::Sum => x + y,
                    Op::Avg => (x + y) / 2.0,
                    _ => x.min(*y),
                }
                .to_le_bytes()
            })
            .collect();
        let all = format!("{res:?}");
        for (r, x) in res.into_iter().enumerate() {
            let x = x.unwrap_or_else(|e| panic!("{op:?} rank {r}: {e}; all: {all}"));
            if r == 1 {
                continue;
            }
            let (c, got, algo) = x.unwrap();
            assert_eq!((c, algo), (2, Algorithm::Ring), "{op:?} rank {r}");
            assert!(got == want, "{op:?} rank {r}");
        }
    }
}

#[test]
fn gpu_ring_peer_lost_mid_ring_is_an_error_naming_it_on_every_rank_within_the_deadline() {
    cuda::use_simulator();
    // Rank 2 dies in the middle of the ring (its reduce function panics after it reduced its
    // first chunk, and its tree is dropped: its links close). The others must fail promptly
    // (the trees' deadline is 20 s), the ones next to it in the ring naming it.
    let started = std::time::Instant::now();
    let count = 40_000;
    let res = world_on(4, None, move |mut t| {
        ring_tuning(&mut t, 8000);
        let r = t.rank();
        let host: ops::UserReduce = Arc::new(|d, s, dt, _| ops::reduce_into(&Op::Sum, dt, d, s));
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let user: DeviceReduce = Arc::new(move |dst, src, dtype, n, _dev| {
            if r == 2 && calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 1 {
                panic!("rank 2 dies in the middle of the ring");
            }
            let len = n * dtype.itemsize();
            // SAFETY: as in device_max.
            let (d, s) = unsafe {
                (
                    std::slice::from_raw_parts_mut(dst as *mut u8, len),
                    std::slice::from_raw_parts(src as *const u8, len),
                )
            };
            ops::reduce_into(&Op::Sum, dtype, d, s)
        });
        let mine = ring_input(DType::I32, 1, r, count);
        let (_a, p) = upload(0, &mine, 0)?;
        let ring = t.plan().ring.clone();
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: our allocation, used by nothing else during the call.
            unsafe { t.all_reduce_cuda(DType::I32, 0, p, mine.len(), &Op::User(host), Some(&user)) }
        }));
        drop(t);
        match res {
            Ok(r) => Ok((r.map(|_| ()).err(), ring, started.elapsed())),
            Err(_) => Ok((None, ring, started.elapsed())),
        }
    });
    let ring = res[0].as_ref().unwrap().1.clone();
    let pos = ring.iter().position(|r| *r == 2).unwrap();
    let neighbours = [ring[(pos + 3) % 4], ring[(pos + 1) % 4]];
    for (r, x) in res.into_iter().enumerate() {
        let (err, _, took) = x.unwrap();
        if r == 2 {
            continue;
        }
        let e = err.unwrap_or_else(|| panic!("rank {r} succeeded without rank 2"));
        assert!(
            took < std::time::Duration::from_secs(15),
            "rank {r} took {took:?}: {e}"
        );
        assert!(
            matches!(e.kind(), ErrorKind::Closed | ErrorKind::PeerLost),
            "rank {r}: {e}"
        );
        if neighbours.contains(&r) {
            assert!(e.to_string().contains("rank 2"), "rank {r}: {e}");
        }
    }
}

/// The child of `gpu_ring_rank_killed_mid_ring_fails_every_other_rank_naming_it`: "rank,world,
/// root"; runs ring all-reduces of CUDA memory until one fails, printing a line after each, and
/// the error last ("ERR <kind>: <message>").
fn ring_child(spec: &str) {
    use std::io::Write;
    let say = |line: String| {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let f: Vec<&str> = spec.split(',').collect();
    let (rank, world) = (f[0].parse().unwrap(), f[1].parse().unwrap());
    let mut t = Tree::new(parallel_collectives::TreeOptions {
        rank: Some(rank),
        world_size: Some(world),
        root: Some(f[2].to_string()),
        timeout: Some(std::time::Duration::from_secs(60)),
        ..Default::default()
    })
    .unwrap();
    ring_tuning(&mut t, 64 << 10);
    let mine = ring_input(DType::F32, 3, rank, 1 << 20);
    let (_a, p) = upload(0, &mine, 0).unwrap();
    for k in 0..100_000 {
        // SAFETY: our allocation, used by nothing else during the call.
        let r = unsafe { t.all_reduce_cuda(DType::F32, 0, p, mine.len(), &Op::Max, None) };
        match r {
            Ok(_) => say(format!("iter {k} {:?}", t.last_all_reduce_algorithm())),
            Err(e) => {
                say(format!("ERR {:?}: {e}", e.kind()));
                return;
            }
        }
    }
    say("no failure".into());
}

#[test]
fn gpu_ring_rank_killed_mid_ring_fails_every_other_rank_naming_it() {
    use std::io::BufRead;
    use std::time::{Duration, Instant};
    cuda::use_simulator();
    #[allow(clippy::disallowed_methods)] // the child's role comes from its environment
    if let Ok(spec) = std::env::var("PARALLEL_TEST_RING_CHILD") {
        ring_child(&spec);
        return;
    }
    // Three processes run 4 MiB CUDA all-reduces (the ring, 64 KiB device chunks) in a loop;
    // rank 1 is killed (SIGKILL) once it has done a few. The others must fail promptly (their
    // trees' timeout is 60 s), each naming rank 1 (both are its neighbours in a ring of three).
    let root = format!("127.0.0.1:{}", common::free_port());
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    let mut kids: Vec<_> = (0..3)
        .map(|r| {
            let mut c = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "gpu_ring_rank_killed_mid_ring_fails_every_other_rank_naming_it",
                    "--nocapture",
                ])
                .env("PARALLEL_TEST_RING_CHILD", format!("{r},3,{root}"))
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let out = c.stdout.take().unwrap();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(out).lines().map_while(|l| l.ok()) {
                    let _ = tx.send((r, line));
                }
            });
            c
        })
        .collect();
    drop(tx);
    let end = Instant::now() + Duration::from_secs(120);
    let mut done = [0usize; 3];
    let mut last: [Option<String>; 3] = Default::default();
    let mut killed: Option<Instant> = None;
    while let Ok((r, line)) = rx.recv_timeout(end.saturating_duration_since(Instant::now())) {
        if line.starts_with("iter") {
            assert!(line.ends_with("Ring"), "rank {r}: {line}");
            done[r] += 1;
        }
        if line.starts_with("ERR") || line.starts_with("no failure") {
            last[r] = Some(line);
        }
        if killed.is_none() && done[1] >= 3 {
            kids[1].kill().unwrap();
            killed = Some(Instant::now());
        }
        if last[0].is_some() && last[2].is_some() {
            break;
        }
    }
    let killed =
        killed.unwrap_or_else(|| panic!("rank 1 never did 3 all-reduces: {done:?} {last:?}"));
    let took = killed.elapsed();
    for k in &mut kids {
        let _ = k.kill();
        let _ = k.wait();
    }
    for r in [0, 2] {
        let line = last[r]
            .as_ref()
            .unwrap_or_else(|| panic!("rank {r} did not fail after rank 1 was killed"));
        assert!(line.starts_with("ERR"), "rank {r}: {line}");
        assert!(
            line.contains("PeerLost") || line.contains("Closed"),
            "rank {r}: {line}"
        );
        assert!(
            line.contains("rank 1"),
            "rank {r} does not name rank 1: {line}"
        );
    }
    assert!(
        took < Duration::from_secs(30),
        "the others took {took:?} to fail"
    );
}

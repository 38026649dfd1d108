//! Tree conformance with ranks as threads of one process (processes: bindings/python/tests and
//! collectives/examples). Every op x dtype x world size x awkward size; mismatches; uneven endings.

use parallel_collectives::ops::{self, Op};
use parallel_engine::ErrorKind;
use parallel_engine::value::DType;
use std::sync::Arc;
use std::time::Duration;

mod common;
use common::{world, world_on};

fn encode(dtype: DType, vals: &[f64]) -> Vec<u8> {
    vals.iter()
        .flat_map(|v| -> Vec<u8> {
            match dtype {
                DType::F32 => (*v as f32).to_le_bytes().to_vec(),
                DType::F64 => v.to_le_bytes().to_vec(),
                DType::F16 => half::f16::from_f64(*v).to_le_bytes().to_vec(),
                DType::BF16 => half::bf16::from_f64(*v).to_le_bytes().to_vec(),
                DType::I32 => (*v as i32).to_le_bytes().to_vec(),
                DType::I64 => (*v as i64).to_le_bytes().to_vec(),
                DType::U8 => vec![*v as u8],
                DType::I8 => vec![*v as i8 as u8],
                DType::I16 => (*v as i16).to_le_bytes().to_vec(),
                DType::U16 => (*v as u16).to_le_bytes().to_vec(),
                DType::U32 => (*v as u32).to_le_bytes().to_vec(),
                DType::U64 => (*v as u64).to_le_bytes().to_vec(),
                DType::Bool => vec![(*v != 0.0) as u8],
                DType::C64 => [(*v as f32).to_le_bytes(), 0f32.to_le_bytes()].concat(),
                DType::C128 => [v.to_le_bytes(), 0f64.to_le_bytes()].concat(),
            }
        })
        .collect()
}

/// Rank r's value at element i: small integers so every op is exact in every dtype.
fn val(r: usize, i: usize) -> f64 {
    ((r * 7 + i * 3) % 5) as f64 + 1.0
}

/// Rank r's value for `op`: products use 1s and 2s, so they stay exact in every dtype (and the
/// reference's order does not matter).
fn val_for(op: &Op, r: usize, i: usize) -> f64 {
    if matches!(op, Op::Prod) {
        1.0 + ((r + i) % 2) as f64
    } else {
        val(r, i)
    }
}

/// The expected result, computed by the reference kernels in rank order.
fn expected(op: &Op, dtype: DType, n: usize, count: usize) -> Vec<u8> {
    let mut acc = encode(
        dtype,
        &(0..count).map(|i| val_for(op, 0, i)).collect::<Vec<_>>(),
    );
    for r in 1..n {
        ops::reduce_into(
            op,
            dtype,
            &mut acc,
            &encode(
                dtype,
                &(0..count).map(|i| val_for(op, r, i)).collect::<Vec<_>>(),
            ),
        )
        .unwrap();
    }
    if matches!(op, Op::Avg) {
        ops::divide(dtype, &mut acc, n);
    }
    acc
}

fn check_all_reduce(n: usize, op: Op, dtype: DType, count: usize) {
    let want = expected(&op, dtype, n, count);
    let op2 = op.clone();
    let res = world(n, move |t| {
        let mut buf = encode(
            dtype,
            &(0..count)
                .map(|i| val_for(&op2, t.rank(), i))
                .collect::<Vec<_>>(),
        );
        let c = t.all_reduce(dtype, &mut buf, &op2)?;
        Ok((c, buf))
    });
    if res.iter().any(|x| x.is_err()) {
        let all: Vec<String> = res
            .iter()
            .enumerate()
            .map(|(r, x)| format!("rank {r}: {:?}", x.as_ref().map(|v| v.0)))
            .collect();
        panic!(
            "{op:?} {dtype:?} x{count} on {n} ranks:\n{}",
            all.join("\n")
        );
    }
    for (r, x) in res.into_iter().enumerate() {
        let (c, buf) =
            x.unwrap_or_else(|e| panic!("rank {r} of {n}, {op:?} {dtype:?} x{count}: {e}"));
        assert_eq!(c, n);
        assert!(
            buf == want,
            "rank {r} of {n}: {op:?} {dtype:?} x{count} differs (TREE-1)"
        );
    }
}

#[test]
fn tree_1_every_world_size_and_awkward_size() {
    for n in [1, 2, 3, 5, 8] {
        for count in [0, 1, 7919, 3 << 20] {
            check_all_reduce(n, Op::Sum, DType::F32, count);
        }
    }
}

/// A buffer larger than the caches takes the ring's streaming stores in its all-gather
/// (`buffer::STREAMING_MIN`): an odd number of elements, so no segment ends on a 64-byte line.
#[test]
fn tree_1_a_buffer_larger_than_the_caches_is_reduced_bitwise_alike() {
    let count = (parallel_engine::buffer::STREAMING_MIN / 4) + 7;
    for n in [2, 3] {
        check_all_reduce(n, Op::Sum, DType::F32, count);
    }
}

#[test]
fn tree_1_every_op_and_dtype_and_world_size() {
    // One world per size; inside it every op x dtype x awkward size, both algorithms (the ring
    // from 256 KiB on). Each rank checks bitwise against the reference reduction in rank order.
    let all = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U16,
        DType::U32,
        DType::U64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::C64,
        DType::C128,
    ];
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
    for n in [1, 2, 3, 5, 8] {
        let ops = ops.clone();
        let res = world(n, move |t| {
            let mut checked = 0;
            for dtype in all {
                for op in &ops {
                    if op.check(dtype).is_err() {
                        continue;
                    }
                    let counts: &[usize] = if dtype == DType::F32 || dtype == DType::U8 {
                        &[0, 1, 7919, 200_003]
                    } else {
                        &[0, 1, 7919]
                    };
                    for &count in counts {
                        let mut buf = encode(
                            dtype,
                            &(0..count)
                                .map(|i| val_for(op, t.rank(), i))
                                .collect::<Vec<_>>(),
                        );
                        let c = t.all_reduce(dtype, &mut buf, op)?;
                        assert_eq!(c, n);
                        assert!(
                            buf == expected(op, dtype, n, count),
                            "rank {} of {n}: {op:?} {dtype:?} x{count} (TREE-1)",
                            t.rank()
                        );
                        checked += 1;
                    }
                }
            }
            Ok(checked)
        });
        for r in res {
            assert!(r.unwrap() > 100);
        }
    }
}

#[test]
fn user_reduce_function() {
    let op = Op::User(Arc::new(|d: &mut [u8], s: &[u8], dt, _n| {
        ops::reduce_into(&Op::Max, dt, d, s)
    }));
    check_all_reduce(5, op.clone(), DType::F32, 1000);
    check_all_reduce(5, op, DType::F32, 1 << 20);
}

#[test]
fn broadcast_reduce_all_gather_barrier() {
    let res = world(5, |t| {
        let r = t.rank();
        let mut b = vec![r as u8; 1000];
        t.broadcast(DType::U8, &mut b, 3)?;
        assert!(b.iter().all(|x| *x == 3));
        let mut x = encode(DType::I64, &[r as f64, 1.0]);
        let n = t.reduce(DType::I64, &mut x, &Op::Sum, 2)?;
        assert_eq!(n, 5);
        if r == 2 {
            assert_eq!(x, encode(DType::I64, &[10.0, 5.0]));
        } else {
            assert_eq!(x, encode(DType::I64, &[r as f64, 1.0]));
        }
        let pieces = t.all_gather(&vec![r as u8; r + 1])?;
        assert_eq!(pieces.len(), 5);
        for (k, (rank, p)) in pieces.iter().enumerate() {
            assert_eq!(*rank, k);
            assert_eq!(p, &vec![k as u8; k + 1]);
        }
        t.barrier()?;
        Ok(())
    });
    for r in res {
        r.unwrap();
    }
}

#[test]
fn tree_2_mismatch_names_the_culprit_on_every_rank() {
    let res = world(3, |t| {
        let count = if t.rank() == 2 { 11 } else { 10 };
        let mut b = vec![0u8; count * 4];
        t.all_reduce(DType::F32, &mut b, &Op::Sum)
    });
    for (r, x) in res.into_iter().enumerate() {
        let e = x.expect_err("mismatch must fail");
        assert_eq!(e.kind(), ErrorKind::Mismatch, "rank {r}: {e}");
        assert!(e.to_string().contains("rank 2"), "rank {r}: {e}");
    }
    let res = world(2, |t| {
        let mut b = vec![0u8; 40];
        if t.rank() == 0 {
            t.all_reduce(DType::F32, &mut b, &Op::Sum).map(|_| ())
        } else {
            t.broadcast(DType::F32, &mut b, 0)
        }
    });
    for x in res {
        assert!(x.unwrap_err().to_string().contains("broadcast"));
    }
}

#[test]
fn tree_4_uneven_endings_report_contributors() {
    // Rank r has r + 1 batches; finished ranks contribute the identity until all are done.
    for n in [2, 3, 5] {
        for count in [100, 300_000] {
            let res = world(n, move |t| {
                let mut seen = Vec::new();
                for step in 0..=t.rank() {
                    let mut b = encode(DType::F64, &vec![1.0; count]);
                    let c = t.all_reduce(DType::F64, &mut b, &Op::Sum)?;
                    let v = f64::from_le_bytes(b[..8].try_into().unwrap());
                    seen.push((step, c, v));
                }
                t.done(None, None)?;
                Ok(seen)
            });
            for (r, x) in res.into_iter().enumerate() {
                for (step, c, v) in x.unwrap_or_else(|e| panic!("n={n} rank {r}: {e}")) {
                    assert_eq!(c, n - step, "n={n} rank {r} step {step}");
                    assert_eq!(v, (n - step) as f64, "n={n} rank {r} step {step}");
                }
            }
        }
    }
}

#[test]
fn tree_3_dead_rank_fails_every_rank_promptly() {
    let t0 = std::time::Instant::now();
    let res = world(3, |t| {
        let mut b = vec![0u8; 64];
        t.all_reduce(DType::F32, &mut b, &Op::Sum)?;
        if t.rank() == 1 {
            drop(t); // rank 1 leaves: its links close
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
        t.all_reduce(DType::F32, &mut b, &Op::Sum).map(|_| ())
    });
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(res[1].is_ok());
    for r in [0, 2] {
        let e = res[r].as_ref().unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::Closed | ErrorKind::PeerLost),
            "rank {r}: {e}"
        );
    }
}

#[test]
fn tree_5_hierarchical_all_reduce_across_simulated_hosts() {
    // 3 "hosts" with 3, 2 and 1 ranks (rank order interleaved); large buffers take the
    // hierarchical path, small ones the tree; every op result is bitwise the same everywhere.
    let hosts = vec!["a", "b", "a", "c", "b", "a"];
    for (count, op) in [
        (300_001usize, Op::Sum),
        (300_001, Op::Avg),
        (1 << 20, Op::Max),
        (5, Op::Sum),
    ] {
        let want = expected(&op, DType::F32, 6, count);
        let op2 = op.clone();
        let res = world_on(6, Some(hosts.clone()), move |t| {
            assert!(t.plan().hierarchical());
            let mut buf = encode(
                DType::F32,
                &(0..count).map(|i| val(t.rank(), i)).collect::<Vec<_>>(),
            );
            t.all_reduce(DType::F32, &mut buf, &op2)?;
            Ok(buf)
        });
        for (r, x) in res.into_iter().enumerate() {
            let buf = x.unwrap_or_else(|e| panic!("rank {r}: {e}"));
            if matches!(op, Op::Avg) {
                // The hierarchy sums in another order than the reference: compare within rounding.
                let a: Vec<f32> = buf
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let b: Vec<f32> = want
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert!(
                    a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-5),
                    "rank {r}"
                );
            } else {
                assert!(buf == want, "rank {r}: {op:?} x{count}");
            }
        }
    }
    // Uneven endings through the hierarchy.
    let res = world_on(6, Some(hosts), |t| {
        for _ in 0..=(t.rank() % 2) {
            let mut b = encode(DType::F64, &vec![1.0; 100_000]);
            let c = t.all_reduce(DType::F64, &mut b, &Op::Sum)?;
            assert_eq!(f64::from_le_bytes(b[..8].try_into().unwrap()), c as f64);
        }
        t.done(None, None)
    });
    for r in res {
        r.unwrap();
    }
}

/// A user op that fails on rank `bad` (whenever that rank applies it), else adds f32s.
fn failing_on(bad: usize, rank: usize) -> Op {
    Op::User(Arc::new(move |d: &mut [u8], s: &[u8], dt, _n| {
        if rank == bad {
            return Err(parallel_engine::Error::new(
                ErrorKind::Worker,
                "all_reduce",
                format!("user op failed on {bad}"),
            ));
        }
        ops::reduce_into(&Op::Sum, dt, d, s)
    }))
}

#[test]
fn tree_6_a_failing_user_op_fails_every_rank_and_the_tree_stays_usable() {
    // Tree path (rank 0 and rank 1, which has child 3, apply the op) and ring (every rank does).
    let n = 4;
    for (bad, count) in [(0, 100), (1, 100), (0, 300_000), (2, 300_000), (3, 300_000)] {
        let res = world(n, move |t| {
            let r = t.rank();
            let mine = encode(DType::F32, &vec![(r + 1) as f64; count]);
            let mut b = mine.clone();
            let e = t
                .all_reduce(DType::F32, &mut b, &failing_on(bad, r))
                .expect_err("the collective must fail on every rank");
            assert_eq!(b, mine, "rank {r}: the buffer changed");
            // The tree stays usable.
            let mut c = mine.clone();
            assert_eq!(t.all_reduce(DType::F32, &mut c, &failing_on(n, r))?, n);
            assert_eq!(c, encode(DType::F32, &vec![10.0; count]));
            Ok(e)
        });
        for (r, x) in res.into_iter().enumerate() {
            let e = x.unwrap_or_else(|e| panic!("bad {bad} x{count}: rank {r}: {e}"));
            assert_eq!(e.kind(), ErrorKind::Worker, "rank {r}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("raised on rank {bad} (user op failed on {bad})")),
                "bad {bad} x{count}: rank {r}: {msg}"
            );
            let cause = std::error::Error::source(&e).map(|c| c.to_string());
            assert_eq!(
                cause.is_some(),
                r == bad,
                "bad {bad} x{count}: rank {r}: only the failing rank has a cause: {cause:?}"
            );
        }
    }
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn tree_4_epochs_on_one_tree_with_every_collective_while_ranks_are_done() {
    // 3 epochs, each with another done() order; in each step every collective runs while some
    // ranks are done. A user max over negative numbers shows that done ranks contribute nothing
    // (a zero would win), in the tree path and in the ring (done ranks relay without the op).
    let orders: [[usize; 3]; 3] = [[1, 2, 3], [3, 1, 0], [0, 2, 2]];
    let user_max = Op::User(Arc::new(|d: &mut [u8], s: &[u8], dt, _n| {
        ops::reduce_into(&Op::Max, dt, d, s)
    }));
    let res = world(3, move |t| {
        let r = t.rank();
        let mut refused = Vec::new();
        for (e, steps) in orders.iter().enumerate() {
            for s in 0..steps[r] {
                let active: Vec<usize> = (0..3).filter(|k| steps[*k] > s).collect();
                let done: Vec<usize> = (0..3).filter(|k| steps[*k] <= s).collect();
                for count in [10, 300_000] {
                    let val = |k: usize| -((k * 10 + e + s + 1) as f64);
                    let mut b = encode(DType::F32, &vec![val(r); count]);
                    assert_eq!(t.all_reduce(DType::F32, &mut b, &user_max)?, active.len());
                    let want = active.iter().map(|k| val(*k)).fold(f64::MIN, f64::max);
                    let got = f32s(&b);
                    assert!(
                        got.iter().all(|x| *x as f64 == want),
                        "r{r} e{e} s{s} x{count}: {} want {want}",
                        got[0]
                    );
                    let mut c = encode(DType::F64, &vec![(r + 1) as f64; count]);
                    t.all_reduce(DType::F64, &mut c, &Op::Sum)?;
                    let sum: usize = active.iter().map(|k| k + 1).sum();
                    assert_eq!(c, encode(DType::F64, &vec![sum as f64; count]));
                }
                let pieces = t.all_gather(&vec![r as u8; r + e])?;
                let ranks: Vec<usize> = pieces.iter().map(|p| p.0).collect();
                assert_eq!(ranks, active, "e{e} s{s}");
                for (k, p) in pieces {
                    assert_eq!(p, vec![k as u8; k + e]);
                }
                assert_eq!(t.barrier()?, active.len());
                let mut b = vec![r as u8; 9];
                t.broadcast(DType::U8, &mut b, active[0])?;
                assert_eq!(b, vec![active[0] as u8; 9]);
                if let Some(&d) = done.first() {
                    let mut b = vec![r as u8; 9];
                    let err = t.broadcast(DType::U8, &mut b, d).unwrap_err();
                    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
                    assert_eq!(b, vec![r as u8; 9]);
                    let err2 = t.reduce(DType::U8, &mut b, &Op::Sum, d).unwrap_err();
                    refused.push((e, s, err.to_string(), err2.to_string()));
                }
            }
            assert_eq!(t.done(None, None)?, served(steps, r));
        }
        Ok(refused)
    });
    let all: Vec<_> = res
        .into_iter()
        .enumerate()
        .map(|(r, x)| x.unwrap_or_else(|e| panic!("rank {r}: {e}")))
        .collect();
    // The same refusal on every rank that called it, naming the done root.
    for (e, s, msg, msg2) in all.iter().flatten() {
        assert!(msg.contains("rank"), "{msg}");
        for other in all.iter().flatten().filter(|x| x.0 == *e && x.1 == *s) {
            assert_eq!(&other.2, msg);
            assert_eq!(&other.3, msg2);
        }
    }
    assert!(all.iter().flatten().count() > 0);
}

/// How many collectives rank r serves after its done() in an epoch with these step counts: per
/// step of the others, 2 sizes x 2 all-reduces, all_gather, barrier, broadcast, and (some rank
/// being done) the two refused calls. Extra rounds inside an all-reduce are not counted.
fn served(steps: &[usize; 3], r: usize) -> usize {
    let last = *steps.iter().max().unwrap();
    (steps[r]..last).map(|_| 4 + 3 + 2).sum()
}

#[test]
fn tree_4_a_done_rank_keeps_builtin_ops_and_counts_grouped_calls_once() {
    // Rank 0 (the root, combining its children's data) is done with a user sum; the others call
    // built-in ops (never to be replaced by the sum), and one call of two dtype groups.
    let res = world(3, |t| {
        if t.rank() == 0 {
            let add = Op::User(Arc::new(|d: &mut [u8], s: &[u8], dt, _n| {
                ops::reduce_into(&Op::Sum, dt, d, s)
            }));
            return Ok(vec![t.done(Some(&add), None)? as f64]);
        }
        let bits: i16 = if t.rank() == 1 { 0b011 } else { 0b110 };
        let mut b: Vec<u8> = [bits; 5].iter().flat_map(|v| v.to_le_bytes()).collect();
        t.all_reduce(DType::I16, &mut b, &Op::Bor)?;
        let or = i16::from_le_bytes([b[0], b[1]]) as f64;
        let mut m = encode(DType::F32, &[t.rank() as f64 * 10.0; 4]);
        t.all_reduce(DType::F32, &mut m, &Op::Max)?;
        let mut f = encode(DType::F32, &[1.0; 3]);
        let mut i = encode(DType::I64, &[2.0; 3]);
        t.with_structure(7, || -> parallel_engine::Result<()> {
            t.all_reduce(DType::F32, &mut f, &Op::Sum)?;
            t.all_reduce(DType::I64, &mut i, &Op::Sum)?;
            Ok(())
        })?;
        assert_eq!(f, encode(DType::F32, &[2.0; 3]));
        assert_eq!(i, encode(DType::I64, &[4.0; 3]));
        t.done(None, None)?;
        Ok(vec![or, f32s(&m)[0] as f64])
    });
    let res: Vec<Vec<f64>> = res.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(res[0], vec![3.0], "done() counts the two-group call once");
    for r in &res[1..] {
        assert_eq!(r, &vec![7.0, 20.0], "bor and max while rank 0 is done");
    }
}

/// Part `r` of `n` equal parts of `buf`.
fn part_of(buf: &[u8], r: usize, n: usize) -> &[u8] {
    let each = buf.len() / n;
    &buf[r * each..(r + 1) * each]
}

#[test]
fn tree_5_reduce_scatter_gives_each_rank_its_part_also_while_ranks_are_done() {
    // Rank r has r + 1 steps; a finished rank contributes the identity (sum 0, max -inf).
    for n in [2, 3, 4] {
        for count in [0, 1, 1000, 100_000] {
            let res = world(n, move |t| {
                let mut seen = Vec::new();
                for _ in 0..=t.rank() {
                    for op in [Op::Sum, Op::Max, Op::Avg] {
                        let vals: Vec<f64> = (0..count * n).map(|i| val(t.rank(), i)).collect();
                        let mut b = encode(DType::F64, &vals);
                        let c = t.reduce_scatter(DType::F64, &mut b, &op)?;
                        seen.push((op.clone(), c, part_of(&b, t.rank(), n).to_vec()));
                    }
                }
                t.done(None, None)?;
                Ok(seen)
            });
            for (r, x) in res.into_iter().enumerate() {
                let x = x.unwrap_or_else(|e| panic!("n={n} count={count} rank {r}: {e}"));
                for (op, c, got) in x {
                    // The contributors are ranks c.. - (n - c) finished: ranks 0..n-c-1 are done.
                    let live: Vec<usize> = (n - c..n).collect();
                    let want: Vec<f64> = (r * count..(r + 1) * count)
                        .map(|i| {
                            let v = live.iter().map(|&q| val(q, i));
                            match op {
                                Op::Sum => v.sum(),
                                Op::Max => v.fold(f64::MIN, f64::max),
                                _ => v.sum::<f64>() / c as f64,
                            }
                        })
                        .collect();
                    assert_eq!(
                        got,
                        encode(DType::F64, &want),
                        "n={n} count={count} rank {r} {op:?} c={c}"
                    );
                }
            }
        }
    }
}

#[test]
fn tree_5_all_gather_into_gives_every_rank_every_piece_and_refuses_while_ranks_are_done() {
    for n in [2, 3] {
        let res = world(n, move |t| {
            let count = 50_001 * n;
            let mut b = vec![0xEEu8; count * 4];
            let each = b.len() / n;
            for (i, x) in b[t.rank() * each..(t.rank() + 1) * each]
                .iter_mut()
                .enumerate()
            {
                *x = (t.rank() * 31 + i) as u8;
            }
            t.all_gather_into(DType::F32, &mut b)?;
            // Rank 0 is done for the rest of the epoch: the others' all_gather_into fails on each.
            let refused = if t.rank() == 0 {
                t.done(None, None)?;
                None
            } else {
                let mut c = vec![0u8; 4 * n];
                let e = t.all_gather_into(DType::F32, &mut c).unwrap_err();
                let again = t.all_gather_into(DType::F32, &mut c).unwrap_err();
                t.done(None, None)?;
                Some((e.kind(), e.to_string(), again.kind()))
            };
            Ok((b, refused))
        });
        for (r, x) in res.into_iter().enumerate() {
            let (b, refused) = x.unwrap_or_else(|e| panic!("n={n} rank {r}: {e}"));
            for q in 0..n {
                let want: Vec<u8> = (0..b.len() / n).map(|i| (q * 31 + i) as u8).collect();
                assert!(
                    part_of(&b, q, n) == want.as_slice(),
                    "n={n} rank {r}: part {q} differs"
                );
            }
            if let Some((k, msg, k2)) = refused {
                assert_eq!(k, ErrorKind::Unsupported, "{msg}");
                assert!(msg.contains("use all_gather"), "{msg}");
                assert_eq!(
                    k2,
                    ErrorKind::Unsupported,
                    "the tree stays usable after the refusal"
                );
            }
        }
    }
}

#[test]
fn tree_5_reduce_scatter_against_all_reduce_or_unequal_parts_is_an_error_on_every_rank() {
    let res = world(2, |t| {
        let mut b = encode(DType::F32, &[1.0; 8]);
        let mixed = if t.rank() == 0 {
            t.reduce_scatter(DType::F32, &mut b, &Op::Sum)
        } else {
            t.all_reduce(DType::F32, &mut b, &Op::Sum)
        };
        let mut odd = encode(DType::F32, &[1.0; 3]);
        let unequal = t
            .reduce_scatter(DType::F32, &mut odd, &Op::Sum)
            .unwrap_err();
        let user = Op::User(Arc::new(|_, _, _, _| Ok(())));
        let with_fn = t.reduce_scatter(DType::F32, &mut b, &user).unwrap_err();
        // Still usable: a reduce_scatter on both.
        let mut ok = encode(DType::F32, &[2.0; 8]);
        t.reduce_scatter(DType::F32, &mut ok, &Op::Sum)?;
        Ok((
            mixed.unwrap_err(),
            unequal,
            with_fn,
            part_of(&ok, t.rank(), 2).to_vec(),
        ))
    });
    for (r, x) in res.into_iter().enumerate() {
        let (mixed, unequal, with_fn, ok) = x.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        assert_eq!(mixed.kind(), ErrorKind::Mismatch, "rank {r}: {mixed}");
        assert!(mixed.to_string().contains("reduce_scatter"), "{mixed}");
        assert_eq!(unequal.kind(), ErrorKind::Config, "{unequal}");
        assert_eq!(with_fn.kind(), ErrorKind::Unsupported, "{with_fn}");
        assert_eq!(ok, encode(DType::F32, &[4.0; 4]));
    }
}

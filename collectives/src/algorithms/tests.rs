//! Each algorithm function against a straightforward reference: random inputs, 2..5 ranks as
//! threads of this process joined by real links (a Tree's rendezvous), small pipeline chunks so
//! that every step runs many chunks.

use super::*;
use crate::ops::{self, Op};
use crate::plan::Probe;
use crate::rendezvous::TreeOptions;
use crate::{Algo, Tree};
use parallel_engine::value::{DType, Device};
use std::time::Duration;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `f(tree)` on `n` ranks (threads), rank r reporting host `hosts[r]`; results in rank order.
pub(crate) fn world<T: Send + 'static>(
    n: usize,
    hosts: Option<&'static [&'static str]>,
    f: impl Fn(Tree) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let port = free_port();
    let f = Arc::new(f);
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let f = f.clone();
            std::thread::spawn(move || {
                let t = Tree::new(TreeOptions {
                    rank: Some(r),
                    world_size: Some(n),
                    root: Some(format!("127.0.0.1:{port}")),
                    timeout: Some(Duration::from_secs(30)),
                    host: hosts.map(|h| h[r].to_string()),
                    ..Default::default()
                })
                .unwrap();
                f(t)
            })
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

/// Deterministic pseudo-random i64s in [-1000, 1000) for `rank`'s input (xorshift).
fn input(rank: usize, count: usize, seed: u64) -> Vec<i64> {
    let mut x = seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(rank as u64 + 1));
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % 2000) as i64 - 1000
        })
        .collect()
}

fn bytes(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The reference: every rank's input, reduced element by element with `op`, in rank order.
fn reference(n: usize, count: usize, seed: u64, op: &Op) -> Vec<u8> {
    let mut acc = bytes(&input(0, count, seed));
    for r in 1..n {
        ops::reduce_into(op, DType::I64, &mut acc, &bytes(&input(r, count, seed))).unwrap();
    }
    acc
}

/// The awkward sizes every algorithm runs: none, one, fewer than the ranks, a prime, many chunks.
const COUNTS: [usize; 5] = [0, 1, 3, 101, 2053];

fn small_chunks(t: &mut Tree) {
    t.tuning_mut().chunk = 64;
}

#[test]
fn algo_1_ring_all_reduce_equals_the_reference_on_2_to_5_ranks() {
    for n in 2..=5 {
        let got = world(n, None, move |mut t| {
            small_chunks(&mut t);
            let comm = t.comm(t.deadline());
            let mut out = Vec::new();
            for (i, &count) in COUNTS.iter().enumerate() {
                for op in [Op::Sum, Op::Max] {
                    let mut buf = bytes(&input(t.rank(), count, i as u64 + 7));
                    let ring = t.plan().ring.clone();
                    ring::all_reduce(&comm, &ring, DType::I64, &mut buf, &op, n).unwrap();
                    out.push(buf);
                }
            }
            out
        });
        let mut k = 0;
        for (i, &count) in COUNTS.iter().enumerate() {
            for op in [Op::Sum, Op::Max] {
                let want = reference(n, count, i as u64 + 7, &op);
                for (r, g) in got.iter().enumerate() {
                    assert!(
                        g[k] == want,
                        "{n} ranks, {count} x i64, {op:?}: rank {r} differs"
                    );
                }
                k += 1;
            }
        }
    }
}

#[test]
fn algo_1_ring_all_reduce_avg_divides_by_the_contributors() {
    let got = world(3, None, |mut t| {
        small_chunks(&mut t);
        let comm = t.comm(t.deadline());
        let mut buf: Vec<u8> = (0..40)
            .flat_map(|i| (i as f64 * (t.rank() + 1) as f64).to_le_bytes())
            .collect();
        let ring = t.plan().ring.clone();
        ring::all_reduce(&comm, &ring, DType::F64, &mut buf, &Op::Avg, 3).unwrap();
        buf
    });
    let want: Vec<u8> = (0..40)
        .flat_map(|i| (i as f64 * 2.0).to_le_bytes())
        .collect();
    for g in &got {
        assert_eq!(g, &want, "(1 + 2 + 3) i / 3 = 2 i");
    }
}

/// Part `r` of `n` equal parts of a buffer of `count` elements of `item` bytes.
fn part(r: usize, n: usize, count: usize, item: usize) -> std::ops::Range<usize> {
    let each = count / n * item;
    r * each..(r + 1) * each
}

#[test]
fn algo_4_ring_reduce_scatter_leaves_each_rank_its_reduced_part_on_2_to_5_ranks() {
    for n in 2..=5 {
        let counts: Vec<usize> = [0, 1, 3, 101, 2053].iter().map(|c| c * n).collect();
        let cs = counts.clone();
        let got = world(n, None, move |mut t| {
            small_chunks(&mut t);
            let comm = t.comm(t.deadline());
            let mut out = Vec::new();
            for (i, &count) in cs.iter().enumerate() {
                for op in [Op::Sum, Op::Min] {
                    let mut buf = bytes(&input(t.rank(), count, i as u64 + 11));
                    // The plan's ring reversed: ring positions are not ranks.
                    let ring: Vec<usize> = t.plan().ring.iter().rev().copied().collect();
                    ring::reduce_scatter(&comm, &ring, DType::I64, &mut buf, &op, n).unwrap();
                    out.push(buf[part(t.rank(), n, count, 8)].to_vec());
                }
            }
            out
        });
        let mut k = 0;
        for (i, &count) in counts.iter().enumerate() {
            for op in [Op::Sum, Op::Min] {
                let want = reference(n, count, i as u64 + 11, &op);
                for (r, g) in got.iter().enumerate() {
                    assert!(
                        g[k] == want[part(r, n, count, 8)],
                        "{n} ranks, {count} x i64, {op:?}: rank {r}'s part differs"
                    );
                }
                k += 1;
            }
        }
    }
}

#[test]
fn algo_4_ring_all_gather_gives_every_rank_every_part_on_2_to_5_ranks() {
    for n in 2..=5 {
        let counts: Vec<usize> = [0, 1, 3, 101, 2053].iter().map(|c| c * n).collect();
        let cs = counts.clone();
        let got = world(n, None, move |mut t| {
            small_chunks(&mut t);
            let comm = t.comm(t.deadline());
            let mut out = Vec::new();
            for (i, &count) in cs.iter().enumerate() {
                // Only this rank's part holds its piece; the rest is garbage to be overwritten.
                let mut buf = vec![0xA5u8; count * 8];
                let mine = part(t.rank(), n, count, 8);
                buf[mine.clone()].copy_from_slice(&bytes(&input(t.rank(), count, i as u64))[mine]);
                // The plan's ring reversed: ring positions are not ranks (links exist only
                // between ring neighbours).
                let ring: Vec<usize> = t.plan().ring.iter().rev().copied().collect();
                ring::all_gather(&comm, &ring, DType::I64, &mut buf).unwrap();
                out.push(buf);
            }
            out
        });
        for (i, &count) in counts.iter().enumerate() {
            let mut want = vec![0u8; count * 8];
            for r in 0..n {
                let p = part(r, n, count, 8);
                want[p.clone()].copy_from_slice(&bytes(&input(r, count, i as u64))[p]);
            }
            for (r, g) in got.iter().enumerate() {
                assert!(g[i] == want, "{n} ranks, {count} x i64: rank {r} differs");
            }
        }
    }
}

#[test]
fn algo_4_parts_that_do_not_divide_or_a_ring_that_is_not_the_world_are_errors() {
    let got = world(2, None, |t| {
        let comm = t.comm(t.deadline());
        let mut odd = vec![0u8; 3 * 8];
        let a = ring::reduce_scatter(&comm, &[0, 1], DType::I64, &mut odd, &Op::Sum, 2);
        let mut buf = vec![0u8; 4 * 8];
        let b = ring::all_gather(&comm, &[0, 0], DType::I64, &mut buf);
        (a.unwrap_err().to_string(), b.unwrap_err().to_string())
    });
    for (a, b) in got {
        assert!(a.contains("cannot be cut"), "{a}");
        assert!(b.contains("cannot be cut"), "{b}");
    }
}

#[test]
fn algo_3_ring_without_this_rank_is_an_error_not_a_panic() {
    let got = world(2, None, |t| {
        let comm = t.comm(t.deadline());
        let mut buf = vec![0u8; 16];
        ring::all_reduce(&comm, &[7, 8], DType::I64, &mut buf, &Op::Sum, 2)
    });
    for r in got {
        let e = r.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
        assert!(e.to_string().contains("not in the ring"), "{e}");
    }
}

#[test]
fn algo_1_hierarchical_all_reduce_equals_the_reference_across_simulated_hosts() {
    const HOSTS4: &[&str] = &["a", "b", "a", "b"];
    const HOSTS5: &[&str] = &["a", "a", "b", "b", "b"];
    for hosts in [HOSTS4, HOSTS5] {
        let n = hosts.len();
        let got = world(n, Some(hosts), move |mut t| {
            small_chunks(&mut t);
            assert!(t.plan().hierarchical());
            let comm = t.comm(t.deadline());
            let plan = t.plan().clone();
            COUNTS
                .iter()
                .enumerate()
                .map(|(i, &count)| {
                    let mut buf = bytes(&input(t.rank(), count, i as u64 + 11));
                    hierarchical::all_reduce(&comm, &plan, DType::I64, &mut buf, &Op::Sum, n)
                        .unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for (i, &count) in COUNTS.iter().enumerate() {
            let want = reference(n, count, i as u64 + 11, &Op::Sum);
            for (r, g) in got.iter().enumerate() {
                assert!(
                    g[i] == want,
                    "hosts {hosts:?}, {count} x i64: rank {r} differs"
                );
            }
        }
    }
}

/// A CPU tensor header over `v`'s bytes (the test keeps `v` alive while it is used).
fn cpu_tensor(v: &mut [u8]) -> Tensor {
    // SAFETY: `v` outlives every use of the header in these tests, which borrow it exclusively.
    unsafe {
        Tensor::from_raw(
            DType::I64,
            vec![v.len() / 8],
            None,
            Device::Cpu,
            v.as_mut_ptr(),
            v.len(),
            keep(),
        )
    }
}

#[test]
fn algo_1_tree_all_reduce_with_the_cpu_kernel_equals_the_reference() {
    for n in 2..=5 {
        let got = world(n, None, |t| {
            let comm = t.comm(t.deadline());
            let (parent, children) = (
                t.plan().parent[t.rank()],
                t.plan().children[t.rank()].clone(),
            );
            COUNTS
                .iter()
                .enumerate()
                .map(|(i, &count)| {
                    let mut buf = bytes(&input(t.rank(), count, i as u64 + 3));
                    let mut tmp = vec![0u8; buf.len()];
                    let (bp, tp, len) = (buf.as_mut_ptr(), tmp.as_ptr(), buf.len());
                    let mine = cpu_tensor(&mut buf);
                    let mut scratch = cpu_tensor(&mut tmp);
                    tree::all_reduce(&comm, parent, &children, mine, &mut scratch, |_, _| {
                        // SAFETY: both buffers hold `len` bytes and outlive the call.
                        let (d, s) = unsafe {
                            (
                                std::slice::from_raw_parts_mut(bp, len),
                                std::slice::from_raw_parts(tp, len),
                            )
                        };
                        ops::reduce_into(&Op::Sum, DType::I64, d, s)
                    })
                    .unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for (i, &count) in COUNTS.iter().enumerate() {
            let want = reference(n, count, i as u64 + 3, &Op::Sum);
            for (r, g) in got.iter().enumerate() {
                assert!(g[i] == want, "{n} ranks, {count} x i64: rank {r} differs");
            }
        }
    }
}

#[test]
fn algo_1_tree_broadcast_from_every_root_gives_every_rank_the_roots_bytes() {
    for n in 2..=5 {
        let got = world(n, None, move |t| {
            let comm = t.comm(t.deadline());
            let plan = t.plan().clone();
            (0..n)
                .map(|root| {
                    let mut buf = bytes(&input(t.rank(), 101, root as u64));
                    tree::broadcast(&comm, &plan, root, cpu_tensor(&mut buf)).unwrap();
                    buf
                })
                .collect::<Vec<_>>()
        });
        for root in 0..n {
            let want = bytes(&input(root, 101, root as u64));
            for (r, g) in got.iter().enumerate() {
                assert!(g[root] == want, "{n} ranks, root {root}: rank {r} differs");
            }
        }
    }
}

fn probe(rank: usize, host: &str) -> Probe {
    Probe {
        rank,
        host_id: host.into(),
        hostname: host.into(),
        addr: "127.0.0.1".into(),
        port: 1000 + rank as u16,
        cores: 2,
        numa_nodes: 1,
        pid: 1,
        gpus: Vec::new(),
    }
}

#[test]
fn algo_choose_picks_by_size_and_topology() {
    let one_host = Plan::build((0..4).map(|r| probe(r, "h")).collect()).unwrap();
    let two_hosts = Plan::build(
        ["a", "b", "a", "b"]
            .iter()
            .enumerate()
            .map(|(r, h)| probe(r, h))
            .collect(),
    )
    .unwrap();
    let single = Plan::build(vec![probe(0, "h")]).unwrap();
    let auto = Tuning {
        ring_threshold: 1000,
        chunk: 1 << 20,
        device_chunk: 1 << 20,
        algo: Algo::Auto,
    };
    assert_eq!(choose(&one_host, &auto, 999), Algorithm::Tree);
    assert_eq!(choose(&one_host, &auto, 1000), Algorithm::Ring);
    assert_eq!(choose(&two_hosts, &auto, 999), Algorithm::Tree);
    assert_eq!(choose(&two_hosts, &auto, 1 << 20), Algorithm::Hierarchical);
    assert_eq!(
        choose(&single, &auto, 1 << 20),
        Algorithm::Tree,
        "one rank: nothing to ring"
    );
    let ring = Tuning {
        algo: Algo::Ring,
        ..auto.clone()
    };
    assert_eq!(choose(&one_host, &ring, 0), Algorithm::Ring);
    let tree = Tuning {
        algo: Algo::Tree,
        ..auto
    };
    assert_eq!(choose(&two_hosts, &tree, 1 << 30), Algorithm::Tree);
}

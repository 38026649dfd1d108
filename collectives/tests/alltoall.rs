//! The Tree's all-to-all with ranks as threads joined by real links: random uneven piece sizes
//! (zero included) against what each rank must receive computed independently from the senders'
//! generator, mismatches on every rank, uneven endings (TA2A-1, TA2A-2, TA2A-3, A2A-1).

use parallel_collectives::ops::Op;
use parallel_engine::ErrorKind;
use parallel_engine::value::DType;

mod common;
use common::world;

/// A deterministic hash of (round, sender, receiver, salt).
fn mix(round: usize, s: usize, d: usize, salt: u64) -> u64 {
    let mut x = (round as u64) << 40 ^ (s as u64) << 20 ^ d as u64 ^ salt;
    x = x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 29;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^ (x >> 32)
}

/// How many i32 elements sender `s` sends receiver `d` in `round`: often 0, sometimes large
/// enough to take many link frames.
fn elements(round: usize, s: usize, d: usize) -> usize {
    match mix(round, s, d, 1) % 8 {
        0 | 1 => 0,
        2 => 1,
        3 => 200_000 + (mix(round, s, d, 2) % 1000) as usize,
        _ => (mix(round, s, d, 3) % 5000) as usize,
    }
}

/// Sender `s`'s piece for `d` in `round`, as bytes (i32 elements that name the pair).
fn piece(round: usize, s: usize, d: usize) -> Vec<u8> {
    (0..elements(round, s, d))
        .flat_map(|i| {
            ((mix(round, s, d, i as u64) as i32) ^ (s as i32 * 1000 + d as i32)).to_le_bytes()
        })
        .collect()
}

/// One rank's all-to-all of `round`; returns what it received and the ranks that took part.
fn exchange(
    t: &parallel_collectives::Tree,
    round: usize,
) -> parallel_engine::Result<(Vec<Vec<u8>>, Vec<usize>)> {
    let (me, n) = (t.rank(), t.world_size());
    let sends: Vec<Vec<u8>> = (0..n).map(|d| piece(round, me, d)).collect();
    let send_refs: Vec<&[u8]> = sends.iter().map(|v| &v[..]).collect();
    // Outputs pre-filled with a marker, sized from the senders' generator.
    let mut outs: Vec<Vec<u8>> = (0..n)
        .map(|s| vec![0xEE; 4 * elements(round, s, me)])
        .collect();
    let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
    let took = t.all_to_all(DType::I32, &send_refs, &mut out_refs)?;
    Ok((outs, took))
}

#[test]
fn a2a_1_random_uneven_pieces_arrive_whole_on_1_2_3_and_4_ranks() {
    for n in [1, 2, 3, 4] {
        let res = world(n, move |t| {
            let mut got = Vec::new();
            for round in 0..4 {
                got.push(exchange(&t, round)?);
                // A collective on the tree's links between two exchanges stays in step.
                let mut b = vec![0u8; 8];
                t.all_reduce(DType::F32, &mut b, &Op::Sum)?;
            }
            let kinds: Vec<&str> = t.stats().iter().map(|l| l.kind).collect();
            Ok((got, kinds))
        });
        for (me, r) in res.into_iter().enumerate() {
            let (rounds, kinds) = r.unwrap_or_else(|e| panic!("n={n} rank {me}: {e}"));
            assert_eq!(
                kinds.len(),
                n - 1,
                "n={n} rank {me}: a link to every other rank"
            );
            for (round, (outs, took)) in rounds.into_iter().enumerate() {
                assert_eq!(took, (0..n).collect::<Vec<_>>());
                for (s, out) in outs.iter().enumerate() {
                    assert!(
                        *out == piece(round, s, me),
                        "n={n} round {round}: rank {me}'s piece from rank {s} differs ({} bytes)",
                        out.len()
                    );
                }
            }
        }
    }
}

#[test]
fn tree_2_all_to_all_size_disagreement_is_a_mismatch_on_every_rank_and_the_tree_stays_usable() {
    let res = world(3, |t| {
        let me = t.rank();
        let sends: Vec<Vec<u8>> = (0..3).map(|d| vec![d as u8; 8 * (me + 1)]).collect();
        let send_refs: Vec<&[u8]> = sends.iter().map(|v| &v[..]).collect();
        // Rank 1 expects 2 elements less from rank 2 than rank 2 sends.
        let mut outs: Vec<Vec<u8>> = (0..3)
            .map(|s| vec![7u8; 8 * (s + 1) - if me == 1 && s == 2 { 8 } else { 0 }])
            .collect();
        let before = outs.clone();
        let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
        let bad = t.all_to_all(DType::F32, &send_refs, &mut out_refs);
        let untouched = outs == before;
        // Another dtype on one rank, and another collective on one rank.
        let mut none: Vec<&mut [u8]> = (0..3).map(|_| &mut [][..]).collect();
        let empty: Vec<&[u8]> = vec![&[]; 3];
        let dtype = if me == 0 { DType::I64 } else { DType::F32 };
        let dt = t.all_to_all(dtype, &empty, &mut none);
        let other = if me == 2 {
            t.barrier().map(|_| vec![])
        } else {
            t.all_to_all(DType::F32, &empty, &mut none)
        };
        // Still usable: a correct exchange.
        let mut outs: Vec<Vec<u8>> = (0..3).map(|s| vec![0u8; 8 * (s + 1)]).collect();
        let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
        t.all_to_all(DType::F32, &send_refs, &mut out_refs)?;
        let ok = outs.iter().all(|o| o.iter().all(|b| *b as usize == me));
        Ok((bad, untouched, dt, other, ok))
    });
    for (r, x) in res.into_iter().enumerate() {
        let (bad, untouched, dt, other, ok) = x.unwrap_or_else(|e| panic!("rank {r}: {e}"));
        let e = bad.expect_err("a size disagreement must fail");
        assert_eq!(e.kind(), ErrorKind::Mismatch, "rank {r}: {e}");
        assert!(
            e.to_string().contains("rank 2 sends 24 bytes to rank 1"),
            "rank {r}: {e}"
        );
        assert!(
            untouched,
            "rank {r}: an output changed in a failed all_to_all"
        );
        let e = dt.expect_err("another dtype must fail");
        assert_eq!(e.kind(), ErrorKind::Mismatch, "rank {r}: {e}");
        assert!(e.to_string().contains("all_to_all(int64)"), "rank {r}: {e}");
        let e = other.expect_err("another collective must fail");
        assert_eq!(e.kind(), ErrorKind::Mismatch, "rank {r}: {e}");
        assert!(e.to_string().contains("barrier"), "rank {r}: {e}");
        assert!(ok, "rank {r}: the exchange after the mismatches went wrong");
    }
}

#[test]
fn tree_4_a_done_rank_takes_no_piece_and_the_others_outputs_for_it_stay() {
    // 4 ranks (their tree and ring leave ranks 1 and 3 without a link): rank 3 is done before
    // the first all-to-all, so it helps make the mesh without exchanging; then a full one.
    let res = world(4, |t| {
        let me = t.rank();
        let mut log = Vec::new();
        if me == 3 {
            let served = t.done(None, None)?;
            log.push((served, Vec::new(), Vec::new()));
        } else {
            let sends: Vec<Vec<u8>> = (0..4).map(|d| vec![(10 * me + d) as u8; 4]).collect();
            let send_refs: Vec<&[u8]> = sends.iter().map(|v| &v[..]).collect();
            let mut outs = vec![vec![0xEEu8; 4]; 4];
            let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
            let took = t.all_to_all(DType::U8, &send_refs, &mut out_refs)?;
            log.push((0, took, outs));
            t.done(None, None)?;
        }
        let (outs, _) = exchange(&t, 9)?;
        Ok((log, outs))
    });
    for (me, x) in res.into_iter().enumerate() {
        let (log, outs) = x.unwrap_or_else(|e| panic!("rank {me}: {e}"));
        if me == 3 {
            assert_eq!(log[0].0, 1, "rank 3 served one all-to-all");
        } else {
            let (_, took, outs) = &log[0];
            assert_eq!(took, &vec![0, 1, 2]);
            for (s, out) in outs.iter().enumerate().take(3) {
                assert_eq!(*out, vec![(10 * s + me) as u8; 4], "rank {me} from {s}");
            }
            assert_eq!(
                outs[3],
                vec![0xEE; 4],
                "rank {me}: the done rank's output changed"
            );
        }
        for (s, out) in outs.iter().enumerate() {
            assert!(
                *out == piece(9, s, me),
                "rank {me}: piece from rank {s} after the epoch"
            );
        }
    }
}

//! Decoding of control messages: round trips, and truncated, garbled, foreign-version and
//! inconsistent frames, each a `Protocol` error naming the peer, never a panic (CTRL-1, CTRL-2).

use super::*;

const FROM: usize = 3;
const WORLD: usize = 5;

fn meta() -> Meta {
    Meta {
        kind: Kind::AllReduce,
        op: "sum".into(),
        dtype: Some(DType::F32),
        count: 2,
        root: 0,
        gpu: false,
        sig: 0xfeed,
        cont: true,
        algo: Algorithm::Ring,
    }
}

fn up_bytes() -> (Vec<u8>, Vec<Seg>) {
    let up = Up {
        seq: 7,
        caller: 4,
        active: 2,
        meta: Some(meta()),
        idle: vec![1],
        ..Default::default()
    };
    let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
    let pieces = vec![(2, vec![9u8, 9]), (4, vec![])];
    let msg = Outgoing::Up {
        up: &up,
        data: vec![&data[..]],
        pieces: &pieces,
    };
    let (ctrl, segs) = encode(&msg).unwrap();
    (ctrl, owned(segs))
}

fn owned(segs: Vec<&[u8]>) -> Vec<Seg> {
    segs.into_iter().map(|s| Seg::Owned(s.to_vec())).collect()
}

fn copy(segs: &[Seg]) -> Vec<Seg> {
    segs.iter().map(|s| Seg::Owned(s.to_vec())).collect()
}

fn assert_protocol_naming_peer(r: Result<Control>, what: &str) {
    let e = r.expect_err(what);
    assert_eq!(e.kind(), ErrorKind::Protocol, "{what}: {e}");
    assert!(e.to_string().contains("rank 3"), "{what}: {e}");
}

#[test]
fn ctrl_1_a_report_round_trips_with_its_segments() {
    let (ctrl, segs) = up_bytes();
    let Control::Up(up) = decode(FROM, WORLD, &ctrl, segs).unwrap() else {
        panic!("a report decoded as a verdict");
    };
    assert_eq!((up.seq, up.caller, up.active), (7, 4, 2));
    assert_eq!(up.meta, Some(meta()));
    assert_eq!(up.idle, vec![1]);
    assert_eq!(
        up.data.into_iter().map(Seg::into_vec).collect::<Vec<_>>(),
        vec![vec![1u8, 2, 3, 4, 5, 6, 7, 8]]
    );
    assert_eq!(up.pieces, vec![(2, vec![9u8, 9]), (4, vec![])]);
}

#[test]
fn ctrl_1_a_verdict_round_trips_and_a_failed_one_carries_no_data() {
    let v = Verdict {
        contributors: 4,
        meta: Some(meta()),
        parts: vec![vec![1; 8], vec![2; 8]],
        pieces: vec![(0, vec![5])],
        ..Default::default()
    };
    let msg = Outgoing::Down {
        seq: 9,
        verdict: &v,
    };
    let (ctrl, segs) = encode(&msg).unwrap();
    let segs = owned(segs);
    let Control::Down { seq, verdict } = decode(FROM, WORLD, &ctrl, segs).unwrap() else {
        panic!("a verdict decoded as a report");
    };
    assert_eq!((seq, verdict.contributors), (9, 4));
    assert_eq!(verdict.data, None);
    assert_eq!(verdict.parts, v.parts);
    assert_eq!(verdict.pieces, v.pieces);

    let failed = Verdict {
        error: Some((ErrorKind::Config, "its root is done".into())),
        data: Some(vec![1; 8]),
        ..Default::default()
    };
    let msg = Outgoing::Down {
        seq: 1,
        verdict: &failed,
    };
    let (ctrl, segs) = encode(&msg).unwrap();
    assert!(segs.is_empty(), "a failed verdict sends no data (TREE-2)");
    let Control::Down { verdict, .. } = decode(FROM, WORLD, &ctrl, Vec::new()).unwrap() else {
        panic!("a verdict decoded as a report");
    };
    assert_eq!(verdict.error, failed.error);
    assert_eq!(verdict.data, None);
}

#[test]
fn ctrl_1_every_truncation_is_a_protocol_error_naming_the_peer() {
    let (ctrl, segs) = up_bytes();
    for n in 0..ctrl.len() {
        assert_protocol_naming_peer(
            decode(FROM, WORLD, &ctrl[..n], copy(&segs)),
            &format!("control bytes cut to {n} of {}", ctrl.len()),
        );
    }
}

#[test]
fn ctrl_1_garbled_bytes_never_panic_and_fail_as_protocol_errors() {
    let (ctrl, segs) = up_bytes();
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    let mut failed = 0;
    for i in HEADER..ctrl.len() {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = ctrl.clone();
            bad[i] ^= flip;
            if let Err(e) = decode(FROM, WORLD, &bad, copy(&segs)) {
                assert_eq!(e.kind(), ErrorKind::Protocol, "byte {i} ^ {flip:#x}: {e}");
                assert!(e.to_string().contains("rank 3"), "{e}");
                failed += 1;
            }
        }
    }
    assert!(failed > 0, "no flipped byte was caught");
    // Random bytes after a valid header.
    for len in [0usize, 1, 7, 64, 300] {
        let mut junk = ctrl[..HEADER].to_vec();
        junk.extend((0..len).map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        }));
        assert_protocol_naming_peer(decode(FROM, WORLD, &junk, copy(&segs)), "random bytes");
    }
}

#[test]
fn ctrl_2_another_protocol_version_is_named_as_such() {
    let (mut ctrl, segs) = up_bytes();
    ctrl[4..6].copy_from_slice(&(VERSION + 1).to_le_bytes());
    let e = decode(FROM, WORLD, &ctrl, segs).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    let msg = e.to_string();
    assert!(msg.contains("rank 3"), "{msg}");
    assert!(msg.contains(&format!("version {}", VERSION + 1)), "{msg}");
    assert!(msg.contains("same Parallel version"), "{msg}");
}

#[test]
fn ctrl_1_a_user_value_is_never_taken_for_control() {
    let (mut ctrl, segs) = up_bytes();
    ctrl[..4].copy_from_slice(b"user");
    assert_protocol_naming_peer(decode(FROM, WORLD, &ctrl, segs), "no magic");
}

#[test]
fn ctrl_1_segments_that_disagree_with_the_control_bytes_are_refused() {
    let (ctrl, mut segs) = up_bytes();
    segs.pop();
    assert_protocol_naming_peer(decode(FROM, WORLD, &ctrl, copy(&segs)), "a segment short");
    segs.push(Seg::Owned(vec![]));
    segs.push(Seg::Owned(vec![]));
    assert_protocol_naming_peer(decode(FROM, WORLD, &ctrl, segs), "a segment too many");
}

#[test]
fn ctrl_1_ranks_and_codes_out_of_range_are_refused() {
    let base = WireUp {
        seq: 1,
        caller: 1,
        active: 1,
        meta: Some(wire_meta(&meta())),
        culprit: None,
        error: None,
        idle: vec![],
        data: 0,
        pieces: vec![],
    };
    let cases: Vec<(&str, WireUp)> = vec![
        (
            "caller beyond the world",
            WireUp {
                caller: 99,
                ..base.clone()
            },
        ),
        (
            "more active ranks than the world",
            WireUp {
                active: 6,
                ..base.clone()
            },
        ),
        (
            "a done rank beyond the world",
            WireUp {
                idle: vec![5],
                ..base.clone()
            },
        ),
        ("an unknown collective kind", {
            let mut w = base.clone();
            w.meta.as_mut().unwrap().kind = 42;
            w
        }),
        ("an unknown dtype", {
            let mut w = base.clone();
            w.meta.as_mut().unwrap().dtype = Some(250);
            w
        }),
        ("an unknown algorithm", {
            let mut w = base.clone();
            w.meta.as_mut().unwrap().algo = 9;
            w
        }),
        ("a root beyond the world", {
            let mut w = base.clone();
            w.meta.as_mut().unwrap().root = u64::MAX;
            w
        }),
    ];
    for (what, w) in cases {
        let archive = rkyv::to_bytes::<RkyvError>(&Wire::Up(w)).unwrap();
        let mut ctrl = MAGIC.to_vec();
        ctrl.extend_from_slice(&VERSION.to_le_bytes());
        ctrl.extend_from_slice(&[0, 0]);
        ctrl.extend_from_slice(&archive);
        assert_protocol_naming_peer(decode(FROM, WORLD, &ctrl, Vec::new()), what);
    }
}

/// End to end (CTRL-1, TREE-3): a user value arriving on a tree link where a control message is
/// due fails the collective with a Protocol error naming the sender, on the receiving rank, and
/// every other rank learns of the failure instead of hanging.
#[test]
fn ctrl_1_a_user_value_on_a_tree_link_fails_the_collective_naming_the_rank() {
    let got = crate::algorithms::tests::world(2, None, |t| {
        if t.rank() == 1 {
            let comm = t.comm(t.deadline());
            comm.link(0)
                .unwrap()
                .send(
                    &Value::str("not protocol"),
                    Some(std::time::Duration::from_secs(5)),
                )
                .unwrap();
        }
        // (an all-gather: it always takes the control pass; a barrier of ranks on one host takes
        // the shared-memory fast path, FLAT-1)
        t.all_gather(b"x").map(|_| ())
    });
    let e0 = got[0].as_ref().unwrap_err();
    assert_eq!(e0.kind(), ErrorKind::Protocol, "{e0}");
    assert!(e0.to_string().contains("rank 1"), "{e0}");
    assert!(
        got[1].is_err(),
        "rank 1 must learn that the collective failed"
    );
}

/// CTRL-3: ranks whose settings (PARALLEL_ALGO, PARALLEL_RING_THRESHOLD) would move the same
/// all-reduce by different algorithms all fail with a Mismatch naming the algorithm, instead of
/// the tree rank taking the ring rank's unreduced data for the result.
#[test]
fn ctrl_3_ranks_choosing_different_algorithms_fail_with_a_mismatch_on_every_rank() {
    let got = crate::algorithms::tests::world(2, None, |mut t| {
        t.tuning_mut().algo = if t.rank() == 1 {
            crate::plan::Algo::Ring
        } else {
            crate::plan::Algo::Tree
        };
        let mut buf = vec![1u8; 4096 * 4];
        t.all_reduce(DType::F32, &mut buf, &Op::parse("sum").unwrap())
            .map(|_| ())
    });
    for (r, g) in got.iter().enumerate() {
        let e = g.as_ref().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "rank {r}: {e}");
        assert!(e.to_string().contains("by the ring"), "rank {r}: {e}");
    }
}

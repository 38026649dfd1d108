//! Fusion against per-tensor references: many small tensors of several dtypes on 2 and 3 ranks
//! (threads with real links), all-reduced, broadcast and reduced as groups.

use super::*;
use crate::algorithms::tests::world;
use parallel_engine::value::Tensor;

/// Rank `r`'s tensors: f32 and i64 interleaved (two groups), sizes 0, 1, 3, 5, 17 elements.
fn tensors(r: usize) -> Vec<Tensor> {
    [0usize, 1, 3, 5, 17]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let v = (0..n).map(|i| (r * 100 + k * 10 + i) as i64);
            if k % 2 == 0 {
                let b = v.flat_map(|x| (x as f32).to_le_bytes()).collect();
                Tensor::from_bytes(DType::F32, vec![n], b).unwrap()
            } else {
                let b = v.flat_map(|x| x.to_le_bytes()).collect();
                Tensor::from_bytes(DType::I64, vec![n], b).unwrap()
            }
        })
        .collect()
}

fn values(ts: &[Tensor]) -> Vec<Vec<f64>> {
    ts.iter()
        .map(|t| {
            let b = t.bytes().unwrap();
            match t.dtype() {
                DType::F32 => b
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                _ => b
                    .chunks(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
            }
        })
        .collect()
}

#[test]
fn fuse_1_groups_by_dtype_in_first_appearance_order() {
    let l = Leaves::new(tensors(0), DType::F32);
    let g: Vec<_> = l.groups().into_iter().map(|(d, _, i)| (d, i)).collect();
    assert_eq!(
        g,
        vec![(DType::F32, vec![0, 2, 4]), (DType::I64, vec![1, 3])]
    );
}

#[test]
fn fuse_2_all_reduce_many_equals_each_tensor_summed() {
    for n in [2usize, 3] {
        let got = world(n, None, move |t| {
            let mut l = Leaves::new(tensors(t.rank()), DType::F32);
            t.all_reduce_many(&mut l, &Op::Sum, None).unwrap();
            // The tree stays in step: a call without tensors, then a plain all-reduce.
            t.all_reduce_many(&mut Leaves::none(), &Op::Sum, None)
                .unwrap();
            let mut one = 1i64.to_le_bytes();
            t.all_reduce(DType::I64, &mut one, &Op::Sum).unwrap();
            assert_eq!(i64::from_le_bytes(one), n as i64);
            values(l.tensors())
        });
        let want: Vec<Vec<f64>> = values(&tensors(0))
            .iter()
            .enumerate()
            .map(|(k, v)| {
                (0..v.len())
                    .map(|i| (0..n).map(|r| values(&tensors(r))[k][i]).sum())
                    .collect()
            })
            .collect();
        for (r, g) in got.iter().enumerate() {
            assert_eq!(g, &want, "{n} ranks: rank {r}");
        }
    }
}

#[test]
fn fuse_2_broadcast_and_reduce_many_move_only_the_roots_bytes() {
    let got = world(3, None, |t| {
        let mut b = Leaves::new(tensors(t.rank()), DType::F32);
        t.broadcast_many(&mut b, 2).unwrap();
        let mut r = Leaves::new(tensors(t.rank()), DType::F32);
        t.reduce_many(&mut r, &Op::Max, None, 1).unwrap();
        (values(b.tensors()), values(r.tensors()))
    });
    for (rank, (b, r)) in got.iter().enumerate() {
        assert_eq!(b, &values(&tensors(2)), "broadcast from 2, rank {rank}");
        // Max over ranks 0..3 of rank-increasing values is rank 2's; only root 1 gets it.
        let want = if rank == 1 { tensors(2) } else { tensors(rank) };
        assert_eq!(r, &values(&want), "reduce to 1, rank {rank}");
    }
}

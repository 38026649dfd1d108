//! The Tree's all-to-all: a control pass that checks every rank called it with the same dtype and
//! that the piece sizes agree, the full mesh of links on first use, then the pairwise exchange
//! ([`crate::algorithms::alltoall`]).
//!
//! Invariants:
//! - TA2A-1: each rank reports up the pass, for every rank, how many bytes it sends it and how
//!   many it expects from it; rank 0 checks every pair of taking ranks and any disagreement is a
//!   Mismatch on every rank naming the pair, before any piece moves (TREE-2). A receiver's output
//!   is therefore never filled with another size than its own: no silent truncation.
//! - TA2A-2: uneven endings (TREE-4): a rank that called `done` takes part in the pass and in the
//!   mesh set-up, not in the exchange: its pieces are absent, the outputs the others hold for it
//!   are left as they were, and what they had for it is not sent. The call returns the ranks
//!   that took part.
//! - TA2A-3: the full mesh is made once, by the first all-to-all that passed its control pass,
//!   on every rank (finished ones too), so every rank makes it in the same collective.

use super::Tree;
use super::pass::Pass;
use crate::algorithms::{self, Algorithm, Communicator};
use crate::control::{Kind, Meta};
use crate::rendezvous;
use parallel_engine::buffer::Buf;
use parallel_engine::endpoint::Conn;
use parallel_engine::runtime::Deadline;
use parallel_engine::value::{DType, Tensor};
use parallel_engine::{Error, ErrorKind, Result};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

impl Tree {
    /// All-to-all: `sends[d]` (bytes of `dtype` elements) goes to rank `d`, and rank `s`'s
    /// piece for this rank is written into `recvs[s]`, which must have exactly the size rank `s`
    /// sends (a Mismatch on every rank otherwise). Sizes may differ for every pair, zero
    /// included. Returns the ranks that took part, in rank order: while some ranks are done
    /// (TREE-4), their outputs are left as they were and nothing is sent to them.
    pub fn all_to_all(
        &self,
        dtype: DType,
        sends: &[&[u8]],
        recvs: &mut [&mut [u8]],
    ) -> Result<Vec<usize>> {
        if !self.active() {
            return Err(Error::new(
                ErrorKind::Config,
                "all_to_all",
                "this rank called done(): it has no more data to exchange",
            ));
        }
        let table = self.size_table(dtype, sends, recvs)?;
        let meta = Meta::new(Kind::AllToAll, "exchange", Some(dtype), 0, Algorithm::Tree);
        self.run(|| {
            let v = self.pass_with(Pass {
                meta: Some(&meta),
                op: None,
                data: None,
                carry_data: false,
                contributes: true,
                piece: Some(table),
                failure: None,
                deadline: self.deadline(),
            })?;
            let taking: Vec<usize> = v.pieces.iter().map(|(r, _)| *r).collect();
            if taking.len() != v.contributors {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "all_to_all",
                    format!(
                        "{} size tables arrived for {} taking ranks",
                        taking.len(),
                        v.contributors
                    ),
                ));
            }
            let deadline = self.deadline();
            let links = self.mesh_links(deadline)?;
            let mut takes = vec![false; self.world_size()];
            for &r in &taking {
                takes[r] = true;
            }
            let comm =
                Communicator::new(self.rank, links, &self.sender, deadline, self.tuning.chunk);
            algorithms::alltoall::exchange(&comm, sends, recvs, &takes)?;
            Ok(taking)
        })
    }

    /// [`Tree::all_to_all`] over tensors (all of one dtype, in host memory): `sends[d]` goes to
    /// rank `d`, rank `s`'s piece lands in `recvs[s]` (written in place; a non-contiguous output
    /// is received into a staging buffer and scattered into it). Returns the ranks that took
    /// part; the outputs for the others are left as they were (TA2A-2).
    pub fn all_to_all_tensors(&self, sends: &[Tensor], recvs: &mut [Tensor]) -> Result<Vec<usize>> {
        let dtype = sends.first().map_or(DType::U8, Tensor::dtype);
        let all = sends.iter().chain(recvs.iter());
        if let Some((i, t)) = all
            .enumerate()
            .find(|(_, t)| t.dtype() != dtype || t.is_cuda())
        {
            let (what, r) = match i < sends.len() {
                true => ("piece for", i),
                false => ("output for the piece of", i - sends.len()),
            };
            let why = match t.is_cuda() {
                true => "is in CUDA memory: all_to_all moves host tensors (copy it to the host \
                         first; the Python binding does)"
                    .to_string(),
                false => format!(
                    "has dtype {}, the first piece {}: one all_to_all moves one dtype",
                    t.dtype().name(),
                    dtype.name()
                ),
            };
            return Err(Error::new(
                ErrorKind::Config,
                "all_to_all",
                format!("rank {}'s {what} rank {r} {why}", self.rank),
            ));
        }
        let gathered: Vec<Option<Buf>> = sends
            .iter()
            .map(|t| match t.bytes() {
                Some(_) => Ok(None),
                None => t.contiguous_bytes().map(Some),
            })
            .collect::<Result<_>>()?;
        let send_refs: Vec<&[u8]> = sends
            .iter()
            .zip(&gathered)
            .map(|(t, g)| g.as_deref().or(t.bytes()).unwrap_or(&[]))
            .collect();
        let mut staging: Vec<Option<Vec<u8>>> = recvs
            .iter()
            .map(|t| (!t.is_contiguous()).then(|| vec![0u8; t.nbytes()]))
            .collect();
        let direct: Vec<(usize, usize)> = recvs
            .iter()
            .zip(&staging)
            .filter(|(t, s)| s.is_none() && t.nbytes() > 0)
            .map(|(t, _)| (t.data_ptr() as usize, t.nbytes()))
            .collect();
        let read: Vec<(usize, usize)> = send_refs
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        if let Some(why) = overlap(&direct, &read) {
            return Err(Error::new(
                ErrorKind::Config,
                "all_to_all",
                format!(
                    "rank {}: {why}: give each output memory of its own",
                    self.rank
                ),
            ));
        }
        let mut recv_refs: Vec<&mut [u8]> = recvs
            .iter_mut()
            .zip(staging.iter_mut())
            .map(|(t, s)| match s {
                Some(s) => &mut s[..],
                None if t.nbytes() == 0 => &mut [][..],
                // SAFETY: a contiguous host tensor's nbytes from its data pointer are its
                // elements, kept alive by its storage while `recvs` is borrowed for this call;
                // these ranges were checked disjoint from each other and from every send's
                // bytes (`overlap`), so no two slices of this call alias.
                None => unsafe { std::slice::from_raw_parts_mut(t.data_mut_ptr(), t.nbytes()) },
            })
            .collect();
        let took = self.all_to_all(dtype, &send_refs, &mut recv_refs)?;
        drop(recv_refs);
        for &r in &took {
            if let Some(s) = &staging[r] {
                recvs[r].scatter_from(s)?;
            }
        }
        Ok(took)
    }

    /// This rank's piece sizes for the pass (TA2A-1): bytes sent to each rank, then bytes
    /// expected from each, as u64 little endian; bad local input is a `Config` error here.
    fn size_table(&self, dtype: DType, sends: &[&[u8]], recvs: &[&mut [u8]]) -> Result<Vec<u8>> {
        let n = self.world_size();
        if sends.len() != n || recvs.len() != n {
            return Err(Error::new(
                ErrorKind::Config,
                "all_to_all",
                format!(
                    "rank {} passed {} pieces to send and {} outputs; a world of {n} needs {n} of \
                     each (one per rank, its own included)",
                    self.rank,
                    sends.len(),
                    recvs.len()
                ),
            ));
        }
        let item = dtype.itemsize();
        let sizes = sends
            .iter()
            .map(|s| s.len())
            .chain(recvs.iter().map(|r| r.len()));
        let mut table = Vec::with_capacity(16 * n);
        for (i, len) in sizes.enumerate() {
            if len % item != 0 {
                let what = if i < n {
                    "piece for"
                } else {
                    "output for the piece of"
                };
                return Err(Error::new(
                    ErrorKind::Config,
                    "all_to_all",
                    format!(
                        "rank {}'s {what} rank {} has {len} bytes, not a whole number of {} \
                         elements ({item} bytes each)",
                        self.rank,
                        i % n,
                        dtype.name()
                    ),
                ));
            }
            table.extend_from_slice(&(len as u64).to_le_bytes());
        }
        Ok(table)
    }

    /// The full mesh of links, made on the first call (TA2A-3).
    pub(super) fn mesh_links(&self, deadline: Deadline) -> Result<&HashMap<usize, Arc<Conn>>> {
        if let Some(m) = self.mesh.get() {
            return Ok(m);
        }
        let mesh = rendezvous::full_mesh(
            self.rank,
            &self.plan,
            &self.server,
            &self.links,
            self.mesh_after,
            Instant::now() + deadline.remaining(),
        )?;
        super::name_links(&mesh);
        let _ = self.mesh.set(mesh);
        Ok(self.mesh.get().unwrap_or(&self.links))
    }
}

/// Whether two of the `write` ranges (address, length) overlap, or one overlaps a `read` range:
/// the reason, else `None`.
fn overlap(write: &[(usize, usize)], read: &[(usize, usize)]) -> Option<String> {
    let mut w: Vec<(usize, usize)> = write.to_vec();
    w.sort_unstable();
    if w.windows(2).any(|p| p[0].0 + p[0].1 > p[1].0) {
        return Some("two outputs share memory".into());
    }
    let hits = |(a, n): (usize, usize)| w.iter().any(|&(b, m)| n > 0 && a < b + m && b < a + n);
    read.iter()
        .any(|r| hits(*r))
        .then(|| "an output shares memory with a piece to send".into())
}

/// Rank 0's check of an all-to-all's size tables (TA2A-1): `None` when every pair of taking ranks
/// agrees, else the culprit. The tables are then emptied: the verdict only names the ranks that
/// take part.
pub(super) fn check_sizes(tables: &mut [(usize, Vec<u8>)], world: usize) -> Option<String> {
    let mut culprit = None;
    let mut parsed: Vec<(usize, Vec<u64>)> = Vec::new();
    for (r, t) in tables.iter_mut() {
        if t.len() != 16 * world {
            culprit.get_or_insert(format!(
                "rank {r} sent an all-to-all size table of {} bytes for a world of {world}",
                t.len()
            ));
        } else {
            let sizes = t
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
                .collect();
            parsed.push((*r, sizes));
        }
        *t = Vec::new();
    }
    for (s, ss) in &parsed {
        for (d, ds) in &parsed {
            let (sent, expected) = (ss[*d], ds[world + *s]);
            if s != d && sent != expected && culprit.is_none() {
                culprit = Some(format!(
                    "rank {s} sends {sent} bytes to rank {d}, whose output for it has \
                     {expected} bytes (all_to_all: every output must have the size its sender \
                     sends)"
                ));
            }
        }
    }
    culprit
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::algorithms::tests::world;
    use std::time::Duration;

    #[test]
    fn ta2a_1_size_tables_disagreeing_name_the_pair_and_are_emptied() {
        let table = |send: [u64; 2], recv: [u64; 2]| -> Vec<u8> {
            send.iter()
                .chain(recv.iter())
                .flat_map(|x| x.to_le_bytes())
                .collect()
        };
        let mut ok = vec![(0, table([1, 8], [1, 4])), (1, table([4, 0], [8, 0]))];
        assert_eq!(check_sizes(&mut ok, 2), None);
        assert!(
            ok.iter().all(|(_, t)| t.is_empty()),
            "the verdict carries no sizes"
        );
        let mut bad = vec![(0, table([1, 8], [1, 4])), (1, table([4, 0], [6, 0]))];
        let c = check_sizes(&mut bad, 2).expect("0 sends 8 bytes, 1 expects 6");
        assert!(c.contains("rank 0 sends 8 bytes to rank 1"), "{c}");
        let mut short = vec![(0, vec![0u8; 8])];
        assert!(check_sizes(&mut short, 2).is_some_and(|c| c.contains("rank 0")));
    }

    /// TA2A-3: a stranger connected to a rank's server (here a client that sends a user value)
    /// is skipped while the mesh is made; the all-to-all succeeds on every rank.
    #[test]
    fn ta2a_3_a_stray_connection_does_not_break_making_the_mesh() {
        let res = world(4, None, |t| {
            let (me, n) = (t.rank(), t.world_size());
            let _stray = if me == 1 {
                let p = &t.plan().probes[1];
                let c = parallel_engine::Client::connect(&p.addr, p.port, None).unwrap();
                c.send(&parallel_engine::value::Value::Int(7)).unwrap();
                Some(c)
            } else {
                None
            };
            let sends: Vec<Vec<u8>> = (0..n).map(|d| vec![(me * n + d) as u8; 3]).collect();
            let send_refs: Vec<&[u8]> = sends.iter().map(|v| &v[..]).collect();
            let mut outs = vec![vec![0u8; 3]; n];
            let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
            t.all_to_all(DType::U8, &send_refs, &mut out_refs)
                .map(|_| (0..n).all(|s| outs[s] == vec![(s * n + me) as u8; 3]))
        });
        for (r, x) in res.into_iter().enumerate() {
            assert!(
                x.unwrap_or_else(|e| panic!("rank {r}: {e}")),
                "rank {r}: wrong pieces"
            );
        }
    }

    /// A2A-3 / TREE-3: a rank that leaves after the control pass and the mesh, having sent one
    /// piece of its exchange (as if killed there), fails every other rank within seconds, not
    /// at the 30 s timeout, with an error that names it.
    #[test]
    fn a2a_3_a_rank_gone_mid_exchange_fails_every_rank_promptly_naming_it() {
        const VICTIM: usize = 3;
        let started = Instant::now();
        let res = world(4, None, |t| {
            let (me, n) = (t.rank(), t.world_size());
            let sends: Vec<Vec<u8>> = (0..n).map(|_| vec![me as u8; 1 << 20]).collect();
            let send_refs: Vec<&[u8]> = sends.iter().map(|v| &v[..]).collect();
            let mut outs = vec![vec![0u8; 1 << 20]; n];
            let mut out_refs: Vec<&mut [u8]> = outs.iter_mut().map(|v| &mut v[..]).collect();
            if me != VICTIM {
                return t
                    .all_to_all(DType::U8, &send_refs, &mut out_refs)
                    .map(|_| ());
            }
            // The victim's side of the pass and the mesh, then its step-1 piece only.
            let meta = Meta::new(
                Kind::AllToAll,
                "exchange",
                Some(DType::U8),
                0,
                Algorithm::Tree,
            );
            let table = t.size_table(DType::U8, &send_refs, &out_refs).unwrap();
            t.pass_with(Pass {
                meta: Some(&meta),
                op: None,
                data: None,
                carry_data: false,
                contributes: true,
                piece: Some(table),
                failure: None,
                deadline: t.deadline(),
            })
            .unwrap();
            let links = t.mesh_links(t.deadline()).unwrap();
            let comm = Communicator::new(me, links, &t.sender, t.deadline(), t.tuning.chunk);
            let mut takes = vec![false; n];
            takes[me] = true;
            takes[(me + 1) % n] = true;
            out_refs[(me + 1) % n] = &mut [];
            algorithms::alltoall::exchange(&comm, &send_refs, &mut out_refs, &takes).unwrap();
            drop(t); // gone: its links close
            Ok(())
        });
        let took = started.elapsed();
        assert!(took < Duration::from_secs(15), "took {took:?}");
        for (r, x) in res.into_iter().enumerate() {
            if r == VICTIM {
                continue;
            }
            let e = x.expect_err("a rank gone mid-exchange must fail the others");
            assert!(
                matches!(e.kind(), ErrorKind::PeerLost | ErrorKind::Closed),
                "rank {r}: {e}"
            );
            assert!(
                e.to_string().contains(&format!("rank {VICTIM}")),
                "rank {r}: {e}"
            );
        }
    }
}

//! The Tree's small-message fast path over the flat shared-memory region ([`crate::flat`]):
//! its setup at rendezvous (FLAT-5, FLAT-6) and the choice, before every control pass, between
//! the fast path and the pass (FLAT-1).

use super::Tree;
use super::pass::Pass;
use crate::algorithms::Algorithm;
use crate::control::{Kind, Meta, Verdict};
use crate::flat::{self, Layout, Region, WORDS, Words};
use crate::ops::Op;
use parallel_engine::runtime::Deadline;
use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// The longest the region's setup may take (within the tree's timeout).
const SETUP: Duration = Duration::from_secs(30);

/// Rank 0's side of the setup: the memfd, the listening socket and the offer.
fn host(
    lay: &Layout,
) -> Result<(
    std::os::fd::OwnedFd,
    std::os::fd::OwnedFd,
    [u8; flat::OFFER],
)> {
    let memfd = flat::create(lay)?;
    let random = parallel_engine::link::random_hex::<16>()?;
    let listener =
        parallel_engine::link::sys::unix_listen_abstract(&flat::socket_name(random.as_bytes()))?;
    let token = parallel_engine::link::random_bytes::<32>()?;
    let mut offer = [0u8; flat::OFFER];
    offer[0] = 1;
    offer[1..33].copy_from_slice(&random.as_bytes()[..32]);
    offer[33..].copy_from_slice(&token);
    Ok((memfd, listener, offer))
}

impl Tree {
    /// Makes the flat region when every rank is on one host and wants it (FLAT-5, FLAT-6): three
    /// small collectives over the tree (the wish and the cut-over; rank 0's offer; whether every
    /// rank attached). Without it, every collective takes the control pass.
    pub(super) fn setup_flat(&self) -> Result<Option<Region>> {
        let n = self.world_size();
        if n < 2 {
            return Ok(None);
        }
        let cfg = parallel_engine::config::config();
        let one_host = self.plan.host_of.iter().all(|&h| h == self.plan.host_of[0]);
        let want = one_host && cfg.shm && cfg.shm_flat_max > 0;
        let mut v: Vec<u8> = [u64::from(want), cfg.shm_flat_max]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        self.all_reduce(DType::U64, &mut v, &Op::Min)?;
        let word = |i: usize| u64::from_le_bytes(v[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        if word(0) == 0 {
            return Ok(None);
        }
        let lay = Layout::new(n, word(1) as usize);
        let deadline = Deadline::after(self.timeout.min(SETUP));
        let pids: Vec<u32> = self.plan.probes.iter().map(|p| p.pid).collect();
        let places: Vec<String> = (self.plan.probes.iter())
            .map(|p| format!("{}:{} on {}", p.addr, p.port, p.hostname))
            .collect();
        let mut offer = [0u8; flat::OFFER];
        let mut hosted = None;
        if self.rank == 0 {
            match host(&lay) {
                Ok((memfd, listener, o)) => {
                    offer = o;
                    hosted = Some((memfd, listener));
                }
                Err(e) => tracing::info!("shared-memory fast path off: {e}"),
            }
        }
        self.broadcast(DType::U8, &mut offer, 0)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = None;
        let region = match (offer[0], hosted) {
            (0, _) => Err(Error::new(
                ErrorKind::Resource,
                "flat",
                "rank 0 could not create the region",
            )),
            (_, Some((memfd, listener))) => memfd
                .try_clone()
                .map_err(|e| Error::os("flat", "dup(memfd)", e))
                .and_then(|mine| {
                    let token = offer[33..].try_into().expect("32 bytes");
                    let (stop, all) = (stop.clone(), pids.clone());
                    server = Some(std::thread::spawn(move || {
                        flat::serve(listener, memfd, token, all, stop, deadline)
                    }));
                    Region::map(mine, lay, 0, &pids).map(|r| r.with_places(places))
                }),
            (_, None) => {
                let name = flat::socket_name(&offer[1..33]);
                flat::fetch(&name, &offer[33..], self.rank, pids[0], deadline)
                    .and_then(|fd| Region::map(fd, lay, self.rank, &pids))
                    .map(|r| r.with_places(places))
            }
        };
        let mut ok = [u8::from(region.is_ok())];
        let agreed = self.all_reduce(DType::U8, &mut ok, &Op::Min);
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = server {
            let _ = t.join();
        }
        agreed?;
        match (ok[0], region) {
            (1, Ok(r)) => {
                tracing::info!(
                    "shared-memory fast path on: collectives up to {} bytes (PARALLEL_SHM_FLAT_MAX)",
                    r.max()
                );
                Ok(Some(r))
            }
            (_, Err(e)) => {
                tracing::info!("shared-memory fast path off on every rank: {e}");
                Ok(None)
            }
            _ => {
                tracing::info!("shared-memory fast path off: another rank could not attach");
                Ok(None)
            }
        }
    }

    /// FLAT-1: publishes this rank's part of pass `seq` in the region and, when every rank is on
    /// the fast path with the same words, runs the collective there. None: take the pass.
    pub(super) fn flat_pass(
        &self,
        seq: u64,
        p: &mut Pass<'_>,
        reference: Option<&Meta>,
    ) -> Result<Option<Verdict>> {
        let Some(region) = self.flat.get() else {
            return Ok(None);
        };
        let fast = reference.filter(|m| eligible(region, p, m));
        let words = fast.map_or([0; WORDS], |m| words_of(region, p, m));
        let fast = fast.filter(|_| words[0] == 1);
        let data = match fast {
            Some(m) if m.kind == Kind::AllReduce || p.contributes => p.data.as_deref(),
            _ => None,
        };
        region.publish(seq, &words, data);
        let what = reference.map_or("done", |m| m.kind.name());
        let Some(m) = fast else { return Ok(None) };
        if !region.decide(seq, &words, p.deadline, what)? {
            return Ok(None);
        }
        match (m.kind, p.data.as_deref_mut(), m.dtype, p.op) {
            (Kind::AllReduce, Some(d), Some(dt), Some(op)) => region.reduce_into(seq, op, dt, d)?,
            (Kind::Broadcast, Some(d), _, _) => region.copy_from(seq, m.root, d),
            _ => {}
        }
        Ok(Some(Verdict {
            contributors: self.world_size(),
            meta: Some(m.clone()),
            flat: true,
            ..Verdict::default()
        }))
    }
}

/// Whether this rank's part qualifies for the fast path (FLAT-1): a built-in all-reduce, a
/// broadcast or a barrier in host memory, on the tree, within the cut-over, with nothing else
/// to carry (a status round, a reduce function's failure, an all-gather piece).
fn eligible(region: &Region, p: &Pass<'_>, m: &Meta) -> bool {
    let len = p.data.as_deref().map_or(0, <[u8]>::len);
    if p.failure.is_some() || p.piece.is_some() || m.gpu || m.algo != Algorithm::Tree {
        return false;
    }
    if len > region.max() || m.op.len() > 24 {
        return false;
    }
    match m.kind {
        Kind::AllReduce => {
            p.carry_data
                && p.contributes
                && p.data.is_some()
                && m.dtype.is_some()
                && p.op.is_some_and(|op| !matches!(op, Op::User(_)))
        }
        Kind::Broadcast => p.carry_data && p.data.is_some(),
        Kind::Barrier => p.data.is_none(),
        Kind::Reduce
        | Kind::AllGather
        | Kind::AllToAll
        | Kind::ReduceScatter
        | Kind::AllGatherInto => false,
    }
}

/// The words every rank's slot must agree on (FLAT-1): the whole meta, the byte count and the
/// cut-over.
fn words_of(region: &Region, p: &Pass<'_>, m: &Meta) -> Words {
    let mut w = [0u64; WORDS];
    w[0] = 1;
    w[1] = m.kind as u64 + 1;
    w[2] = m.dtype.map_or(0, |d| d as u64 + 1);
    w[3] = m.count as u64;
    w[4] = m.root as u64;
    w[5] = m.sig;
    w[6] = u64::from(m.cont);
    w[7] = m.algo as u64;
    let mut name = [0u8; 24];
    name[..m.op.len()].copy_from_slice(m.op.as_bytes());
    for (i, c) in name.chunks_exact(8).enumerate() {
        w[8 + i] = u64::from_le_bytes(c.try_into().expect("8 bytes"));
    }
    w[11] = p.data.as_deref().map_or(0, <[u8]>::len) as u64;
    w[12] = region.max() as u64;
    w
}

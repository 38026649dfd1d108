//! The Tree a user holds: the rendezvous result (links and plan), the epochs of uneven endings,
//! the stats, and the collectives. Just over 600 lines: the public collectives are one impl
//! block of short methods, each handing its work to an algorithm in algorithms/.
//!
//! Every collective starts with a **control pass** up the tree ([`pass`], typed messages of
//! [`crate::control`]): each rank sends its parent the collective's sequence number, kind, op,
//! dtype, element count, root and whether it still contributes (uneven endings), plus, for small
//! buffers, the data already reduced over its subtree. The root checks that every rank called the
//! same collective, counts contributors, and sends the verdict (and, for small buffers, the
//! result) back down. Large all-reduces then run the algorithm [`crate::algorithms::choose`]
//! picks (the pipelined ring, or hierarchical across hosts); CUDA tensors take the same ring over
//! device memory when large, else the whole-tensor tree algorithm, with a device reduce kernel
//! ([`gpu`]). Many tensors of one call are fused per dtype and device by [`crate::fuse`].
//! Finished ranks serve the others ([`epochs`]).
//! When every rank runs on one host, a flat shared-memory region ([`crate::flat`], FLAT-1..6)
//! comes first: small all-reduces, broadcasts and barriers that every rank calls alike finish
//! there without a pass; anything else falls back to the pass on every rank alike ([`fastpath`]).
//!
//! Invariants:
//! - TREE-1: every rank ends a collective with bitwise the same result: each element is reduced in
//!   exactly one place, in a fixed order (own contribution, then children in rank order; along the
//!   ring, in ring order), and then copied.
//! - TREE-2: a rank calling a different collective, dtype, size, op or root is reported on every
//!   rank, naming the culprit; no data is touched.
//! - TREE-3: a failing rank tells its neighbours (an abort frame naming the cause) and closes its
//!   links, so every rank raises promptly instead of waiting for its timeout.
//! - TREE-5: across hosts with several ranks each, large all-reduces are hierarchical: only host
//!   leaders send across hosts, so each host's network link carries 2(H-1)/H of the data.
//! - TREE-4: a rank that has finished (`done`) takes part without contributing (the op's identity
//!   element) until all ranks have finished; then the epoch ends and every rank takes part again,
//!   on the same tree. Each collective reports how many ranks contributed; all_gather returns the
//!   contributing ranks' pieces with their ranks; a broadcast or reduce whose root is done is the
//!   same error on every rank (decided at rank 0 from the done ranks each subtree reports). A
//!   finished rank reduces with the collective's own built-in op, and with the function given
//!   to `done` only when the others called a user function; `done` returns how many user calls
//!   it served (the passes after the first of one call are marked in their meta).
//! - TREE-6: a user reduce function that fails on any rank fails the collective on every rank, with
//!   no buffer changed and the tree still usable: the failure travels up with the control pass (or,
//!   after a ring, in a status round over the tree links), and rank 0's verdict carries it down.
//! - TREE-7: a collective over a nested value carries a 64-bit hash of the value's structure
//!   (paths, dtypes, shapes) in its control frame, so ranks whose values differ in structure are
//!   told in the same pass, before any data moves; such a verdict ([`STRUCTURE_DIFFERS`]) is
//!   given only when every rank takes part and nothing else differs but the values, so every rank
//!   may then gather the full structures to name the first differing entry.

use crate::ops::{self, Op};
use crate::plan::Plan;
use crate::rendezvous::{self, TreeOptions};
use parallel_engine::endpoint::Conn;
use parallel_engine::runtime::Deadline;
use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result, Server};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

mod alltoall;
mod epochs;
mod fastpath;
mod gpu;
mod pass;

pub use crate::control::Kind;
use crate::control::Meta;
use pass::Pass;

pub use crate::algorithms::Tuning;
use crate::algorithms::{self, Algorithm, Communicator, Sender};
pub use gpu::DeviceReduce;

/// Per-link traffic of the tree.
#[derive(Debug, Clone, Default)]
pub struct LinkStats {
    pub peer_rank: usize,
    pub kind: &'static str,
    pub stats: parallel_engine::Stats,
}

/// An allreduce tree of processes.
pub struct Tree {
    sender: Sender,
    rank: usize,
    plan: Plan,
    links: HashMap<usize, Arc<Conn>>,
    server: Server,
    /// Every rank's link (the tree's and the rest of the full mesh), made by the first
    /// all-to-all ([`alltoall`]); the server's connections with ids up to `mesh_after` predate it.
    mesh: std::sync::OnceLock<HashMap<usize, Arc<Conn>>>,
    mesh_after: i64,
    seq: Mutex<u64>,
    timeout: Duration,
    tuning: Tuning,
    contributors: AtomicU64,
    done: Mutex<bool>,
    /// The error the current collective returns was agreed by every rank (a verdict): the
    /// tree is still in step and must not be aborted.
    agreed: AtomicBool,
    failed: Mutex<Option<String>>,
    /// Device scratch of the GPU path, reused across calls.
    gpu_scratch: Mutex<Option<parallel_engine::cuda::DeviceAlloc>>,
    /// The structure hash the collectives carry while [`Tree::with_structure`] runs (TREE-7).
    structure: AtomicU64,
    /// Where this rank is in one user call (TREE-4): [`NO_CALL`], [`CALL_STARTED`] (inside
    /// [`Tree::with_structure`], no control pass yet) or [`CALL_PASSED`].
    call: AtomicU8,
    /// The last control pass this rank served while done was a first pass of a call (TREE-4).
    served_call: AtomicBool,
    /// The code of the algorithm that moved this rank's last all-reduce's data.
    last_algo: AtomicU8,
    /// The flat shared-memory region of the small-message fast path, when every rank is on
    /// one host ([`crate::flat`], FLAT-1..6).
    flat: OnceLock<crate::flat::Region>,
}

const NO_CALL: u8 = 0;
const CALL_STARTED: u8 = 1;
const CALL_PASSED: u8 = 2;

/// The start of a mismatch verdict that says only the values' structures differ (TREE-7): every
/// rank then called the same collective and may gather the structures to name the difference.
pub const STRUCTURE_DIFFERS: &str = "passed a value of another structure than";

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tree(rank {} of {})", self.rank, self.plan.world())
    }
}

/// Logs who joined from where and the plan with its link kinds (PARALLEL_LOG=info), once per
/// rank; every later line of this process carries its rank.
fn log_plan(plan: &Plan, rank: usize) {
    parallel_engine::log::set_rank(rank);
    if rank == 0 {
        for p in &plan.probes {
            tracing::info!(
                "rendezvous: rank {} joined from {} ({}:{}, pid {}, {} cores, {} NUMA node(s))",
                p.rank,
                p.hostname,
                p.addr,
                p.port,
                p.pid,
                p.cores,
                p.numa_nodes
            );
        }
    }
    let cfg = parallel_engine::config::config();
    let text = plan.describe(cfg.shm, cfg.cuda && cfg.cuda_ipc);
    tracing::info!(
        "plan: {}",
        text.trim_end().replace("\n", ";").replace("  ", " ")
    );
}

/// Every error of a tree link names the member it leads to ("rank 3 at 10.0.0.2:4567 (pid
/// 812)"), whichever path failed on it: control pass, ring chunk or all-to-all piece.
pub(crate) fn name_links(links: &HashMap<usize, Arc<Conn>>) {
    for (r, c) in links {
        c.name_peer(format!("rank {r}"));
    }
}

impl Tree {
    /// Joins the tree (rendezvous, plan, links). See [`rendezvous`].
    pub fn new(opts: TreeOptions) -> Result<Tree> {
        let cfg = parallel_engine::config::try_config()?; // CONFIG-4
        let timeout = opts.timeout.unwrap_or(cfg.timeout);
        let resolved = rendezvous::resolve(&opts)?;
        let joined = rendezvous::join(&resolved, timeout)?;
        let tuning = Tuning {
            ring_threshold: cfg.ring_threshold as usize,
            chunk: cfg.collective_chunk as usize,
            device_chunk: algorithms::DEVICE_CHUNK,
            algo: match cfg.algo.as_str() {
                "tree" => crate::plan::Algo::Tree,
                "ring" => crate::plan::Algo::Ring,
                _ => crate::plan::Algo::Auto,
            },
        };
        tracing::info!(
            "tree rank {} of {} joined ({})",
            joined.rank,
            joined.plan.world(),
            resolved.source
        );
        log_plan(&joined.plan, joined.rank);
        let mesh_after = joined.server.connections().iter().map(|c| c.id()).max();
        name_links(&joined.links);
        let tree = Tree {
            sender: Sender::new(),
            rank: joined.rank,
            plan: joined.plan,
            links: joined.links,
            server: joined.server,
            mesh: std::sync::OnceLock::new(),
            mesh_after: mesh_after.unwrap_or(0),
            seq: Mutex::new(0),
            timeout,
            tuning,
            contributors: AtomicU64::new(0),
            done: Mutex::new(false),
            agreed: AtomicBool::new(false),
            failed: Mutex::new(None),
            gpu_scratch: Mutex::new(None),
            structure: AtomicU64::new(0),
            call: AtomicU8::new(NO_CALL),
            served_call: AtomicBool::new(false),
            last_algo: AtomicU8::new(Algorithm::Tree.code()),
            flat: OnceLock::new(),
        };
        if let Some(region) = tree.setup_flat()? {
            let _ = tree.flat.set(region);
        }
        Ok(tree)
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.plan.world()
    }
    pub fn plan(&self) -> &Plan {
        &self.plan
    }
    pub fn tuning_mut(&mut self) -> &mut Tuning {
        &mut self.tuning
    }
    /// How many ranks contributed to the last collective (TREE-4).
    pub fn contributors(&self) -> usize {
        self.contributors.load(Ordering::SeqCst) as usize
    }
    /// The algorithm that moved the data of this rank's last all-reduce (host or CUDA memory;
    /// [`Algorithm::Tree`] before the first).
    pub fn last_all_reduce_algorithm(&self) -> Algorithm {
        Algorithm::from_code(self.last_algo.load(Ordering::SeqCst)).unwrap_or(Algorithm::Tree)
    }

    fn ran(&self, algo: Algorithm) {
        self.last_algo.store(algo.code(), Ordering::SeqCst);
    }

    /// The plan as text, with this process's link kinds.
    pub fn describe(&self) -> String {
        let cfg = parallel_engine::config::config();
        let mut s = self.plan.describe(cfg.shm, cfg.cuda && cfg.cuda_ipc);
        s.push_str(&format!("  this process: rank {}\n", self.rank));
        s
    }
    /// Traffic per link.
    pub fn stats(&self) -> Vec<LinkStats> {
        let mut v: Vec<LinkStats> = self
            .all_links()
            .iter()
            .map(|(r, c)| LinkStats {
                peer_rank: *r,
                kind: c.link_kind().name(),
                stats: c.stats(),
            })
            .collect();
        v.sort_by_key(|l| l.peer_rank);
        v
    }

    /// The tree's links, and the full mesh's once an all-to-all made it.
    fn all_links(&self) -> &HashMap<usize, Arc<Conn>> {
        self.mesh.get().unwrap_or(&self.links)
    }

    fn link(&self, r: usize) -> Result<&Arc<Conn>> {
        self.links.get(&r).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "tree",
                format!("rank {} has no link to rank {r}", self.rank),
            )
        })
    }

    pub(crate) fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }

    /// TREE-3: tell every neighbour, then close all links.
    fn abort(&self, e: &Error) -> Error {
        let msg = format!("rank {}: {e}", self.rank);
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(msg.clone());
            // A typed Abort frame: the neighbour's receive fails with PeerLost and this
            // reason whatever it expected (a control message or data into its buffer).
            for c in self.all_links().values() {
                let _ = c.send_abort(&msg, Some(Duration::from_millis(200)));
            }
            for c in self.all_links().values() {
                c.close();
            }
            // Ranks waiting on the fast path see it too (FLAT-4).
            if let Some(r) = self.flat.get() {
                r.leave();
            }
        }
        Error::new(e.kind(), "tree", msg)
    }

    fn check_usable(&self) -> Result<()> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(m) => Err(Error::new(
                ErrorKind::Closed,
                "tree",
                format!(
                    "this tree failed earlier and cannot be used again ({m}); create a new one"
                ),
            )),
            None => Ok(()),
        }
    }

    /// Runs `f` as one user call: every collective it calls carries `sig`, the hash of the
    /// structure of the nested value they come from (TREE-7; 0 for none), and a finished rank
    /// serving them counts them as one collective in what `done` returns (TREE-4), however many
    /// dtype groups (control passes) the value takes.
    pub fn with_structure<T>(&self, sig: u64, f: impl FnOnce() -> T) -> T {
        self.structure.store(sig, Ordering::SeqCst);
        self.call.store(CALL_STARTED, Ordering::SeqCst);
        let r = f();
        self.call.store(NO_CALL, Ordering::SeqCst);
        self.structure.store(0, Ordering::SeqCst);
        r
    }

    /// Whether this rank's next control pass continues a user call that already made one
    /// (TREE-4). Outside [`Tree::with_structure`] every collective is a call of its own.
    fn continues_call(&self) -> bool {
        match self.call.compare_exchange(
            CALL_STARTED,
            CALL_PASSED,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ) {
            Ok(_) => false,
            Err(now) => now == CALL_PASSED,
        }
    }

    /// Runs one collective; an error the ranks did not all agree on aborts the tree (TREE-3).
    fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_usable()?;
        self.agreed.store(false, Ordering::SeqCst);
        match f() {
            Ok(v) => Ok(v),
            Err(e) if self.agreed.swap(false, Ordering::SeqCst) => Err(e),
            Err(e) if e.kind() == ErrorKind::Mismatch || e.kind() == ErrorKind::Unsupported => {
                Err(e)
            }
            Err(e) => Err(self.abort(&e)),
        }
    }

    fn active(&self) -> bool {
        !*self.done.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// All-reduce of `buf` (elements of `dtype`) in place with `op`; returns how many ranks
    /// contributed (TREE-4).
    pub fn all_reduce(&self, dtype: DType, buf: &mut [u8], op: &Op) -> Result<usize> {
        op.check(dtype)?;
        if !self.active() {
            return Err(Error::new(
                ErrorKind::Config,
                "all_reduce",
                "this rank called done(): it has no more data to reduce",
            ));
        }
        let meta = Meta::new(
            Kind::AllReduce,
            op.name(),
            Some(dtype),
            buf.len() / dtype.itemsize(),
            self.algorithm(buf.len(), op),
        );
        if let Op::User(_) = op {
            return self.run(|| self.user_all_reduce(&meta, dtype, buf, op));
        }
        self.run(|| {
            if meta.algo != Algorithm::Tree {
                let v = self.pass(Some(&meta), Some(op), None, false, true)?;
                self.large_all_reduce(meta.algo, dtype, buf, op, v.contributors)?;
                self.ran(meta.algo);
                Ok(v.contributors)
            } else {
                let v = self.pass(Some(&meta), Some(op), Some(&mut *buf), true, true)?;
                if matches!(op, Op::Avg) {
                    ops::divide(dtype, buf, v.contributors);
                }
                self.ran(match v.flat {
                    true => Algorithm::Flat,
                    false => Algorithm::Tree,
                });
                Ok(v.contributors)
            }
        })
    }

    /// All-reduce with a user function (TREE-6): on a copy, so that a function that raises on
    /// any rank leaves every rank's buffer as it was; after the ring, a status round makes every
    /// rank raise together, naming the rank whose function failed.
    fn user_all_reduce(&self, meta: &Meta, dtype: DType, buf: &mut [u8], op: &Op) -> Result<usize> {
        let mut work = buf.to_vec();
        let ring = match meta.algo != Algorithm::Tree {
            true => Some(
                self.pass(Some(meta), Some(op), None, false, true)?
                    .contributors,
            ),
            false => None,
        };
        let contributors = if ring == Some(self.world_size()) {
            let (guarded, failed) = guard(op);
            self.large_all_reduce(meta.algo, dtype, &mut work, &guarded, self.world_size())?;
            self.settle(Some(meta), take(&failed))?;
            self.ran(meta.algo);
            self.world_size()
        } else {
            self.ran(Algorithm::Tree);
            // Small, or some ranks are done: in a ring a done rank would have to contribute the
            // function's identity element, which a user function does not have, so the data
            // goes through the tree (a second pass when the first found ranks done).
            self.pass(Some(meta), Some(op), Some(&mut work), true, true)?
                .contributors
        };
        buf.copy_from_slice(&work);
        Ok(contributors)
    }

    /// Broadcast `buf` from `root` to every rank (the original's "scatter").
    pub fn broadcast(&self, dtype: DType, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        let meta = Meta {
            root,
            ..Meta::new(
                Kind::Broadcast,
                "copy",
                Some(dtype),
                buf.len() / dtype.itemsize(),
                Algorithm::Tree,
            )
        };
        self.run(|| {
            self.pass(Some(&meta), None, Some(buf), true, self.rank == root)
                .map(|_| ())
        })
    }

    /// Reduce to `root`: only `root`'s buffer receives the result; the others keep theirs.
    pub fn reduce(&self, dtype: DType, buf: &mut [u8], op: &Op, root: usize) -> Result<usize> {
        self.check_root(root)?;
        op.check(dtype)?;
        let meta = Meta {
            root,
            ..Meta::new(
                Kind::Reduce,
                op.name(),
                Some(dtype),
                buf.len() / dtype.itemsize(),
                Algorithm::Tree,
            )
        };
        let mut work = buf.to_vec();
        self.run(|| {
            let v = self.pass(Some(&meta), Some(op), Some(&mut work), true, true)?;
            if self.rank == root {
                buf.copy_from_slice(&work);
                if matches!(op, Op::Avg) {
                    ops::divide(dtype, buf, v.contributors);
                }
            }
            Ok(v.contributors)
        })
    }

    /// Every contributing rank's bytes, as (rank, bytes) in rank order (sizes may differ between
    /// ranks). While some ranks are done (TREE-4) their entries are absent.
    pub fn all_gather(&self, mine: &[u8]) -> Result<Vec<(usize, Vec<u8>)>> {
        let meta = Meta::new(Kind::AllGather, "gather", None, 0, Algorithm::Tree);
        self.run(|| {
            // Each rank's piece travels up tagged with its rank; the root sends them all down.
            let v = self.pass_with(Pass {
                meta: Some(&meta),
                op: None,
                data: None,
                carry_data: false,
                contributes: true,
                piece: Some(mine.to_vec()),
                failure: None,
                deadline: self.deadline(),
            })?;
            if v.pieces.len() != v.contributors {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "all_gather",
                    format!(
                        "{} pieces arrived for {} contributing ranks",
                        v.pieces.len(),
                        v.contributors
                    ),
                ));
            }
            Ok(v.pieces)
        })
    }
    /// Reduce-scatter of `buf` (elements of `dtype`, a multiple of the world size) with the
    /// built-in `op`, by the ring: afterwards this rank's part (the r-th of `world_size` equal
    /// parts on rank r) holds the reduction over the contributing ranks, and the other parts are
    /// undefined. A finished rank contributes the op's identity (TREE-4). Returns how many
    /// ranks contributed.
    pub fn reduce_scatter(&self, dtype: DType, buf: &mut [u8], op: &Op) -> Result<usize> {
        op.check(dtype)?;
        self.check_parts("reduce_scatter", dtype, buf.len())?;
        if matches!(op, Op::User(_)) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "reduce_scatter",
                "a reduce function has no identity for a finished rank to contribute in the ring: all_reduce with it, then take this rank's part",
            ));
        }
        let meta = Meta::new(
            Kind::ReduceScatter,
            op.name(),
            Some(dtype),
            buf.len() / dtype.itemsize(),
            Algorithm::Ring,
        );
        self.run(|| {
            let v = self.pass(Some(&meta), Some(op), None, false, true)?;
            let comm = self.comm(self.deadline());
            algorithms::ring::reduce_scatter(
                &comm,
                &self.plan.ring,
                dtype,
                buf,
                op,
                v.contributors,
            )?;
            self.ran(Algorithm::Ring);
            Ok(v.contributors)
        })
    }

    /// All-gather in `buf` (elements of `dtype`, a multiple of the world size), by the ring:
    /// this rank's part (the r-th of `world_size` equal parts on rank r) holds its piece
    /// before; every part holds its rank's piece after, on every rank. Every rank must take
    /// part: while some are done (TREE-4) it fails on every rank (`all_gather` leaves them out).
    pub fn all_gather_into(&self, dtype: DType, buf: &mut [u8]) -> Result<()> {
        self.check_parts("all_gather_into", dtype, buf.len())?;
        let meta = Meta::new(
            Kind::AllGatherInto,
            "gather",
            Some(dtype),
            buf.len() / dtype.itemsize(),
            Algorithm::Ring,
        );
        self.run(|| {
            let v = self.pass(Some(&meta), None, None, false, true)?;
            if v.contributors != self.world_size() {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    "all_gather_into",
                    format!(
                        "{} of {} ranks called done() for this epoch and have no piece: use all_gather, whose result leaves them out",
                        self.world_size() - v.contributors,
                        self.world_size()
                    ),
                ));
            }
            let comm = self.comm(self.deadline());
            algorithms::ring::all_gather(&comm, &self.plan.ring, dtype, buf)?;
            self.ran(Algorithm::Ring);
            Ok(())
        })
    }

    /// An active rank's buffer for a collective over equal parts: whole elements, as many as a
    /// multiple of the world size.
    fn check_parts(&self, what: &'static str, dtype: DType, len: usize) -> Result<()> {
        if !self.active() {
            return Err(Error::new(
                ErrorKind::Config,
                what,
                "this rank called done(): it has no more data for this epoch",
            ));
        }
        let item = dtype.itemsize();
        if len % item != 0 || (len / item) % self.world_size() != 0 {
            return Err(Error::new(
                ErrorKind::Config,
                what,
                format!(
                    "{len} bytes are not {} equal parts of {} elements",
                    self.world_size(),
                    dtype.name()
                ),
            ));
        }
        Ok(())
    }

    /// Waits until every rank reached the barrier; returns how many ranks still contribute.
    pub fn barrier(&self) -> Result<usize> {
        let meta = Meta::new(Kind::Barrier, "none", None, 0, Algorithm::Tree);
        self.run(|| {
            self.pass(Some(&meta), None, None, false, false)
                .map(|v| v.contributors)
        })
    }

    /// Whether an all-reduce of `nbytes` with a built-in op takes a ring on this tree (the
    /// flat region, `PARALLEL_ALGO` and `PARALLEL_RING_THRESHOLD` decide): where the bindings
    /// use [`Tree::reduce_scatter`] and [`Tree::all_gather_into`] rather than an all-reduce.
    pub fn ring_for(&self, nbytes: usize) -> bool {
        self.algorithm(nbytes, &Op::Sum) != Algorithm::Tree
    }

    /// The all-reduce algorithm this rank chooses for `nbytes` with `op` (sent in the
    /// collective's meta, which every rank must agree on).
    fn algorithm(&self, nbytes: usize, op: &Op) -> Algorithm {
        // What fits the flat region takes it, ahead of the ring (FLAT-6: every rank has the same
        // cut-over); a forced PARALLEL_ALGO is kept, and a user function (never on the fast
        // path, TREE-6) keeps the algorithm its size picks.
        if self.tuning.algo == crate::plan::Algo::Auto
            && !matches!(op, Op::User(_))
            && self.flat.get().is_some_and(|r| nbytes <= r.max())
        {
            return Algorithm::Tree;
        }
        algorithms::choose(&self.plan, &self.tuning, nbytes)
    }

    /// What the algorithms see of this tree, for one collective ending by `deadline`.
    pub(crate) fn comm(&self, deadline: Deadline) -> Communicator<'_> {
        Communicator::new(
            self.rank,
            &self.links,
            &self.sender,
            deadline,
            self.tuning.chunk,
        )
    }

    /// Large all-reduce: the ring, or hierarchical across hosts (TREE-5), as [`algorithms::choose`]
    /// picks for a large buffer.
    fn large_all_reduce(
        &self,
        algo: Algorithm,
        dtype: DType,
        buf: &mut [u8],
        op: &Op,
        contributors: usize,
    ) -> Result<()> {
        let comm = self.comm(self.deadline());
        match algo {
            Algorithm::Hierarchical => algorithms::hierarchical::all_reduce(
                &comm,
                &self.plan,
                dtype,
                buf,
                op,
                contributors,
            ),
            // (the callers come here only for buffers the tree does not take)
            Algorithm::Ring | Algorithm::Tree | Algorithm::Flat => {
                algorithms::ring::all_reduce(&comm, &self.plan.ring, dtype, buf, op, contributors)
            }
        }
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.world_size() {
            return Err(Error::new(
                ErrorKind::Config,
                "tree",
                format!(
                    "root {root} is not a rank (world size {})",
                    self.world_size()
                ),
            ));
        }
        Ok(())
    }
}

/// Where a guarded user function records its first failure.
type Failed = Arc<Mutex<Option<Error>>>;

fn take(f: &Failed) -> Option<Error> {
    f.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Wraps a user reduce function so that its first failure is recorded instead of returned and
/// later calls do nothing: the pipeline runs to its end, every link stays in step, and the status
/// round ([`Tree::settle`]) reports the failure on every rank (TREE-6). Built-in ops pass through.
fn guard(op: &Op) -> (Op, Failed) {
    let failed: Failed = Arc::new(Mutex::new(None));
    let Op::User(f) = op else {
        return (op.clone(), failed);
    };
    let (f, cell) = (f.clone(), failed.clone());
    let guarded = Op::User(Arc::new(move |d: &mut [u8], s: &[u8], dt, n| {
        let mut c = cell.lock().unwrap_or_else(|p| p.into_inner());
        if c.is_none()
            && let Err(e) = f(d, s, dt, n)
        {
            *c = Some(e);
        }
        Ok(())
    }));
    (guarded, failed)
}

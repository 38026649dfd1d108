//! The Tree a user holds: the rendezvous result, its links and plan, and the collectives.
//!
//! Every collective starts with a **control pass** up the tree: each rank sends its parent a
//! small frame with the collective's sequence number, kind, op, dtype, element count, root and
//! whether it still contributes (uneven endings), plus, for small buffers, the data already
//! reduced over its subtree. The root checks that every rank called the same collective, counts
//! contributors, and sends the verdict (and, for small buffers, the result) back down. Large
//! all-reduces then run a pipelined ring (reduce-scatter, then all-gather) over the ring links.
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
//! - TREE-4: a rank that has finished (`done`) takes part with the op's identity element until all
//!   ranks have finished; each collective reports how many ranks contributed.

use crate::ops::{self, Op};
use crate::plan::{Plan, dict};
use crate::rendezvous::{self, TreeOptions};
use parallel_engine::buffer::Buf;
use parallel_engine::endpoint::Conn;
use parallel_engine::runtime::{Completion, Deadline};
use parallel_engine::value::{DType, Device, Tensor, Value};
use parallel_engine::{Error, ErrorKind, Result, Server};
use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod gpu;
mod sends;

pub use gpu::DeviceReduce;
use sends::SendScope;

/// Which collective a control frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AllReduce,
    Broadcast,
    Reduce,
    AllGather,
    Barrier,
}

impl Kind {
    fn from_code(c: i64) -> Option<Kind> {
        [
            Kind::AllReduce,
            Kind::Broadcast,
            Kind::Reduce,
            Kind::AllGather,
            Kind::Barrier,
        ]
        .into_iter()
        .find(|k| *k as i64 == c)
    }

    fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce",
            Kind::Broadcast => "broadcast",
            Kind::Reduce => "reduce",
            Kind::AllGather => "all_gather",
            Kind::Barrier => "barrier",
        }
    }
}

/// What one rank announces for a collective.
#[derive(Debug, Clone, PartialEq)]
struct Meta {
    kind: Kind,
    op: String,
    dtype: Option<DType>,
    count: usize,
    root: usize,
    /// The data are CUDA tensors (the GPU path: tree up and down, reductions on the device).
    gpu: bool,
}

impl Meta {
    fn describe(&self) -> String {
        match self.dtype {
            Some(d) => format!(
                "{}(op {}, {} x {}{}, root {})",
                self.kind.name(),
                self.op,
                self.count,
                d.name(),
                if self.gpu { " on CUDA" } else { "" },
                self.root
            ),
            None => format!("{}(root {})", self.kind.name(), self.root),
        }
    }
}

/// Per-link traffic of the tree.
#[derive(Debug, Clone, Default)]
pub struct LinkStats {
    pub peer_rank: usize,
    pub kind: &'static str,
    pub stats: parallel_engine::Stats,
}

/// Tuning of the collectives, from the environment (engine config) or set by the user.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// Buffers of at least this many bytes take the ring (when `algo` is Auto).
    pub ring_threshold: usize,
    /// Pipeline chunk of the ring, in bytes.
    pub chunk: usize,
    pub algo: crate::plan::Algo,
}

/// An allreduce tree of processes.
pub struct Tree {
    sender: Mutex<std::sync::mpsc::Sender<SendJob>>,
    rank: usize,
    plan: Plan,
    links: HashMap<usize, Arc<Conn>>,
    _server: Server,
    seq: Mutex<u64>,
    timeout: Duration,
    tuning: Tuning,
    contributors: AtomicU64,
    done: Mutex<bool>,
    failed: Mutex<Option<String>>,
    /// Device scratch of the GPU path, reused across calls.
    gpu_scratch: Mutex<Option<parallel_engine::cuda::DeviceAlloc>>,
}

/// A send for the tree's own sender thread.
type SendJob = (Arc<Conn>, Value, Deadline, Completion<()>);

/// The tree's sender thread: the ring's sends overlap its receives without borrowing the
/// engine's shared reactors (whose threads other trees of this process may be blocking on).
fn start_sender(rank: usize) -> Result<std::sync::mpsc::Sender<SendJob>> {
    let (tx, rx) = std::sync::mpsc::channel::<SendJob>();
    std::thread::Builder::new()
        .name(format!("parallel-tree-{rank}"))
        .spawn(move || {
            parallel_engine::runtime::block_signals();
            while let Ok((conn, v, deadline, done)) = rx.recv() {
                done.complete(conn.link().send(&v, deadline));
            }
        })
        .map_err(|e| {
            Error::new(
                ErrorKind::Resource,
                "tree",
                format!("cannot start the sender thread: {e}"),
            )
        })?;
    Ok(tx)
}

impl std::fmt::Debug for Tree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tree(rank {} of {})", self.rank, self.plan.world())
    }
}

fn keep() -> Arc<dyn Any + Send + Sync> {
    Arc::new(())
}

/// A tensor value over `bytes` (not owning them) for sending without a copy.
///
/// # Safety
/// The caller keeps `bytes` alive and unmodified until the send that uses the value completed.
unsafe fn view(bytes: &[u8]) -> Value {
    // SAFETY: delegated to the caller (see above).
    Value::Tensor(unsafe {
        Tensor::from_raw(
            DType::U8,
            vec![bytes.len()],
            None,
            Device::Cpu,
            bytes.as_ptr() as *mut u8,
            bytes.len(),
            keep(),
        )
    })
}

/// An out-tensor over `bytes` for receiving straight into them.
fn out_view(bytes: &mut [u8]) -> Tensor {
    // SAFETY: the tensor is used only by the recv call the caller makes while holding `bytes`.
    unsafe {
        Tensor::from_raw(
            DType::U8,
            vec![bytes.len()],
            None,
            Device::Cpu,
            bytes.as_mut_ptr(),
            bytes.len(),
            keep(),
        )
    }
}

/// The bytes of range `send` (shared) and of range `recv` (exclusive) of `buf`, which must not
/// overlap: the ring sends one segment while it receives another.
fn disjoint(
    buf: &mut [u8],
    send: std::ops::Range<usize>,
    recv: std::ops::Range<usize>,
) -> Result<(&[u8], &mut [u8])> {
    let bad = || {
        Error::new(
            ErrorKind::Protocol,
            "all_reduce",
            format!(
                "ring segments {send:?} and {recv:?} of a {}-byte buffer overlap (a bug: please report it)",
                buf.len()
            ),
        )
    };
    if send.end.max(recv.end) > buf.len() {
        return Err(bad());
    }
    if send.end <= recv.start {
        let (lo, hi) = buf.split_at_mut(recv.start);
        Ok((&lo[send], &mut hi[..recv.end - recv.start]))
    } else if recv.end <= send.start {
        let (lo, hi) = buf.split_at_mut(send.start);
        Ok((&hi[..send.end - send.start], &mut lo[recv]))
    } else {
        Err(bad())
    }
}

impl Tree {
    /// Joins the tree (rendezvous, plan, links). See [`rendezvous`].
    pub fn new(opts: TreeOptions) -> Result<Tree> {
        let cfg = parallel_engine::config::config();
        let timeout = opts.timeout.unwrap_or(cfg.timeout);
        let resolved = rendezvous::resolve(&opts)?;
        let joined = rendezvous::join(&resolved, timeout)?;
        let tuning = Tuning {
            ring_threshold: cfg.ring_threshold as usize,
            chunk: cfg.collective_chunk as usize,
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
        Ok(Tree {
            sender: Mutex::new(start_sender(joined.rank)?),
            rank: joined.rank,
            plan: joined.plan,
            links: joined.links,
            _server: joined.server,
            seq: Mutex::new(0),
            timeout,
            tuning,
            contributors: AtomicU64::new(0),
            done: Mutex::new(false),
            failed: Mutex::new(None),
            gpu_scratch: Mutex::new(None),
        })
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
            .links
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

    fn link(&self, r: usize) -> Result<&Arc<Conn>> {
        self.links.get(&r).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                "tree",
                format!("rank {} has no link to rank {r}", self.rank),
            )
        })
    }

    fn send_async(&self, conn: &Arc<Conn>, v: Value, deadline: Deadline) -> Completion<()> {
        let c = Completion::default();
        let job = (conn.clone(), v, deadline, c.clone());
        if let Err(std::sync::mpsc::SendError((_, _, _, done))) = self
            .sender
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
        {
            done.complete(Err(Error::new(
                ErrorKind::Closed,
                "tree",
                "the tree's sender thread is gone",
            )));
        }
        c
    }

    fn deadline(&self) -> Deadline {
        Deadline::after(self.timeout)
    }

    /// TREE-3: tell every neighbour, then close all links.
    fn abort(&self, e: &Error) -> Error {
        let msg = format!("rank {}: {e}", self.rank);
        let mut f = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = Some(msg.clone());
            let frame = dict(vec![("abort", Value::str(&msg))]);
            for c in self.links.values() {
                let _ = c.send(&frame, Some(Duration::from_millis(200)));
            }
            for c in self.links.values() {
                c.close();
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

    fn recv_ctrl(&self, from: usize, deadline: Deadline, out: &mut [Tensor]) -> Result<Value> {
        let c = self.link(from)?;
        let v = c
            .recv_into(out, Some(deadline.remaining()))
            .map_err(|e| Error::new(e.kind(), "tree", format!("from rank {from}: {e}")))?;
        if let Some(m) = v.get("abort").and_then(Value::as_str) {
            return Err(Error::new(
                ErrorKind::PeerLost,
                "tree",
                format!("rank {from} aborted the collective: {m}"),
            ));
        }
        Ok(v)
    }

    fn next_seq(&self) -> u64 {
        let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *s += 1;
        *s
    }

    /// The control pass, and the data path of small buffers (TREE-1, TREE-2, TREE-4).
    ///
    /// `meta`: what this rank calls, or None for a finished rank serving the others. `data`: this
    /// rank's buffer when `carry_data` (reduced going up, overwritten with the result coming
    /// down); `contributes`: whether `data` holds a contribution (false for finished ranks and,
    /// in a broadcast, for every rank but the root). Partial results travel up as a list of
    /// tensors; the first rank that knows the op reduces them, in order.
    fn pass(
        &self,
        meta: Option<&Meta>,
        op: Option<&Op>,
        mut data: Option<&mut [u8]>,
        carry_data: bool,
        contributes: bool,
    ) -> Result<Verdict> {
        let deadline = self.deadline();
        let seq = self.next_seq();
        let idle = meta.is_none();
        let mut n_active = usize::from(!idle);
        let mut culprit: Option<String> = None;
        let mut reference: Option<Meta> = meta.cloned();
        let mut partials: Vec<Vec<u8>> = Vec::new();
        let mut have_own = carry_data && contributes && data.is_some();
        for &child in &self.plan.children[self.rank] {
            let v = self.recv_ctrl(child, deadline, &mut [])?;
            if field(&v, "seq").and_then(Value::as_int) != Some(seq as i64) {
                culprit.get_or_insert(format!(
                    "rank {child} is at collective #{}, rank {} at #{seq}",
                    field(&v, "seq").and_then(Value::as_int).unwrap_or(-1),
                    self.rank
                ));
            }
            n_active += field(&v, "active")
                .and_then(Value::as_int)
                .unwrap_or(0)
                .max(0) as usize;
            if let Some(c) = field(&v, "culprit").and_then(Value::as_str) {
                culprit.get_or_insert(c.to_string());
            }
            if let Some(theirs) = field(&v, "meta").map(parse_meta).transpose()? {
                match &reference {
                    None => reference = Some(theirs),
                    Some(mine) if !same_call(mine, &theirs) => {
                        let who = field(&v, "caller")
                            .and_then(Value::as_int)
                            .unwrap_or(child as i64);
                        culprit.get_or_insert(format!(
                            "rank {who} called {} but rank {} called {}",
                            theirs.describe(),
                            self.rank,
                            mine.describe()
                        ));
                    }
                    _ => {}
                }
            }
            if let Some(Value::List(parts)) = field(&v, "data") {
                for t in parts {
                    let Some(b) = t.as_tensor().and_then(Tensor::bytes) else {
                        continue;
                    };
                    let want = reference
                        .as_ref()
                        .and_then(|m| m.dtype.map(|d| m.count * d.itemsize()));
                    if want.is_some_and(|w| w != b.len()) {
                        culprit.get_or_insert(format!(
                            "rank {child}'s subtree sent {} bytes for {}",
                            b.len(),
                            reference.as_ref().map(Meta::describe).unwrap_or_default()
                        ));
                        continue;
                    }
                    match (&mut data, have_own, op, reference.as_ref()) {
                        (Some(d), true, Some(op), Some(m)) if carry_data => combine(op, m, d, b)?,
                        (Some(d), false, _, _) if carry_data && !idle => {
                            d.copy_from_slice(b);
                            have_own = true;
                        }
                        _ => partials.push(b.to_vec()),
                    }
                }
            }
        }
        // A finished rank that knows the op (built-in, or given to done()) reduces what it holds.
        if partials.len() > 1
            && let (Some(m), Some(dt)) =
                (reference.as_ref(), reference.as_ref().and_then(|m| m.dtype))
            && let Some(op) = op.cloned().or_else(|| Op::parse(&m.op).ok())
        {
            let (first, rest) = partials.split_at_mut(1);
            for r in rest.iter() {
                combine(&op, m, &mut first[0], r)?;
            }
            partials.truncate(1);
            let _ = dt;
        }
        let verdict = match self.plan.parent[self.rank] {
            Some(parent) => {
                let mut items = vec![
                    ("seq", Value::Int(seq as i64)),
                    ("caller", Value::Int(self.rank as i64)),
                    ("active", Value::Int(n_active as i64)),
                ];
                if let Some(m) = &reference {
                    items.push(("meta", meta_value(m)));
                }
                if let Some(c) = &culprit {
                    items.push(("culprit", Value::str(c)));
                }
                let mut parts: Vec<Value> = Vec::new();
                if culprit.is_none() {
                    if have_own && let Some(d) = data.as_deref() {
                        // SAFETY: `data` outlives the synchronous send below.
                        parts.push(unsafe { view(d) });
                    }
                    for p in &partials {
                        // SAFETY: `partials` outlives the synchronous send below.
                        parts.push(unsafe { view(p) });
                    }
                }
                items.push(("data", Value::List(parts)));
                self.link(parent)?
                    .send(&frame(&UP, items), Some(deadline.remaining()))?;
                let v = self.recv_ctrl(parent, deadline, &mut [])?;
                if field(&v, "seq").and_then(Value::as_int) != Some(seq as i64) && culprit.is_none()
                {
                    culprit = Some(format!(
                        "rank {parent} answered collective #{} to #{seq}",
                        field(&v, "seq").and_then(Value::as_int).unwrap_or(-1)
                    ));
                }
                Verdict::from_value(&v, culprit)?
            }
            None => {
                let result = if have_own {
                    data.as_deref().map(<[u8]>::to_vec)
                } else {
                    partials.into_iter().next()
                };
                Verdict {
                    contributors: n_active,
                    meta: reference,
                    culprit,
                    data: result,
                }
            }
        };
        for &child in &self.plan.children[self.rank] {
            self.link(child)?
                .send(&verdict.to_value(seq), Some(deadline.remaining()))?;
        }
        if let Some(c) = &verdict.culprit {
            let what = meta.map_or("done", |m| m.kind.name());
            return Err(Error::new(
                ErrorKind::Mismatch,
                what,
                format!("collective mismatch: {c}"),
            ));
        }
        if carry_data
            && let (Some(d), Some(r)) = (data, verdict.data.as_ref())
            && d.len() == r.len()
        {
            d.copy_from_slice(r);
        }
        self.contributors
            .store(verdict.contributors as u64, Ordering::SeqCst);
        Ok(verdict)
    }

    fn run<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check_usable()?;
        match f() {
            Ok(v) => Ok(v),
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
        let meta = Meta {
            kind: Kind::AllReduce,
            op: op.name().into(),
            dtype: Some(dtype),
            count: buf.len() / dtype.itemsize(),
            root: 0,
            gpu: false,
        };
        self.run(|| {
            if self.uses_ring(buf.len()) {
                let v = self.pass(Some(&meta), Some(op), None, false, true)?;
                self.large_all_reduce(dtype, buf, op, v.contributors)?;
                Ok(v.contributors)
            } else {
                let v = self.pass(Some(&meta), Some(op), Some(&mut *buf), true, true)?;
                if matches!(op, Op::Avg) {
                    ops::divide(dtype, buf, v.contributors);
                }
                Ok(v.contributors)
            }
        })
    }

    /// Pipelined ring all-reduce: reduce-scatter, then all-gather (TREE-1).
    fn ring_all_reduce(
        &self,
        dtype: DType,
        buf: &mut [u8],
        op: &Op,
        contributors: usize,
    ) -> Result<()> {
        let ring = self.plan.ring.clone();
        self.ring_over(&ring, dtype, buf, op, contributors)
    }

    /// Large all-reduce: a flat ring on one host (or one rank per host); across hosts with
    /// several ranks each, hierarchical: reduce to each host's leader over shared memory, a ring
    /// of the leaders across hosts, then a broadcast inside each host (TREE-5). Each host's
    /// network link then carries 2(H-1)/H of the data instead of the flat ring's 2(p-1)/p x k/...
    fn large_all_reduce(
        &self,
        dtype: DType,
        buf: &mut [u8],
        op: &Op,
        contributors: usize,
    ) -> Result<()> {
        if !self.plan.hierarchical() {
            return self.ring_all_reduce(dtype, buf, op, contributors);
        }
        let host = self.plan.host_of[self.rank];
        let leader = self.plan.hosts[host][0];
        let up = self.plan.parent[self.rank].filter(|p| self.plan.host_of[*p] == host);
        let down: Vec<usize> = self.plan.children[self.rank]
            .iter()
            .copied()
            .filter(|c| self.plan.host_of[*c] == host)
            .collect();
        let item = dtype.itemsize();
        let chunk = (self.tuning.chunk / item).max(1) * item;
        let deadline = self.deadline();
        let n = buf.len();
        let base = buf.as_mut_ptr();
        let mut scratch = Buf::with_len(chunk.min(n.max(1)))?;
        // 1. Reduce inside the host, chunk by chunk, up the host's tree. The sends go through a
        // scope (SEND-1), ended before phase 2 writes buf, and on every early return.
        let mut sends = SendScope::new(self, deadline);
        for a in (0..n.max(1)).step_by(chunk) {
            let b = (a + chunk).min(n);
            // SAFETY: [a, b) lies in buf, and the chunks are disjoint; a chunk is written (reduced
            // into) only before its send starts, and not again until the scope ended.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(a), b - a) };
            for &c in &down {
                let s = &mut scratch[..b - a];
                self.link(c)?
                    .recv_into(&mut [out_view(s)], Some(deadline.remaining()))
                    .map_err(|e| {
                        Error::new(
                            e.kind(),
                            "all_reduce",
                            format!("host reduce from rank {c}: {e}"),
                        )
                    })?;
                ops::reduce_into(op, dtype, dst, s)?;
            }
            if let Some(p) = up {
                sends.send(self.link(p)?, dst);
            }
        }
        sends.wait_all("all_reduce")?;
        drop(sends);
        // 2. The leaders all-reduce across hosts.
        if self.rank == leader {
            let ring: Vec<usize> = self.plan.hosts.iter().map(|h| h[0]).collect();
            self.ring_over(&ring, dtype, buf, op, contributors)?;
        } else if matches!(op, Op::Avg) {
            // (the leaders' ring divides; the others receive the divided result)
        }
        // 3. Broadcast inside the host, chunk by chunk, down the host's tree.
        let mut sends = SendScope::new(self, deadline);
        for a in (0..n.max(1)).step_by(chunk) {
            let b = (a + chunk).min(n);
            // SAFETY: [a, b) lies in buf; no send of it is in flight while we receive into it.
            let dst = unsafe { std::slice::from_raw_parts_mut(base.add(a), b - a) };
            if let Some(p) = up {
                self.link(p)?
                    .recv_into(&mut [out_view(dst)], Some(deadline.remaining()))
                    .map_err(|e| {
                        Error::new(
                            e.kind(),
                            "all_reduce",
                            format!("host broadcast from rank {p}: {e}"),
                        )
                    })?;
            }
            for &c in &down {
                sends.send(self.link(c)?, dst);
            }
        }
        sends.wait_all("all_reduce")
    }

    /// Pipelined ring all-reduce over the ranks of `ring` (in that order), which must include
    /// this rank: reduce-scatter, then all-gather (TREE-1).
    fn ring_over(
        &self,
        ring: &[usize],
        dtype: DType,
        buf: &mut [u8],
        op: &Op,
        contributors: usize,
    ) -> Result<()> {
        let p = ring.len();
        if p < 2 {
            if matches!(op, Op::Avg) {
                ops::divide(dtype, buf, contributors);
            }
            return Ok(());
        }
        let item = dtype.itemsize();
        let count = buf.len() / item;
        let pos = ring.iter().position(|r| *r == self.rank).expect("in ring");
        let (left, right) = (ring[(pos + p - 1) % p], ring[(pos + 1) % p]);
        let (lc, rc) = (self.link(left)?.clone(), self.link(right)?.clone());
        let seg = |s: usize| -> (usize, usize) {
            let base = count / p;
            let extra = count % p;
            let start = s * base + s.min(extra);
            let len = base + usize::from(s < extra);
            (start * item, len * item)
        };
        // At least ~4 chunks per segment so the copy of one overlaps the reduction of the last, but
        // not under 256 KiB, where per-chunk costs start to show.
        let target = (buf.len() / p / 4).max(256 << 10).min(self.tuning.chunk);
        let chunk = (target / item).max(1) * item;
        let deadline = self.deadline();
        let mut scratch = Buf::with_len(chunk.min(buf.len().max(1)))?;
        // One step: send segment `send_s` to the right while receiving segment `recv_s` from the
        // left, chunk by chunk; `reduce`: combine into our copy, else receive straight into it.
        // The sends borrow the send segment through a scope (SEND-1): the borrow checker keeps
        // it unwritten until they completed, and an early `?` waits for (or interrupts) them.
        let mut step = |buf: &mut [u8], send_s: usize, recv_s: usize, reduce: bool| -> Result<()> {
            let (so, sl) = seg(send_s);
            let (ro, rl) = seg(recv_s);
            let (send, recv) = disjoint(buf, so..so + sl, ro..ro + rl)?;
            let chunks = sl.max(rl).div_ceil(chunk).max(1);
            let mut sends = SendScope::new(self, deadline);
            for k in 0..chunks {
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(sl));
                if a < b || (k == 0 && sl == 0) {
                    sends.send(&rc, &send[a..b.max(a)]);
                }
                let (a, b) = (k * chunk, ((k + 1) * chunk).min(rl));
                if a < b || (k == 0 && rl == 0) {
                    let n = b.saturating_sub(a);
                    let dst = &mut recv[a..a + n];
                    // Reduce: receive into the scratch chunk, then combine; else straight into buf.
                    let into: &mut [u8] = if reduce { &mut scratch[..n] } else { &mut *dst };
                    lc.recv_into(&mut [out_view(into)], Some(deadline.remaining()))
                        .map_err(|e| {
                            Error::new(
                                e.kind(),
                                "all_reduce",
                                format!("ring step from rank {left}: {e}"),
                            )
                        })?;
                    if reduce {
                        ops::reduce_into(op, dtype, dst, &scratch[..n])?;
                    }
                }
            }
            sends.wait_all("all_reduce").map_err(|e| {
                Error::new(
                    e.kind(),
                    "all_reduce",
                    format!("ring step to rank {right}: {e}"),
                )
            })
        };
        for s in 0..p - 1 {
            step(buf, (pos + p - s) % p, (pos + p - s - 1) % p, true)?;
        }
        let own = (pos + 1) % p;
        if matches!(op, Op::Avg) {
            let (o, l) = seg(own);
            // Our fully reduced segment; no send is in flight (every step's scope ended).
            ops::divide(dtype, &mut buf[o..o + l], contributors);
        }
        for s in 0..p - 1 {
            step(buf, (pos + 1 + p - s) % p, (pos + p - s) % p, false)?;
        }
        Ok(())
    }

    /// Broadcast `buf` from `root` to every rank (the original's "scatter").
    pub fn broadcast(&self, dtype: DType, buf: &mut [u8], root: usize) -> Result<()> {
        self.check_root(root)?;
        let meta = Meta {
            kind: Kind::Broadcast,
            op: "copy".into(),
            dtype: Some(dtype),
            count: buf.len() / dtype.itemsize(),
            root,
            gpu: false,
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
            kind: Kind::Reduce,
            op: op.name().into(),
            dtype: Some(dtype),
            count: buf.len() / dtype.itemsize(),
            root,
            gpu: false,
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

    /// Every rank's bytes, in rank order (sizes may differ between ranks).
    pub fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let meta = Meta {
            kind: Kind::AllGather,
            op: "gather".into(),
            dtype: None,
            count: 0,
            root: 0,
            gpu: false,
        };
        self.run(|| {
            // Gather: each rank's piece travels up as bytes, packed with its length.
            let world = self.world_size();
            let mut pieces: Vec<Option<Vec<u8>>> = vec![None; world];
            pieces[self.rank] = Some(mine.to_vec());
            let packed = self.gather_pieces(&meta, &mut pieces)?;
            Ok(packed)
        })
    }

    fn gather_pieces(&self, meta: &Meta, pieces: &mut [Option<Vec<u8>>]) -> Result<Vec<Vec<u8>>> {
        let deadline = self.deadline();
        let seq = self.next_seq();
        let mut culprit: Option<String> = None;
        for &child in &self.plan.children[self.rank] {
            let v = self.recv_ctrl(child, deadline, &mut [])?;
            let their = v.get("meta").map(parse_meta).transpose()?;
            if v.get("seq").and_then(Value::as_int) != Some(seq as i64)
                || their.as_ref().is_none_or(|t| t.kind != meta.kind)
            {
                let desc = their
                    .as_ref()
                    .map(Meta::describe)
                    .unwrap_or_else(|| "done()".into());
                culprit.get_or_insert(format!(
                    "rank {} called {desc} but rank {} called {}",
                    v.get("caller")
                        .and_then(Value::as_int)
                        .unwrap_or(child as i64),
                    self.rank,
                    meta.describe()
                ));
            }
            if let Some(c) = v.get("culprit").and_then(Value::as_str) {
                culprit.get_or_insert(c.to_string());
            }
            absorb_pieces(&v, pieces);
        }
        let pack = |pieces: &[Option<Vec<u8>>]| -> Value {
            Value::List(
                pieces
                    .iter()
                    .enumerate()
                    .filter_map(|(r, p)| {
                        p.as_ref().map(|b| {
                            Value::Tuple(vec![Value::Int(r as i64), Value::bytes(b.clone())])
                        })
                    })
                    .collect(),
            )
        };
        if let Some(parent) = self.plan.parent[self.rank] {
            let mut items = vec![
                ("seq", Value::Int(seq as i64)),
                ("caller", Value::Int(self.rank as i64)),
                ("meta", meta_value(meta)),
            ];
            if let Some(c) = &culprit {
                items.push(("culprit", Value::str(c)));
            }
            items.push(("pieces", pack(pieces)));
            self.link(parent)?
                .send(&dict(items), Some(deadline.remaining()))?;
            let v = self.recv_ctrl(parent, deadline, &mut [])?;
            if let Some(c) = v.get("culprit").and_then(Value::as_str) {
                culprit = Some(c.to_string());
            }
            absorb_pieces(&v, pieces);
        }
        for &child in &self.plan.children[self.rank] {
            let mut items = vec![("seq", Value::Int(seq as i64))];
            if let Some(c) = &culprit {
                items.push(("culprit", Value::str(c)));
            }
            items.push(("pieces", pack(pieces)));
            self.link(child)?
                .send(&dict(items), Some(deadline.remaining()))?;
        }
        if let Some(c) = culprit {
            return Err(Error::new(
                ErrorKind::Mismatch,
                "all_gather",
                format!("collective mismatch: {c}"),
            ));
        }
        pieces
            .iter_mut()
            .enumerate()
            .map(|(r, p)| {
                p.take().ok_or_else(|| {
                    Error::new(
                        ErrorKind::Protocol,
                        "all_gather",
                        format!("rank {r}'s piece is missing"),
                    )
                })
            })
            .collect()
    }

    /// Waits until every rank reached the barrier; returns how many ranks still contribute.
    pub fn barrier(&self) -> Result<usize> {
        let meta = Meta {
            kind: Kind::Barrier,
            op: "none".into(),
            dtype: None,
            count: 0,
            root: 0,
            gpu: false,
        };
        self.run(|| {
            self.pass(Some(&meta), None, None, false, false)
                .map(|v| v.contributors)
        })
    }

    /// Uneven endings (TREE-4): this rank has no more data. It keeps answering the other ranks'
    /// collectives, contributing the op's identity element, until every rank called `done`;
    /// returns how many collectives it served. `op` is needed only for a user reduce function
    /// (a finished rank with several contributing children must apply it).
    pub fn done(&self, op: Option<&Op>, timeout: Option<Duration>) -> Result<usize> {
        *self.done.lock().unwrap_or_else(|p| p.into_inner()) = true;
        let end = Instant::now() + timeout.unwrap_or(self.timeout);
        let mut served = 0;
        loop {
            if Instant::now() > end {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "done",
                    "the other ranks kept running collectives past the timeout",
                ));
            }
            self.check_usable()?;
            let v = match self.pass(None, op, None, false, false) {
                Ok(v) => v,
                Err(e) if e.kind() == ErrorKind::Mismatch => return Err(e),
                Err(e) => return Err(self.abort(&e)),
            };
            if v.contributors == 0 {
                return Ok(served);
            }
            served += 1;
            // Join the device path of a CUDA all-reduce (identity data) or broadcast (relaying),
            // in host memory.
            if let Some(m) = &v.meta
                && m.gpu
            {
                let r = match m.kind {
                    Kind::AllReduce | Kind::Reduce => self.serve_gpu_all_reduce(m, op),
                    Kind::Broadcast => self.serve_gpu_broadcast(m),
                    _ => Ok(()),
                };
                if let Err(e) = r {
                    return Err(self.abort(&e));
                }
                continue;
            }
            // Join the ring part of a large all-reduce with identity data.
            if let Some(m) = &v.meta
                && m.kind == Kind::AllReduce
                && let Some(dt) = m.dtype
                && self.uses_ring(m.count * dt.itemsize())
            {
                let op = op
                    .cloned()
                    .or_else(|| Op::parse(&m.op).ok())
                    .unwrap_or(Op::Sum);
                let mut buf = vec![0u8; m.count * dt.itemsize()];
                ops::identity(&op, dt, &mut buf);
                if let Err(e) = self.large_all_reduce(dt, &mut buf, &op, v.contributors) {
                    return Err(self.abort(&e));
                }
            }
        }
    }

    fn uses_ring(&self, nbytes: usize) -> bool {
        self.world_size() > 1
            && match self.tuning.algo {
                crate::plan::Algo::Ring => true,
                crate::plan::Algo::Tree => false,
                crate::plan::Algo::Auto => nbytes >= self.tuning.ring_threshold,
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

/// Takes the (rank, bytes) pieces an all-gather frame carries.
fn absorb_pieces(v: &Value, pieces: &mut [Option<Vec<u8>>]) {
    let Some(Value::List(items)) = v.get("pieces") else {
        return;
    };
    for it in items {
        if let Value::Tuple(t) = it
            && let [Value::Int(r), Value::Bytes(b)] = &t[..]
            && (*r as usize) < pieces.len()
        {
            pieces[*r as usize] = Some(b.to_vec());
        }
    }
}

/// The outcome of a control pass, as every rank learns it.
#[derive(Debug)]
struct Verdict {
    contributors: usize,
    meta: Option<Meta>,
    culprit: Option<String>,
    data: Option<Vec<u8>>,
}

impl Verdict {
    fn to_value(&self, seq: u64) -> Value {
        let mut items = vec![
            ("seq", Value::Int(seq as i64)),
            ("contributors", Value::Int(self.contributors as i64)),
        ];
        if let Some(m) = &self.meta {
            items.push(("meta", meta_value(m)));
        }
        if let Some(c) = &self.culprit {
            items.push(("culprit", Value::str(c)));
        }
        if self.culprit.is_none()
            && let Some(d) = &self.data
        {
            // SAFETY: `self.data` outlives the synchronous sends of this value.
            items.push(("data", unsafe { view(d) }));
        }
        frame(&DOWN, items)
    }

    fn from_value(v: &Value, culprit: Option<String>) -> Result<Verdict> {
        Ok(Verdict {
            contributors: field(v, "contributors")
                .and_then(Value::as_int)
                .unwrap_or(0)
                .max(0) as usize,
            meta: field(v, "meta").map(parse_meta).transpose()?,
            culprit: culprit.or_else(|| {
                field(v, "culprit")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }),
            data: field(v, "data")
                .and_then(Value::as_tensor)
                .and_then(Tensor::bytes)
                .map(<[u8]>::to_vec),
        })
    }
}

/// `dst = dst op src` for a reducing collective; a broadcast's "combine" takes the source.
fn combine(op: &Op, m: &Meta, dst: &mut [u8], src: &[u8]) -> Result<()> {
    match (m.kind, m.dtype) {
        (Kind::Broadcast, _) => {
            dst.copy_from_slice(src);
            Ok(())
        }
        (_, Some(dt)) => ops::reduce_into(op, dt, dst, src),
        _ => Ok(()),
    }
}

fn meta_value(m: &Meta) -> Value {
    Value::Tuple(vec![
        Value::Int(m.kind as i64),
        Value::str(&m.op),
        m.dtype.map_or(Value::None, |d| Value::Int(d as u8 as i64)),
        Value::Int(m.count as i64),
        Value::Int(m.root as i64),
        Value::Bool(m.gpu),
    ])
}

fn parse_meta(v: &Value) -> Result<Meta> {
    let bad = || Error::new(ErrorKind::Protocol, "tree", "malformed control frame");
    let Value::Tuple(t) = v else {
        return Err(bad());
    };
    let [
        Value::Int(kind),
        Value::Str(op),
        dtype,
        Value::Int(count),
        Value::Int(root),
        _,
    ] = &t[..]
    else {
        return Err(bad());
    };
    Ok(Meta {
        kind: Kind::from_code(*kind).ok_or_else(bad)?,
        op: op.clone(),
        dtype: dtype.as_int().and_then(|c| DType::from_code(c as u8)),
        count: (*count).max(0) as usize,
        root: (*root).max(0) as usize,
        gpu: matches!(t.get(5), Some(Value::Bool(true))),
    })
}

/// Field names of the two control frames, in their positional order. Control frames are tuples
/// (no key strings to archive and allocate on the hot path); absent fields are None.
const UP: [&str; 6] = ["seq", "caller", "active", "meta", "culprit", "data"];
const DOWN: [&str; 5] = ["seq", "contributors", "meta", "culprit", "data"];

/// Builds a control frame from named items (any order; missing ones become None).
fn frame(names: &[&str], mut items: Vec<(&str, Value)>) -> Value {
    Value::Tuple(
        names
            .iter()
            .map(|n| match items.iter().position(|(k, _)| k == n) {
                Some(i) => items.swap_remove(i).1,
                None => Value::None,
            })
            .collect(),
    )
}

/// A named field of a control frame (tuple) or of a dict frame; None when absent.
fn field<'a>(v: &'a Value, name: &str) -> Option<&'a Value> {
    let got = match v {
        Value::Tuple(t) => {
            let names: &[&str] = if t.len() == UP.len() { &UP } else { &DOWN };
            names.iter().position(|n| *n == name).and_then(|i| t.get(i))
        }
        _ => v.get(name),
    };
    got.filter(|x| !matches!(x, Value::None))
}

/// Two ranks called the same collective (TREE-2).
fn same_call(a: &Meta, b: &Meta) -> bool {
    a == b
}

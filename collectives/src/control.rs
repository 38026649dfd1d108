//! The Tree's typed control messages: the control pass up the tree ([`Up`]) and the verdict
//! (just over 600 lines: every message type and its one validating decoder live together)
//! down ([`Verdict`]), as rkyv-archived structs behind a magic and a protocol version, decoded
//! and validated at one choke point ([`recv`]) into checked types. The data a pass carries
//! (small buffers, partial results, all-gather pieces) travel as raw payload segments after the
//! control bytes, sent from the caller's memory; the control bytes say how many there are and
//! what each one is.
//!
//! On a link a control message is one message `[Bytes(control), Tensor(segment)...]`, where
//! `control` is `b"PCTL"`, the protocol version (u16, little-endian), two reserved zero bytes,
//! then the archive. (A frame kind of its own on the link is the next step, once the links'
//! move to `engine/src/link` has landed; until then, the magic keeps a user value from ever
//! being taken for protocol, and the reverse.)
//!
//! Invariants:
//! - CTRL-1: bytes from a peer are untrusted: every field is checked once, here (archive
//!   layout, kind and dtype codes, segment count and sizes, ranks below the world size); a bad
//!   frame is a `Protocol` error naming the peer, never a panic.
//! - CTRL-2: a peer speaking another protocol version is told apart from a garbled frame: the
//!   error names both versions and says to run the same Parallel version on every rank.

use crate::algorithms::Algorithm;
use crate::ops::{self, Op};
use parallel_engine::endpoint::Conn;
use parallel_engine::runtime::Deadline;
use parallel_engine::value::{DType, Device, Tensor, Value};
use parallel_engine::{Error, ErrorKind, Result};
use rkyv::rancor::Error as RkyvError;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use std::borrow::Cow;
use std::sync::Arc;

/// The version of the control protocol this build speaks (CTRL-2).
pub const VERSION: u16 = 5;
const MAGIC: [u8; 4] = *b"PCTL";
const HEADER: usize = 8;

/// Which collective a control frame belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    AllReduce,
    Broadcast,
    Reduce,
    AllGather,
    Barrier,
    /// Pairwise exchange; the pass carries each rank's piece sizes (sent and expected), checked
    /// for agreement at rank 0 (since protocol version 3).
    AllToAll,
    /// A ring reduce-scatter over equal parts, part r to rank r (since protocol version 5).
    ReduceScatter,
    /// A ring all-gather of equal parts, part r from rank r, into every rank's buffer (since
    /// protocol version 5).
    AllGatherInto,
}

impl Kind {
    const ALL: [Kind; 8] = [
        Kind::AllReduce,
        Kind::Broadcast,
        Kind::Reduce,
        Kind::AllGather,
        Kind::Barrier,
        Kind::AllToAll,
        Kind::ReduceScatter,
        Kind::AllGatherInto,
    ];

    fn from_code(c: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == c)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::AllReduce => "all_reduce",
            Kind::Broadcast => "broadcast",
            Kind::Reduce => "reduce",
            Kind::AllGather => "all_gather",
            Kind::Barrier => "barrier",
            Kind::AllToAll => "all_to_all",
            Kind::ReduceScatter => "reduce_scatter",
            Kind::AllGatherInto => "all_gather_into",
        }
    }
}

/// What one rank announces for a collective.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Meta {
    pub kind: Kind,
    /// The op's name: borrowed for this rank's own calls (no allocation per collective), owned
    /// when decoded from a peer.
    pub op: Cow<'static, str>,
    pub dtype: Option<DType>,
    pub count: usize,
    pub root: usize,
    /// The data are CUDA tensors (the GPU path: tree up and down, reductions on the device).
    pub gpu: bool,
    /// Hash of the structure of the nested value the data come from (0: none), set by the
    /// bindings through `Tree::with_structure` (TREE-7).
    pub sig: u64,
    /// Not the first control pass of the user's call (another dtype group of one nested value):
    /// a finished rank counts only first passes (TREE-4).
    pub cont: bool,
    /// How the data move after this pass (an all-reduce's algorithm as the caller chose it from
    /// its size and its PARALLEL_ALGO / PARALLEL_RING_THRESHOLD; `Tree` for every other kind).
    /// Part of the comparison: ranks that would choose differently fail with a Mismatch instead
    /// of one taking the other's partial data for the result; a finished rank follows it.
    pub algo: Algorithm,
}

impl Meta {
    /// A rank's own announcement of a host collective with root 0, no structure signature, as
    /// the first pass of its call; set `root` and `gpu` by struct update where they differ.
    pub fn new(
        kind: Kind,
        op: &'static str,
        dtype: Option<DType>,
        count: usize,
        algo: Algorithm,
    ) -> Meta {
        Meta {
            kind,
            op: op.into(),
            dtype,
            count,
            root: 0,
            gpu: false,
            sig: 0,
            cont: false,
            algo,
        }
    }

    /// The op that reduces this collective's data on a rank holding `given`: the collective's
    /// own built-in op, or `given` when the ranks called it with a user function. A finished rank
    /// gives the function passed to `done`, which must never replace a built-in op (TREE-4).
    pub fn reducing_op(&self, given: Option<&Op>) -> Option<Op> {
        match Op::parse(&self.op) {
            Ok(builtin) => Some(builtin),
            Err(_) if self.op == ops::USER_NAME => given.cloned(),
            Err(_) => None,
        }
    }

    pub fn describe(&self) -> String {
        if let (Kind::AllToAll, Some(d)) = (self.kind, self.dtype) {
            return format!("all_to_all({})", d.name());
        }
        match self.dtype {
            Some(d) => format!(
                "{}(op {}, {} x {}{}, root {}{})",
                self.kind.name(),
                self.op,
                self.count,
                d.name(),
                if self.gpu { " on CUDA" } else { "" },
                self.root,
                match self.algo {
                    Algorithm::Tree | Algorithm::Flat => "",
                    Algorithm::Ring => {
                        ", by the ring (check PARALLEL_ALGO and PARALLEL_RING_THRESHOLD on every rank)"
                    }
                    Algorithm::Hierarchical => {
                        ", hierarchical (check PARALLEL_ALGO and PARALLEL_RING_THRESHOLD on every rank)"
                    }
                }
            ),
            None => format!("{}(root {})", self.kind.name(), self.root),
        }
    }
}

/// A received payload segment: the receive buffer itself (no copy on the way up).
#[derive(Debug)]
pub(crate) enum Seg {
    /// A contiguous host tensor (checked at decoding: [`Tensor::bytes`] is `Some`).
    Received(Tensor),
    /// Bytes made by the decoding tests.
    #[cfg(test)]
    Owned(Vec<u8>),
}

impl std::ops::Deref for Seg {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Seg::Received(t) => t.bytes().unwrap_or(&[]),
            #[cfg(test)]
            Seg::Owned(v) => v,
        }
    }
}

impl Seg {
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            #[cfg(test)]
            Seg::Owned(v) => v,
            Seg::Received(t) => t.bytes().map(<[u8]>::to_vec).unwrap_or_default(),
        }
    }
}

/// One rank's report up the tree in a control pass (its subtree's, with its own).
#[derive(Debug, Default)]
pub(crate) struct Up {
    pub seq: u64,
    /// The rank that made this report.
    pub caller: usize,
    /// How many ranks of the subtree contribute.
    pub active: usize,
    pub meta: Option<Meta>,
    pub culprit: Option<String>,
    pub error: Option<(ErrorKind, String)>,
    /// Ranks of the subtree that are done (TREE-4).
    pub idle: Vec<usize>,
    /// The subtree's data: its reduced buffer, or partial results a finished rank could not
    /// combine, in order.
    pub data: Vec<Seg>,
    /// all_gather: (rank, bytes) of the subtree's contributing ranks.
    pub pieces: Vec<(usize, Vec<u8>)>,
}

/// The outcome of a control pass, as every rank learns it.
#[derive(Debug, Default)]
pub(crate) struct Verdict {
    pub contributors: usize,
    pub meta: Option<Meta>,
    pub culprit: Option<String>,
    /// An error every rank raises: a reduce function that failed (Worker), a done root (Config).
    pub error: Option<(ErrorKind, String)>,
    pub data: Option<Vec<u8>>,
    /// Partial results a finished root could not combine (it lacks the user function): every
    /// contributing rank reduces them in this order, then the ranks settle (TREE-6).
    pub parts: Vec<Vec<u8>>,
    /// all_gather: (rank, bytes) of every contributing rank, in rank order.
    pub pieces: Vec<(usize, Vec<u8>)>,
    /// The collective finished on the shared-memory fast path (FLAT-1), not by the pass.
    pub flat: bool,
}

/// A decoded control message.
#[derive(Debug)]
pub(crate) enum Control {
    Up(Up),
    Down { seq: u64, verdict: Verdict },
}

// The archived forms: plain numbers and strings, checked when turned into the types above.

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WireMeta {
    kind: u8,
    op: String,
    dtype: Option<u8>,
    count: u64,
    root: u64,
    gpu: bool,
    sig: u64,
    cont: bool,
    /// 0 tree, 1 ring, 2 hierarchical.
    algo: u8,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WireError {
    /// 1: Config (a refused call), 0: Worker (a reduce function that raised).
    code: u8,
    msg: String,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WireUp {
    seq: u64,
    caller: u64,
    active: u64,
    meta: Option<WireMeta>,
    culprit: Option<String>,
    error: Option<WireError>,
    idle: Vec<u64>,
    /// How many data segments follow (before the pieces).
    data: u32,
    /// The rank of each piece segment, which follow the data segments.
    pieces: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum WireData {
    None,
    /// One segment: the result.
    Result,
    /// This many segments: partial results to reduce in order.
    Parts(u32),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WireDown {
    seq: u64,
    contributors: u64,
    meta: Option<WireMeta>,
    culprit: Option<String>,
    error: Option<WireError>,
    data: WireData,
    pieces: Vec<u64>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Wire {
    Up(WireUp),
    Down(WireDown),
}

fn wire_meta(m: &Meta) -> WireMeta {
    WireMeta {
        kind: m.kind as u8,
        op: m.op.to_string(),
        dtype: m.dtype.map(|d| d as u8),
        count: m.count as u64,
        root: m.root as u64,
        gpu: m.gpu,
        sig: m.sig,
        cont: m.cont,
        algo: m.algo.code(),
    }
}

fn wire_error((kind, msg): &(ErrorKind, String)) -> WireError {
    WireError {
        code: u8::from(*kind == ErrorKind::Config),
        msg: msg.clone(),
    }
}

/// A control message with the data segments it carries, borrowed for one synchronous send.
pub(crate) enum Outgoing<'a> {
    Up {
        up: &'a Up,
        /// The data segments (the report's own `data` is not used: these are borrowed).
        data: Vec<&'a [u8]>,
        pieces: &'a [(usize, Vec<u8>)],
    },
    Down {
        seq: u64,
        verdict: &'a Verdict,
    },
}

/// The control bytes of `msg` and its segments, in order.
fn encode<'a>(msg: &'a Outgoing<'a>) -> Result<(Vec<u8>, Vec<&'a [u8]>)> {
    let (wire, segs): (Wire, Vec<&[u8]>) = match msg {
        Outgoing::Up { up, data, pieces } => (
            Wire::Up(WireUp {
                seq: up.seq,
                caller: up.caller as u64,
                active: up.active as u64,
                meta: up.meta.as_ref().map(wire_meta),
                culprit: up.culprit.clone(),
                error: up.error.as_ref().map(wire_error),
                idle: up.idle.iter().map(|r| *r as u64).collect(),
                data: data.len() as u32,
                pieces: pieces.iter().map(|(r, _)| *r as u64).collect(),
            }),
            data.iter()
                .copied()
                .chain(pieces.iter().map(|(_, b)| &b[..]))
                .collect(),
        ),
        Outgoing::Down { seq, verdict: v } => {
            // Once a collective fails, its data are not sent (TREE-2).
            let clean = v.culprit.is_none() && v.error.is_none();
            let (data, mut segs): (WireData, Vec<&[u8]>) = match (&v.data, clean) {
                (_, false) => (WireData::None, Vec::new()),
                (Some(d), true) => (WireData::Result, vec![&d[..]]),
                (None, true) if !v.parts.is_empty() => (
                    WireData::Parts(v.parts.len() as u32),
                    v.parts.iter().map(|p| &p[..]).collect(),
                ),
                (None, true) => (WireData::None, Vec::new()),
            };
            let pieces: &[(usize, Vec<u8>)] = if clean { &v.pieces } else { &[] };
            segs.extend(pieces.iter().map(|(_, b)| &b[..]));
            (
                Wire::Down(WireDown {
                    seq: *seq,
                    contributors: v.contributors as u64,
                    meta: v.meta.as_ref().map(wire_meta),
                    culprit: v.culprit.clone(),
                    error: v.error.as_ref().map(wire_error),
                    data,
                    pieces: pieces.iter().map(|(r, _)| *r as u64).collect(),
                }),
                segs,
            )
        }
    };
    let archive = rkyv::to_bytes::<RkyvError>(&wire).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            "tree",
            format!("cannot encode a control message: {e}"),
        )
    })?;
    Ok((framed(&archive), segs))
}

/// The header, then `archive`.
fn framed(archive: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(HEADER + archive.len());
    bytes.extend_from_slice(&MAGIC);
    bytes.extend_from_slice(&VERSION.to_le_bytes());
    bytes.extend_from_slice(&[0, 0]);
    bytes.extend_from_slice(archive);
    bytes
}

/// The archive behind a checked header (CTRL-2), aligned for rkyv; `peer` names the sender.
fn unframed(peer: &str, ctrl: &[u8]) -> Result<AlignedVec<16>> {
    if ctrl.len() < HEADER || ctrl[..4] != MAGIC {
        return Err(bad_peer(peer, "no control header".into()));
    }
    let version = u16::from_le_bytes([ctrl[4], ctrl[5]]);
    if version != VERSION {
        return Err(Error::new(
            ErrorKind::Protocol,
            "tree",
            format!(
                "{peer} speaks version {version} of the collectives' control protocol, this \
                 rank version {VERSION}: run the same Parallel version on every rank"
            ),
        ));
    }
    let mut aligned = AlignedVec::<16>::with_capacity(ctrl.len() - HEADER);
    aligned.extend_from_slice(&ctrl[HEADER..]);
    Ok(aligned)
}

fn keep() -> Arc<dyn std::any::Any + Send + Sync> {
    Arc::new(())
}

/// Sends `msg` to `conn`, its segments from their own memory, synchronously (the borrows of
/// `msg` cover the whole send).
pub(crate) fn send(conn: &Conn, msg: &Outgoing<'_>, deadline: Deadline) -> Result<()> {
    let (ctrl, segs) = encode(msg)?;
    let mut items = Vec::with_capacity(1 + segs.len());
    items.push(Value::bytes(ctrl));
    for s in segs {
        // SAFETY: `s` is borrowed from `msg` for this whole function, and the send below is
        // synchronous: the header does not outlive the memory, which nothing writes meanwhile.
        items.push(Value::Tensor(unsafe {
            Tensor::from_raw(
                DType::U8,
                vec![s.len()],
                None,
                Device::Cpu,
                s.as_ptr() as *mut u8,
                s.len(),
                keep(),
            )
        }));
    }
    conn.send_control(&Value::List(items), Some(deadline.remaining()))
}

/// Receives the next control message from rank `from` over `conn`, validated (CTRL-1).
pub(crate) fn recv(conn: &Conn, from: usize, world: usize, deadline: Deadline) -> Result<Control> {
    let mut v = conn
        .recv_control(Some(deadline.remaining()))
        .map_err(|e| Error::new(e.kind(), "tree", format!("from rank {from}: {e}")))?;
    let name = v.type_name();
    let Value::List(items) = &mut v else {
        return Err(bad(from, format!("a {name} value")));
    };
    let ctrl = match items.first() {
        Some(Value::Bytes(b)) => b.to_vec(),
        _ => {
            return Err(bad(
                from,
                "a list that does not start with control bytes".into(),
            ));
        }
    };
    let segs = items[1..]
        .iter_mut()
        .map(|s| match std::mem::replace(s, Value::None).into_tensor() {
            Ok(t) if t.bytes().is_some() => Some(Seg::Received(t)),
            _ => None,
        })
        .collect::<Option<Vec<Seg>>>()
        .ok_or_else(|| bad(from, "a segment that is not a host byte tensor".into()))?;
    decode(from, world, &ctrl, segs)
}

fn bad(from: usize, what: String) -> Error {
    bad_peer(&format!("rank {from}"), what)
}

fn bad_peer(peer: &str, what: String) -> Error {
    Error::new(
        ErrorKind::Protocol,
        "tree",
        format!(
            "{peer} sent a malformed control message ({what}); is every rank running the same \
             Parallel version, and nothing else writing to the tree's links?"
        ),
    )
}

/// Decodes control bytes and their segments from rank `from` (CTRL-1, CTRL-2).
pub(crate) fn decode(from: usize, world: usize, ctrl: &[u8], segs: Vec<Seg>) -> Result<Control> {
    let aligned = unframed(&format!("rank {from}"), ctrl)?;
    let archived = rkyv::access::<ArchivedWire, RkyvError>(&aligned)
        .map_err(|e| bad(from, format!("archive: {e}")))?;
    let wire: Wire = rkyv::deserialize::<Wire, RkyvError>(archived)
        .map_err(|e| bad(from, format!("archive: {e}")))?;
    let check = Check { from, world };
    match wire {
        Wire::Up(w) => check.up(w, segs).map(Control::Up),
        Wire::Down(w) => check.down(w, segs),
    }
}

/// All-gather pieces: (rank, bytes).
type Pieces = Vec<(usize, Vec<u8>)>;

/// The checks of one received message.
struct Check {
    from: usize,
    world: usize,
}

impl Check {
    fn rank(&self, r: u64, what: &str) -> Result<usize> {
        match usize::try_from(r) {
            Ok(r) if r < self.world => Ok(r),
            _ => Err(bad(
                self.from,
                format!("{what} {r} in a world of {}", self.world),
            )),
        }
    }

    fn meta(&self, m: Option<WireMeta>) -> Result<Option<Meta>> {
        let Some(m) = m else { return Ok(None) };
        let kind = Kind::from_code(m.kind)
            .ok_or_else(|| bad(self.from, format!("collective kind {}", m.kind)))?;
        let dtype = match m.dtype {
            None => None,
            Some(c) => {
                Some(DType::from_code(c).ok_or_else(|| bad(self.from, format!("dtype code {c}")))?)
            }
        };
        let count = usize::try_from(m.count).map_err(|_| bad(self.from, "count".into()))?;
        let algo = Algorithm::from_code(m.algo)
            .ok_or_else(|| bad(self.from, format!("algorithm code {}", m.algo)))?;
        Ok(Some(Meta {
            kind,
            op: Cow::Owned(m.op),
            dtype,
            count,
            root: self.rank(m.root, "root")?,
            gpu: m.gpu,
            sig: m.sig,
            cont: m.cont,
            algo,
        }))
    }

    fn error(e: Option<WireError>) -> Option<(ErrorKind, String)> {
        e.map(|e| {
            let kind = match e.code {
                1 => ErrorKind::Config,
                _ => ErrorKind::Worker,
            };
            (kind, e.msg)
        })
    }

    /// Splits `segs` into `n` data segments and one piece per rank of `ranks`.
    fn split(&self, mut segs: Vec<Seg>, n: usize, ranks: &[u64]) -> Result<(Vec<Seg>, Pieces)> {
        if segs.len() != n + ranks.len() {
            return Err(bad(
                self.from,
                format!(
                    "{} segments where it announced {n} data and {} pieces",
                    segs.len(),
                    ranks.len()
                ),
            ));
        }
        let pieces = segs.split_off(n);
        let pieces = ranks
            .iter()
            .zip(pieces)
            .map(|(r, b)| Ok((self.rank(*r, "piece of rank")?, b.into_vec())))
            .collect::<Result<Vec<_>>>()?;
        Ok((segs, pieces))
    }

    fn up(&self, w: WireUp, segs: Vec<Seg>) -> Result<Up> {
        let (data, pieces) = self.split(segs, w.data as usize, &w.pieces)?;
        Ok(Up {
            seq: w.seq,
            caller: self.rank(w.caller, "caller")?,
            active: usize::try_from(w.active)
                .ok()
                .filter(|a| *a <= self.world)
                .ok_or_else(|| bad(self.from, format!("{} active ranks", w.active)))?,
            meta: self.meta(w.meta)?,
            culprit: w.culprit,
            error: Check::error(w.error),
            idle: w
                .idle
                .iter()
                .map(|r| self.rank(*r, "done rank"))
                .collect::<Result<_>>()?,
            data,
            pieces,
        })
    }

    fn down(&self, w: WireDown, segs: Vec<Seg>) -> Result<Control> {
        let n = match w.data {
            WireData::None => 0,
            WireData::Result => 1,
            WireData::Parts(n) => n as usize,
        };
        let (data, pieces) = self.split(segs, n, &w.pieces)?;
        let mut data: Vec<Vec<u8>> = data.into_iter().map(Seg::into_vec).collect();
        let contributors = usize::try_from(w.contributors)
            .ok()
            .filter(|c| *c <= self.world)
            .ok_or_else(|| bad(self.from, format!("{} contributors", w.contributors)))?;
        let (data, parts) = match w.data {
            WireData::Result => (data.pop(), Vec::new()),
            _ => (None, data),
        };
        Ok(Control::Down {
            seq: w.seq,
            verdict: Verdict {
                contributors,
                meta: self.meta(w.meta)?,
                culprit: w.culprit,
                error: Check::error(w.error),
                data,
                parts,
                flat: false,
                pieces,
            },
        })
    }
}

pub(crate) mod join;

#[cfg(test)]
mod tests;

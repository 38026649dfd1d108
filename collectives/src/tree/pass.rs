//! The control pass (TREE-1, TREE-2, TREE-4, TREE-6, TREE-7): each rank reports up the tree what
//! it calls, with its subtree's data for small buffers; rank 0 decides, and its verdict comes
//! back down. The messages are the typed ones of [`crate::control`].

use super::{STRUCTURE_DIFFERS, Tree};
use crate::control::{self, Control, Kind, Meta, Outgoing, Up, Verdict};
use crate::ops::{self, Op};
use parallel_engine::runtime::Deadline;
use parallel_engine::{Error, ErrorKind, Result};
use std::sync::atomic::Ordering;

/// One rank's part in a control pass (see [`Tree::pass_with`]).
pub(super) struct Pass<'a> {
    pub meta: Option<&'a Meta>,
    pub op: Option<&'a Op>,
    pub data: Option<&'a mut [u8]>,
    pub carry_data: bool,
    pub contributes: bool,
    /// all_gather: this rank's piece.
    pub piece: Option<Vec<u8>>,
    /// This rank's reduce function failed earlier in the collective (in the ring).
    pub failure: Option<Error>,
    pub deadline: Deadline,
}

/// Records why a collective fails: the first reason wins, except that a reason naming only a
/// difference of structure gives way to any other (TREE-7).
fn blame(culprit: &mut Option<String>, why: String) {
    let weak = |c: &str| c.contains(STRUCTURE_DIFFERS);
    match culprit {
        None => *culprit = Some(why),
        Some(c) if weak(c) && !weak(&why) => *culprit = Some(why),
        _ => {}
    }
}

/// `dst = dst op src` for a reducing collective; a broadcast's "combine" takes the source.
pub(super) fn combine(op: &Op, m: &Meta, dst: &mut [u8], src: &[u8]) -> Result<()> {
    match (m.kind, m.dtype) {
        (Kind::Broadcast, _) if dst.len() == src.len() => {
            dst.copy_from_slice(src);
            Ok(())
        }
        (Kind::Broadcast, _) => Err(Error::new(
            ErrorKind::Protocol,
            "broadcast",
            format!(
                "{} bytes arrived for a {}-byte buffer",
                src.len(),
                dst.len()
            ),
        )),
        (_, Some(dt)) => ops::reduce_into(op, dt, dst, src),
        _ => Ok(()),
    }
}

fn sorted(v: &[usize]) -> Vec<usize> {
    let mut v = v.to_vec();
    v.sort_unstable();
    v
}

/// What a rank gathered from its children in a control pass.
struct Gathered {
    n_active: usize,
    culprit: Option<String>,
    reference: Option<Meta>,
    partials: Vec<Vec<u8>>,
    have_own: bool,
    idle_ranks: Vec<usize>,
    pieces: Vec<(usize, Vec<u8>)>,
    local_fail: Option<Error>,
    error: Option<(ErrorKind, String)>,
}

impl Tree {
    fn next_seq(&self) -> u64 {
        let mut s = self.seq.lock().unwrap_or_else(|p| p.into_inner());
        *s += 1;
        *s
    }

    /// Rank `from`'s next control message, validated (CTRL-1).
    fn recv_control(&self, from: usize, deadline: Deadline) -> Result<Control> {
        control::recv(self.link(from)?, from, self.world_size(), deadline)
    }

    /// The control pass, and the data path of small buffers (TREE-1, TREE-2, TREE-4).
    ///
    /// `meta`: what this rank calls, or None for a finished rank serving the others. `data`: this
    /// rank's buffer when `carry_data` (reduced going up, overwritten with the result coming
    /// down); `contributes`: whether `data` holds a contribution (false for finished ranks and,
    /// in a broadcast, for every rank but the root). Partial results travel up as a list of
    /// segments; the first rank that knows the op reduces them, in order.
    pub(super) fn pass(
        &self,
        meta: Option<&Meta>,
        op: Option<&Op>,
        data: Option<&mut [u8]>,
        carry_data: bool,
        contributes: bool,
    ) -> Result<Verdict> {
        self.pass_with(Pass {
            meta,
            op,
            data,
            carry_data,
            contributes,
            piece: None,
            failure: None,
            deadline: self.deadline(),
        })
    }

    /// Receives the children's reports of pass `seq` and folds them into this rank's own.
    fn gather(&self, seq: u64, p: &mut Pass<'_>, reference: Option<Meta>) -> Result<Gathered> {
        let idle = p.meta.is_none();
        let mut g = Gathered {
            n_active: usize::from(!idle),
            culprit: None,
            reference,
            partials: Vec::new(),
            have_own: p.carry_data && p.contributes && p.data.is_some(),
            idle_ranks: if idle { vec![self.rank] } else { vec![] },
            pieces: p.piece.take().map(|b| (self.rank, b)).into_iter().collect(),
            // This rank's own reduce function failed (TREE-6): reduce nothing more, report it.
            local_fail: p.failure.take(),
            error: None,
        };
        for &child in &self.plan.children[self.rank] {
            let up = match self.recv_control(child, p.deadline)? {
                Control::Up(up) => up,
                Control::Down { .. } => {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "tree",
                        format!("rank {child} sent a verdict where its report was expected"),
                    ));
                }
            };
            self.absorb(child, seq, up, p, &mut g);
        }
        Ok(g)
    }

    /// Folds child `child`'s report `up` into `g`.
    fn absorb(&self, child: usize, seq: u64, up: Up, p: &mut Pass<'_>, g: &mut Gathered) {
        if up.seq != seq {
            blame(
                &mut g.culprit,
                format!(
                    "rank {child} is at collective #{}, rank {} at #{seq}",
                    up.seq, self.rank
                ),
            );
        }
        g.n_active += up.active;
        if let Some(c) = up.culprit {
            blame(&mut g.culprit, c);
        }
        if g.error.is_none() {
            g.error = up.error;
        }
        g.idle_ranks.extend(up.idle);
        g.pieces.extend(up.pieces);
        if let Some(theirs) = up.meta {
            match &g.reference {
                None => g.reference = Some(theirs),
                Some(mine) if *mine != theirs => {
                    let who = up.caller;
                    let why = if mine.kind == theirs.kind
                        && mine.sig != 0
                        && theirs.sig != 0
                        && mine.sig != theirs.sig
                    {
                        format!("rank {who} {STRUCTURE_DIFFERS} rank {}", self.rank)
                    } else {
                        format!(
                            "rank {who} called {} but rank {} called {}",
                            theirs.describe(),
                            self.rank,
                            mine.describe()
                        )
                    };
                    blame(&mut g.culprit, why);
                }
                _ => {}
            }
        }
        // Once the collective is known to fail, its data are not looked at (TREE-2).
        if g.culprit.is_some() {
            return;
        }
        let idle = p.meta.is_none();
        for b in up.data {
            let want = g
                .reference
                .as_ref()
                .and_then(|m| m.dtype.map(|d| m.count * d.itemsize()));
            if want.is_some_and(|w| w != b.len()) {
                blame(
                    &mut g.culprit,
                    format!(
                        "rank {child}'s subtree sent {} bytes for {}",
                        b.len(),
                        g.reference.as_ref().map(Meta::describe).unwrap_or_default()
                    ),
                );
                continue;
            }
            match (&mut p.data, g.have_own, p.op, g.reference.as_ref()) {
                (Some(d), true, Some(op), Some(m)) if p.carry_data => {
                    if g.local_fail.is_none()
                        && let Err(e) = combine(op, m, d, &b)
                    {
                        g.local_fail = Some(e);
                    }
                }
                (Some(d), false, _, _) if p.carry_data && !idle && d.len() == b.len() => {
                    d.copy_from_slice(&b);
                    g.have_own = true;
                }
                _ => g.partials.push(b.into_vec()),
            }
        }
    }

    /// [`Tree::pass`] with all its parts: an all-gather piece, a failure to report (TREE-6), a
    /// deadline. Errors every rank agreed on (a mismatch, a reduce function that raised, a root
    /// that is done) come back only after the verdict went down, so the tree stays in step.
    pub(super) fn pass_with(&self, mut p: Pass<'_>) -> Result<Verdict> {
        let seq = self.next_seq();
        let idle = p.meta.is_none();
        // What this rank calls, as every rank compares it (TREE-2, TREE-7), stamped once.
        let reference = p.meta.map(|m| Meta {
            sig: self.structure.load(Ordering::SeqCst),
            cont: self.continues_call(),
            ..m.clone()
        });
        // Small collectives of ranks on one host: the flat region instead of the pass (FLAT-1).
        if let Some(v) = self.flat_pass(seq, &mut p, reference.as_ref())? {
            self.contributors
                .store(v.contributors as u64, Ordering::SeqCst);
            return Ok(v);
        }
        let mut g = self.gather(seq, &mut p, reference)?;
        // A finished rank that knows the op (the collective's built-in op, or the user function
        // given to done() when the others called one) reduces what it holds.
        if g.partials.len() > 1
            && g.local_fail.is_none()
            && let Some(m) = g.reference.as_ref()
            && m.dtype.is_some()
            && let Some(op) = m.reducing_op(p.op)
        {
            let (first, rest) = g.partials.split_at_mut(1);
            for r in rest.iter() {
                if let Err(e) = combine(&op, m, &mut first[0], r) {
                    g.local_fail = Some(e);
                    break;
                }
            }
            g.partials.truncate(1);
        }
        if g.error.is_none()
            && let Some(e) = &g.local_fail
        {
            g.error = Some((
                ErrorKind::Worker,
                format!(
                    "the reduce function raised on rank {} ({})",
                    self.rank,
                    e.message()
                ),
            ));
        }
        let verdict = match self.plan.parent[self.rank] {
            Some(parent) => self.report(parent, seq, &p, &mut g)?,
            None => self.decide(&p, &mut g),
        };
        for &child in &self.plan.children[self.rank] {
            let msg = Outgoing::Down {
                seq,
                verdict: &verdict,
            };
            control::send(self.link(child)?, &msg, p.deadline)?;
        }
        self.contributors
            .store(verdict.contributors as u64, Ordering::SeqCst);
        if idle {
            let first = verdict.meta.as_ref().is_some_and(|m| !m.cont);
            self.served_call.store(first, Ordering::SeqCst);
        }
        self.conclude(p, verdict, g.local_fail)
    }

    /// Sends this rank's report to `parent` and receives the verdict.
    fn report(&self, parent: usize, seq: u64, p: &Pass<'_>, g: &mut Gathered) -> Result<Verdict> {
        let clean = g.culprit.is_none() && g.error.is_none();
        let mut data: Vec<&[u8]> = Vec::new();
        if clean {
            if g.have_own
                && let Some(d) = p.data.as_deref()
            {
                data.push(d);
            }
            data.extend(g.partials.iter().map(|v| &v[..]));
        }
        let up = Up {
            seq,
            caller: self.rank,
            active: g.n_active,
            meta: g.reference.clone(),
            culprit: g.culprit.clone(),
            error: g.error.clone(),
            idle: g.idle_ranks.clone(),
            data: Vec::new(),
            pieces: Vec::new(),
        };
        let pieces: &[(usize, Vec<u8>)] = if clean { &g.pieces } else { &[] };
        let msg = Outgoing::Up {
            up: &up,
            data,
            pieces,
        };
        control::send(self.link(parent)?, &msg, p.deadline)?;
        let (their_seq, mut verdict) = match self.recv_control(parent, p.deadline)? {
            Control::Down { seq, verdict } => (seq, verdict),
            Control::Up(_) => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "tree",
                    format!("rank {parent} sent a report where a verdict was expected"),
                ));
            }
        };
        if their_seq != seq && g.culprit.is_none() {
            g.culprit = Some(format!(
                "rank {parent} answered collective #{their_seq} to #{seq}"
            ));
        }
        if g.culprit.is_some() {
            verdict.culprit = g.culprit.take();
        }
        Ok(verdict)
    }

    /// Rank 0's verdict on the pass.
    fn decide(&self, p: &Pass<'_>, g: &mut Gathered) -> Verdict {
        let (n_active, have_own) = (g.n_active, g.have_own);
        let mut culprit = g.culprit.take();
        let reference = g.reference.take();
        let partials = std::mem::take(&mut g.partials);
        let idle_ranks = std::mem::take(&mut g.idle_ranks);
        let mut pieces = std::mem::take(&mut g.pieces);
        let mut error = g.error.take();
        // A structure verdict needs every rank in the collective (TREE-7): with some ranks done,
        // it stays a plain mismatch.
        if n_active < self.world_size()
            && let Some(c) = culprit.as_mut()
        {
            *c = c.replace(
                STRUCTURE_DIFFERS,
                "passed a value of a different structure than",
            );
        }
        // The root of the tree decides. A broadcast or reduce whose root is done has no source
        // (or no destination): the same error on every rank (TREE-4).
        if culprit.is_none()
            && error.is_none()
            && let Some(m) = &reference
            && matches!(m.kind, Kind::Broadcast | Kind::Reduce)
            && idle_ranks.contains(&m.root)
        {
            error = Some((
                ErrorKind::Config,
                format!(
                    "its root, rank {}, called done() for this epoch; a {} needs its root to take \
                     part: use a root that still has data (ranks done: {:?})",
                    m.root,
                    m.kind.name(),
                    sorted(&idle_ranks)
                ),
            ));
        }
        // An all-to-all's piece sizes must agree for every pair of taking ranks (TA2A-1).
        if culprit.is_none()
            && error.is_none()
            && reference.as_ref().is_some_and(|m| m.kind == Kind::AllToAll)
        {
            culprit = super::alltoall::check_sizes(&mut pieces, self.world_size());
        }
        // A finished root without the user function sends the partial results down; the
        // contributing ranks reduce them, in the same order, then settle.
        let (result, parts) = if have_own {
            (p.data.as_deref().map(<[u8]>::to_vec), Vec::new())
        } else if partials.len() > 1 {
            (None, partials)
        } else {
            (partials.into_iter().next(), Vec::new())
        };
        pieces.sort_by_key(|(r, _)| *r);
        Verdict {
            contributors: n_active,
            meta: reference,
            culprit,
            error,
            data: result,
            parts,
            pieces,
            flat: false,
        }
    }

    /// Applies the verdict on this rank: its error, or its data into the caller's buffer.
    fn conclude(
        &self,
        p: Pass<'_>,
        verdict: Verdict,
        local_fail: Option<Error>,
    ) -> Result<Verdict> {
        let what = p.meta.map_or("done", |m| m.kind.name());
        if let Some(c) = &verdict.culprit {
            self.agreed.store(true, Ordering::SeqCst);
            return Err(Error::new(
                ErrorKind::Mismatch,
                what,
                format!("collective mismatch: {c}"),
            ));
        }
        if let Some((kind, msg)) = &verdict.error {
            self.agreed.store(true, Ordering::SeqCst);
            return Err(match local_fail {
                // This rank's own function raised: its error is the cause (TREE-6).
                Some(e) => Error::new(
                    ErrorKind::Worker,
                    what,
                    format!(
                        "aborted on every rank: the reduce function raised on rank {} ({}); \
                         the buffer was left as it was and the tree stays usable",
                        self.rank,
                        e.message()
                    ),
                )
                .with_cause(e),
                None => Error::new(
                    *kind,
                    what,
                    match kind {
                        ErrorKind::Worker => format!(
                            "aborted on every rank: {msg}; the buffer was left as it was and \
                             the tree stays usable"
                        ),
                        _ => format!("refused on every rank: {msg}"),
                    },
                ),
            });
        }
        let Pass {
            meta,
            op,
            mut data,
            carry_data,
            ..
        } = p;
        if carry_data && let (Some(d), Some(r)) = (data.as_deref_mut(), verdict.data.as_ref()) {
            // A result of another size is never a result for this buffer: an error, not a
            // silently unchanged buffer.
            if d.len() != r.len() {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    what,
                    format!(
                        "a {}-byte result arrived for a {}-byte buffer (ranks disagree on the \
                         collective: a bug, please report it)",
                        r.len(),
                        d.len()
                    ),
                ));
            }
            d.copy_from_slice(r);
        }
        if carry_data
            && let (Some(d), Some(m), Some(op), [first, rest @ ..]) =
                (data, meta, op, &verdict.parts[..])
        {
            let mut failed = None;
            if first.len() != d.len() {
                failed = Some(Error::new(
                    ErrorKind::Protocol,
                    what,
                    format!(
                        "a {}-byte part arrived for a {}-byte buffer",
                        first.len(),
                        d.len()
                    ),
                ));
            } else {
                d.copy_from_slice(first);
            }
            for part in rest {
                if failed.is_some() {
                    break;
                }
                if let Err(e) = combine(op, m, d, part) {
                    failed = Some(e);
                }
            }
            self.settle(Some(m), failed)?;
        }
        Ok(verdict)
    }

    /// The status round after a pipeline that ran a user reduce function (TREE-6): every rank
    /// reports whether its function failed, so all raise together, or none does.
    pub(super) fn settle(&self, meta: Option<&Meta>, failure: Option<Error>) -> Result<()> {
        self.pass_with(Pass {
            meta,
            op: None,
            data: None,
            carry_data: false,
            contributes: false,
            piece: None,
            failure,
            deadline: self.deadline(),
        })
        .map(|_| ())
    }
}

//! Pairwise all-to-all (Gloo's `alltoallv` by pairwise exchange): in step `k = 1 .. n-1`, the
//! rank `r` sends its piece for rank `(r + k) mod n` while it receives rank `(r - k) mod n`'s
//! piece for it; its own piece is copied. Every rank is busy with exactly one sender and one
//! receiver in each step, so no rank is flooded by all the others at once (incast), and a step's
//! send overlaps its receive through the tree's sender lane ([`SendScope`]).
//!
//! Pieces may have any size per pair (torch's uneven splits), zero included. The sizes are not
//! on the wire: the caller checked in the control pass that every sender's size for a receiver
//! is the size that receiver expects (the Tree's all-to-all, TREE-2), so each receive takes
//! exactly its output; a zero-byte piece is neither sent nor received.
//!
//! Invariants:
//! - A2A-1: every ordered pair (s, d) of taking ranks, s != d, moves exactly one message,
//!   in step `(d - s) mod n`, from `sends[d]` on s straight into `recvs[s]` on d (no staging
//!   copy); pairs with a rank that does not take part (`takes[r]` false) move nothing.
//! - A2A-2: a piece's bytes are borrowed by the step's [`SendScope`], which ends only after the
//!   send completed (SEND-1); a failed step ends within about a second (SEND-2).
//! - A2A-3: every send and receive is bounded by the communicator's deadline, and an error names
//!   the peer and the step (ALGO-3).

use super::{Communicator, SendScope, out_view};
use parallel_engine::value::Value;
use parallel_engine::{Error, ErrorKind, Result};

/// Exchanges pieces among the ranks that take part: `sends[d]` goes to rank `d`, and rank `s`'s
/// piece for this rank lands in `recvs[s]`, whose length must be the size `s` sends (checked by
/// the caller for every pair). `takes[r]`: whether rank r takes part (false for finished ranks,
/// TREE-4); their pieces are not sent and their outputs are left as they were.
pub fn exchange(
    comm: &Communicator<'_>,
    sends: &[&[u8]],
    recvs: &mut [&mut [u8]],
    takes: &[bool],
) -> Result<()> {
    let (me, n) = (comm.rank(), takes.len());
    if sends.len() != n || recvs.len() != n || me >= n {
        return Err(Error::new(
            ErrorKind::Protocol,
            "all_to_all",
            format!(
                "rank {me}: {} pieces to send and {} to receive in a world of {n} (a bug: please \
                 report it)",
                sends.len(),
                recvs.len()
            ),
        ));
    }
    if sends[me].len() != recvs[me].len() {
        return Err(Error::new(
            ErrorKind::Config,
            "all_to_all",
            format!(
                "rank {me} sends itself {} bytes into a {}-byte output",
                sends[me].len(),
                recvs[me].len()
            ),
        ));
    }
    recvs[me].copy_from_slice(sends[me]);
    for k in 1..n {
        let (to, from) = ((me + k) % n, (me + n - k) % n);
        let send: &[u8] = if takes[to] { sends[to] } else { &[] };
        let into: &mut [u8] = if takes[from] {
            &mut *recvs[from]
        } else {
            &mut []
        };
        step(comm, k, to, send, from, into).map_err(|e| {
            let peer = e.peer().map(str::to_string);
            let e = Error::new(
                e.kind(),
                "all_to_all",
                format!(
                    "rank {me}, step {k} of {}: sending to rank {to}, receiving from rank \
                     {from}: {}",
                    n - 1,
                    e.message()
                ),
            )
            .with_cause(e);
            match peer {
                Some(p) => e.with_peer(p),
                None => e,
            }
        })?;
    }
    Ok(())
}

/// One step: `send` to rank `to` on the sender lane while `into` is received from rank `from`.
fn step(
    comm: &Communicator<'_>,
    k: usize,
    to: usize,
    send: &[u8],
    from: usize,
    into: &mut [u8],
) -> Result<()> {
    SendScope::run(comm, |sends| {
        if !send.is_empty() {
            sends.send(comm.link(to)?, send);
        }
        if !into.is_empty() {
            let len = into.len();
            // SAFETY: the view is used only by this synchronous receive, during which `into`
            // stays exclusively borrowed; nothing keeps the view after it returns.
            let view = unsafe { out_view(into) };
            comm.link(from)?
                .recv_into(&mut [view], Some(comm.deadline().remaining()))
                .map_err(|e| {
                    Error::new(
                        e.kind(),
                        "all_to_all",
                        format!("receiving {len} bytes from rank {from} in step {k}: {e}"),
                    )
                    .with_peer(format!("rank {from}"))
                })
                .and_then(|v| match v {
                    Value::Out(0) => Ok(()),
                    other => Err(Error::new(
                        ErrorKind::Protocol,
                        "all_to_all",
                        format!(
                            "rank {from} sent {} where its {len}-byte piece was expected in step \
                             {k}",
                            other.type_name()
                        ),
                    )
                    .with_peer(format!("rank {from}"))),
                })?;
        }
        sends.wait_all("all_to_all").map_err(|e| {
            Error::new(
                e.kind(),
                "all_to_all",
                format!("sending {} bytes to rank {to} in step {k}: {e}", send.len()),
            )
            .with_peer(format!("rank {to}"))
        })
    })
}

//! Steps 2-3 on rank 0: wait for the members until a margin before the deadline (RDV-2), check
//! each one's world size, rank and token (STORE-3), assign the missing ranks, build the plan and
//! send it to everyone.

use super::entry::Published;
use super::launcher::describe_ranks;
use super::links::finish_links;
use super::local::{candidate_addrs, probe_of};
use super::{Joined, Resolved, left};
use crate::control::join::{self, Refusal, Rendezvous};
use crate::plan::{Plan, Probe};
use parallel_engine::endpoint::Conn;
use parallel_engine::{Error, ErrorKind, Result, Server};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long before the deadline the root stops waiting for arrivals, so that the members that
/// did arrive hear which ranks are missing before their own deadline passes (RDV-2).
fn arrival_margin(timeout: Duration) -> Duration {
    (timeout / 5).min(Duration::from_secs(3))
}

/// The ranks that never arrived, told to those that did (RDV-2).
fn missing_error(
    n: usize,
    probes: &[Option<Probe>],
    unassigned: usize,
    arrived: &[&Arc<Conn>],
    timeout: Duration,
    cause: Error,
) -> Error {
    let missing: Vec<usize> = (1..n).filter(|&k| probes[k].is_none()).collect();
    let count = missing.len() - unassigned;
    let who = if unassigned == 0 {
        describe_ranks(&missing)
    } else {
        format!("{count} of {}", describe_ranks(&missing))
    };
    let msg = format!(
        "rank 0 waited {timeout:?} for the tree's {n} ranks: {who} never arrived ({} of {n} \
         arrived; every rank must create the tree within the timeout, PARALLEL_TIMEOUT)",
        n - count
    );
    let refusal = join::to_value(&Rendezvous::Refused {
        why: Refusal::Timeout,
        msg: msg.clone(),
    });
    for conn in arrived {
        if let Ok(v) = &refusal {
            let _ = conn.send(v, Some(Duration::from_millis(500)));
        }
    }
    Error::new(ErrorKind::Timeout, "tree", msg).with_cause(cause)
}

pub(super) fn join_as_root(
    r: &Resolved,
    server: Server,
    timeout: Duration,
    deadline: Instant,
    published: Option<&Published<'_>>,
) -> Result<Joined> {
    let n = r.world;
    tracing::info!("tree rank 0: rendezvous on {} for {n} ranks", server.addr());
    let arrivals_until = deadline
        .checked_sub(arrival_margin(timeout))
        .unwrap_or(deadline);
    let my_addr = if r.store.is_some() {
        candidate_addrs(&r.root_host)?.remove(0)
    } else {
        r.root_host.clone()
    };
    let mut probes: Vec<Option<Probe>> = vec![None; n];
    probes[0] = Some(probe_of(0, my_addr, server.port(), r.host.as_deref()));
    let mut pending: Vec<(Arc<Conn>, Probe, bool)> = Vec::new(); // (conn, probe, rank was given)
    let mut waiting_rank: Vec<(Arc<Conn>, Probe)> = Vec::new();
    while pending.len() + waiting_rank.len() < n - 1 {
        let (v, conn) = match server.recv_any(None, left(arrivals_until)) {
            Ok(got) => got,
            Err(e) if e.kind() == ErrorKind::Timeout => {
                let arrived: Vec<&Arc<Conn>> = pending
                    .iter()
                    .map(|p| &p.0)
                    .chain(waiting_rank.iter().map(|w| &w.0))
                    .collect();
                return Err(missing_error(
                    n,
                    &probes,
                    waiting_rank.len(),
                    &arrived,
                    timeout,
                    e,
                ));
            }
            Err(e) => {
                return Err(Error::new(
                    e.kind(),
                    "tree",
                    format!(
                        "rank 0 waited for {} more rank(s) to join ({} of {n} arrived): {e}",
                        n - 1 - pending.len() - waiting_rank.len(),
                        pending.len() + waiting_rank.len() + 1
                    ),
                ));
            }
        };
        let (world, asked, probe, token) = match join::from_value(conn.peer(), &v)? {
            Rendezvous::Join {
                world,
                rank,
                probe,
                token,
            } => (world, rank, probe, token),
            other => {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    "tree",
                    format!("{} sent {other:?} where a join was expected", conn.peer()),
                ));
            }
        };
        if let Some(p) = published
            && token.as_deref() != Some(p.token.as_str())
        {
            refuse_stranger(&conn, &p.key);
            continue;
        }
        if world != n {
            let msg = format!(
                "{} says the world size is {world}, rank 0 says {n}",
                conn.peer()
            );
            refuse(&conn, &msg);
            return Err(Error::new(ErrorKind::Mismatch, "tree", msg));
        }
        match asked {
            Some(k) => {
                if k == 0 || k >= n || probes[k].is_some() {
                    let msg = format!(
                        "{} asks for rank {k}, which is taken or out of range (world {n})",
                        conn.peer()
                    );
                    refuse(&conn, &msg);
                    return Err(Error::new(ErrorKind::Mismatch, "tree", msg));
                }
                probes[k] = Some(Probe {
                    rank: k,
                    ..probe.clone()
                });
                pending.push((conn, probe, true));
            }
            None => waiting_rank.push((conn, probe)),
        }
    }
    if let Some(p) = published {
        p.withdraw()?;
    }
    for (conn, probe) in waiting_rank {
        let k = probes
            .iter()
            .position(Option::is_none)
            .expect("a free rank remains");
        probes[k] = Some(Probe {
            rank: k,
            ..probe.clone()
        });
        pending.push((conn, Probe { rank: k, ..probe }, false));
    }
    let plan = Plan::build(
        probes
            .into_iter()
            .map(|p| p.expect("all ranks joined"))
            .collect(),
    )?;
    let mut links = HashMap::new();
    let edges = plan.edges();
    for (conn, probe, _) in pending {
        let k = plan
            .probes
            .iter()
            .find(|p| p.pid == probe.pid && p.host_id == probe.host_id && p.port == probe.port)
            .map(|p| p.rank)
            .expect("probe in plan");
        let placed = Rendezvous::Placed {
            rank: k,
            plan: plan.clone(),
        };
        conn.send(&join::to_value(&placed)?, left(deadline))?;
        if edges.contains(&(0, k)) {
            links.insert(k, conn);
        } else {
            conn.close();
        }
    }
    finish_links(0, &plan, &server, links, deadline)
}

/// Refuses a member that presented another rendezvous's token (STORE-3); rank 0 goes on
/// waiting for its own members.
fn refuse_stranger(conn: &Arc<Conn>, key: &str) {
    let msg = format!(
        "{} read rank 0's address under the store key {key:?} from another tree or job (a key an \
         earlier run left in the store, or two trees created under one prefix): use a fresh store \
         or a distinct prefix per tree, and create the trees in the same order on every rank",
        conn.peer()
    );
    tracing::warn!("tree rank 0: refused a member: {msg}");
    if let Ok(v) = join::to_value(&Rendezvous::Refused {
        why: Refusal::Stranger,
        msg,
    }) {
        let _ = conn.send(&v, Some(Duration::from_secs(1)));
    }
    conn.close();
}

/// Tells a member why rank 0 refuses it (a mismatch).
fn refuse(conn: &Conn, msg: &str) {
    if let Ok(v) = join::to_value(&Rendezvous::Refused {
        why: Refusal::Mismatch,
        msg: msg.to_string(),
    }) {
        let _ = conn.send(&v, Some(Duration::from_secs(1)));
    }
}

//! Step 4 of the rendezvous: each rank opens the links its plan names. The higher rank of a pair
//! connects to the lower one's server and introduces itself; links to rank 0 reuse the
//! rendezvous connection.

use super::{Joined, left};
use crate::control::join::{self, Rendezvous};
use crate::plan::Plan;
use parallel_engine::endpoint::Conn;
use parallel_engine::{Client, Error, ErrorKind, Result, Server};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Step 4: connect to lower neighbours, accept higher ones.
pub(super) fn finish_links(
    rank: usize,
    plan: &Plan,
    server: &Server,
    mut links: HashMap<usize, Arc<Conn>>,
    deadline: Instant,
) -> Result<Joined> {
    let edges = plan.edges();
    let mine: Vec<(usize, usize)> = edges
        .iter()
        .copied()
        .filter(|(a, b)| *a == rank || *b == rank)
        .collect();
    for (a, b) in &mine {
        if *b == rank && *a != 0 {
            let p = &plan.probes[*a];
            let c = Client::connect(&p.addr, p.port, left(deadline)).map_err(|e| {
                Error::new(
                    e.kind(),
                    "tree",
                    format!(
                        "rank {rank} could not connect to rank {a} at {}:{}: {e}",
                        p.addr, p.port
                    ),
                )
            })?;
            c.send(&join::to_value(&Rendezvous::LinkFrom { rank })?)?;
            links.insert(*a, c.conn().clone());
        }
    }
    let expect: Vec<usize> = mine
        .iter()
        .filter(|(a, _)| *a == rank)
        .map(|(_, b)| *b)
        .filter(|b| !links.contains_key(b))
        .collect();
    let mut missing = expect.clone();
    if !expect.is_empty() {
        // Each higher neighbour opens one connection and introduces itself first; only that first
        // message is read here (a neighbour may already have sent its first collective frame).
        server.wait_for(expect.len(), left(deadline)).map_err(|e| {
            Error::new(
                e.kind(),
                "tree",
                format!("rank {rank} waited for ranks {missing:?} to connect: {e}"),
            )
        })?;
        for conn in server.connections() {
            let v = conn.recv(left(deadline)).map_err(|e| {
                Error::new(
                    e.kind(),
                    "tree",
                    format!("rank {rank}: link set-up from {}: {e}", conn.peer()),
                )
            })?;
            match join::from_value(conn.peer(), &v) {
                Ok(Rendezvous::LinkFrom { rank: k }) if missing.contains(&k) => {
                    missing.retain(|x| *x != k);
                    links.insert(k, conn);
                }
                _ => {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "tree",
                        format!(
                            "rank {rank}: unexpected connection from {} during link set-up (waiting for ranks {missing:?})",
                            conn.peer()
                        ),
                    ));
                }
            }
        }
    }
    Ok(Joined {
        rank,
        plan: plan.clone(),
        server: server.clone(),
        links,
    })
}

/// How long a new connection may take to introduce itself while the mesh is made.
const STRAY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The links of a full mesh (Gloo's `connectFullMesh`), made on the first all-to-all: every pair
/// of ranks without a link opens one the way step 4 does (the higher rank connects to the lower
/// one's server with the same handshake and authentication, so shm on one host and TCP across
/// hosts, and introduces itself with `LinkFrom`). `have` are the links this rank already holds;
/// the returned map holds those and the new ones, one per other rank. Only connections accepted
/// after the rendezvous (ids above `after_id`) are taken for new links. Every rank calls this in
/// the same collective, after the control pass agreed on it. A rank that never connects fails
/// this one at the deadline, naming the missing ranks.
pub(crate) fn full_mesh(
    rank: usize,
    plan: &Plan,
    server: &Server,
    have: &HashMap<usize, Arc<Conn>>,
    after_id: i64,
    deadline: Instant,
) -> Result<HashMap<usize, Arc<Conn>>> {
    let mut links = have.clone();
    for a in (0..rank).filter(|a| !have.contains_key(a)) {
        let p = &plan.probes[a];
        let c = Client::connect(&p.addr, p.port, left(deadline)).map_err(|e| {
            Error::new(
                e.kind(),
                "all_to_all",
                format!(
                    "rank {rank} could not open its all-to-all link to rank {a} at {}:{}: {e}",
                    p.addr, p.port
                ),
            )
            .with_peer(format!("rank {a}"))
        })?;
        c.conn().send(
            &join::to_value(&Rendezvous::LinkFrom { rank })?,
            left(deadline),
        )?;
        links.insert(a, c.conn().clone());
    }
    let mut missing: Vec<usize> = (rank + 1..plan.world())
        .filter(|b| !have.contains_key(b))
        .collect();
    let mut claimed: Vec<i64> = Vec::new();
    while !missing.is_empty() {
        let fresh: Vec<Arc<Conn>> = server
            .connections()
            .into_iter()
            .filter(|c| c.id() > after_id && !claimed.contains(&c.id()))
            .collect();
        if fresh.is_empty() {
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    "all_to_all",
                    format!(
                        "rank {rank} waited for ranks {missing:?} to open their all-to-all links \
                         (a rank died or was slower than the timeout, PARALLEL_TIMEOUT)"
                    ),
                ));
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
            continue;
        }
        for conn in fresh {
            claimed.push(conn.id());
            // A mesh peer introduces itself at once; anything else that reached our server
            // (another job's process, a rank retrying an old rendezvous) is closed and skipped,
            // and the wait for the missing ranks goes on until the deadline.
            let first = left(deadline).map(|l| l.min(STRAY_WAIT));
            let got = conn
                .recv(first)
                .and_then(|v| join::from_value(conn.peer(), &v));
            match got {
                Ok(Rendezvous::LinkFrom { rank: k }) if missing.contains(&k) => {
                    missing.retain(|x| *x != k);
                    links.insert(k, conn);
                }
                other => {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "its first message is no LinkFrom of a missing rank".into(),
                    };
                    tracing::warn!(
                        "rank {rank}: closed a connection from {} that is not an all-to-all \
                         link of this tree ({why}; waiting for ranks {missing:?})",
                        conn.peer()
                    );
                    conn.close();
                }
            }
        }
    }
    Ok(links)
}

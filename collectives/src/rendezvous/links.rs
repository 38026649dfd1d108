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

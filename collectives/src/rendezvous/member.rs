//! Steps 2-3 on every rank but 0: reach rank 0 (at any of the addresses it published), send it
//! our probe, and receive our rank and the plan, or the reason rank 0 refused us.

use super::links::finish_links;
use super::local::{ifname_addr, probe_of};
use super::{Joined, Resolved, left};
use crate::control::join::{self, Refusal, Rendezvous};
use parallel_engine::{Client, Error, ErrorKind, Result, Server};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Tries rank 0's addresses in order, round after round, until one answers or the deadline.
pub(super) fn connect_any(
    rank: usize,
    port: u16,
    same_host: bool,
    addrs: &[String],
    deadline: Instant,
) -> Result<Client> {
    let usable: Vec<&String> = addrs
        .iter()
        .filter(|a| same_host || !a.starts_with("127."))
        .collect();
    if usable.is_empty() {
        return Err(Error::new(
            ErrorKind::Config,
            "tree",
            format!(
                "rank {rank}: rank 0 is on another host and published only loopback addresses \
                 {addrs:?}: give rank 0's host a routable interface, or set PARALLEL_IFNAME on \
                 rank 0"
            ),
        )
        .with_peer("rank 0"));
    }
    let mut last: Option<Error> = None;
    loop {
        for a in &usable {
            let per_try = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_secs(2));
            if per_try.is_zero() {
                let e = last.unwrap_or_else(|| {
                    Error::new(ErrorKind::Timeout, "tree", "the deadline passed")
                });
                return Err(Error::new(
                    e.kind(),
                    "tree",
                    format!(
                        "rank {rank} could not connect to rank 0 on port {port} at any of its \
                         addresses {usable:?} (set PARALLEL_IFNAME on rank 0 to the interface the \
                         others reach it by): {e}"
                    ),
                )
                .with_peer("rank 0"));
            }
            match Client::connect(a, port, Some(per_try)) {
                Ok(c) => return Ok(c),
                Err(e) => last = Some(e),
            }
        }
        // A round that failed fast (a wrong server refusing the handshake) does not spin.
        std::thread::sleep(
            Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now())),
        );
    }
}

pub(super) fn join_as_member(
    r: &Resolved,
    root: Client,
    deadline: Instant,
    token: Option<&str>,
) -> Result<Joined> {
    let my_addr = match ifname_addr()? {
        Some(a) => a,
        None => root
            .conn()
            .link()
            .local_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "127.0.0.1".into()),
    };
    let server = Server::bind(&my_addr, 0)?;
    tracing::info!(
        "tree rank {:?}: listening on {} (the interface routing to the root)",
        r.rank,
        server.addr()
    );
    let probe = probe_of(
        r.rank.unwrap_or(0),
        my_addr,
        server.port(),
        r.host.as_deref(),
    );
    root.send(&join::to_value(&Rendezvous::Join {
        world: r.world,
        rank: r.rank,
        probe,
        token: token.map(str::to_string),
    })?)?;
    let reply = root.recv(left(deadline)).map_err(|e| {
        Error::new(
            e.kind(),
            "tree",
            format!(
                "rank {} waited for the plan from rank 0: {e} (when a rank never arrives, rank 0 \
                 names it shortly before the deadline; see rank 0's error)",
                r.rank.map_or("?".into(), |k| k.to_string())
            ),
        )
        .with_peer("rank 0")
    })?;
    let (rank, plan) = match join::from_value("rank 0", &reply)? {
        Rendezvous::Placed { rank, plan } => (rank, plan),
        Rendezvous::Refused {
            why: Refusal::Timeout,
            msg,
        } => {
            return Err(Error::new(
                ErrorKind::Timeout,
                "tree",
                format!("rank 0 reports: {msg}"),
            ));
        }
        Rendezvous::Refused { msg, .. } => {
            return Err(Error::new(
                ErrorKind::Mismatch,
                "tree",
                format!("the root refused this rank: {msg}"),
            ));
        }
        other => {
            return Err(Error::new(
                ErrorKind::Protocol,
                "tree",
                format!("rank 0 sent {other:?} where the plan was expected"),
            ));
        }
    };
    // The placement must be the one this rank asked for: rank 0 checks the world size and the
    // rank when it places a member, and this side checks the answer (a plan for another world
    // would link this rank into the wrong tree).
    if plan.world() != r.world || rank >= r.world || r.rank.is_some_and(|k| k != rank) {
        return Err(Error::new(
            ErrorKind::Protocol,
            "tree",
            format!(
                "rank 0 placed this process as rank {rank} of {}, but it joined as rank {} of {}",
                plan.world(),
                r.rank.map_or("(any)".into(), |k| k.to_string()),
                r.world
            ),
        )
        .with_peer("rank 0"));
    }
    let mut links = HashMap::new();
    if plan.edges().contains(&(0, rank)) {
        links.insert(0, root.conn().clone());
    } else {
        root.close();
    }
    finish_links(rank, &plan, &server, links, deadline)
}

//! The rendezvous's typed messages: a member's `Join` (its probe), rank 0's `Placed` (the rank
//! and the plan's probes, from which every rank builds the same plan) or `Refused`, and the
//! `LinkFrom` that introduces each tree link. Same framing and checks as the control pass
//! (magic, version, rkyv validation: CTRL-1, CTRL-2); the peer is named by its address, since a
//! joining process has no rank yet.

use super::{bad_peer, framed, unframed};
use crate::plan::{Plan, Probe};
use parallel_engine::value::Value;
use parallel_engine::{Error, ErrorKind, Result};
use rkyv::rancor::Error as RkyvError;
use rkyv::{Archive, Deserialize, Serialize};

/// Why rank 0 refused a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// It disagrees on the world size, or asks for a rank that is taken.
    Mismatch,
    /// It presented another rendezvous's token (STORE-3).
    Stranger,
    /// Not every rank arrived in time.
    Timeout,
}

/// A rendezvous message.
#[derive(Debug)]
pub(crate) enum Rendezvous {
    Join {
        world: usize,
        rank: Option<usize>,
        probe: Probe,
        token: Option<String>,
    },
    Placed {
        rank: usize,
        plan: Plan,
    },
    Refused {
        why: Refusal,
        msg: String,
    },
    LinkFrom {
        rank: usize,
    },
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct WireProbe {
    rank: u64,
    host_id: String,
    hostname: String,
    addr: String,
    port: u16,
    cores: u64,
    numa_nodes: u64,
    pid: u32,
    gpus: Vec<String>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Wire {
    Join {
        world: u64,
        rank: Option<u64>,
        probe: WireProbe,
        token: Option<String>,
    },
    Placed {
        rank: u64,
        probes: Vec<WireProbe>,
    },
    /// 0 mismatch, 1 stranger, 2 timeout.
    Refused {
        why: u8,
        msg: String,
    },
    LinkFrom {
        rank: u64,
    },
}

fn wire_probe(p: &Probe) -> WireProbe {
    WireProbe {
        rank: p.rank as u64,
        host_id: p.host_id.clone(),
        hostname: p.hostname.clone(),
        addr: p.addr.clone(),
        port: p.port,
        cores: p.cores as u64,
        numa_nodes: p.numa_nodes as u64,
        pid: p.pid,
        gpus: p.gpus.clone(),
    }
}

fn size(peer: &str, x: u64, what: &str) -> Result<usize> {
    usize::try_from(x).map_err(|_| bad_peer(peer, format!("{what} {x}")))
}

fn probe(peer: &str, w: WireProbe) -> Result<Probe> {
    Ok(Probe {
        rank: size(peer, w.rank, "rank")?,
        host_id: w.host_id,
        hostname: w.hostname,
        addr: w.addr,
        port: w.port,
        cores: size(peer, w.cores, "cores")?,
        numa_nodes: size(peer, w.numa_nodes, "NUMA nodes")?,
        pid: w.pid,
        gpus: w.gpus,
    })
}

/// `msg` as a value for a link: a list holding the control bytes.
pub(crate) fn to_value(msg: &Rendezvous) -> Result<Value> {
    let wire = match msg {
        Rendezvous::Join {
            world,
            rank,
            probe,
            token,
        } => Wire::Join {
            world: *world as u64,
            rank: rank.map(|r| r as u64),
            probe: wire_probe(probe),
            token: token.clone(),
        },
        Rendezvous::Placed { rank, plan } => Wire::Placed {
            rank: *rank as u64,
            probes: plan.probes.iter().map(wire_probe).collect(),
        },
        Rendezvous::Refused { why, msg } => Wire::Refused {
            why: match why {
                Refusal::Mismatch => 0,
                Refusal::Stranger => 1,
                Refusal::Timeout => 2,
            },
            msg: msg.clone(),
        },
        Rendezvous::LinkFrom { rank } => Wire::LinkFrom { rank: *rank as u64 },
    };
    let archive = rkyv::to_bytes::<RkyvError>(&wire).map_err(|e| {
        Error::new(
            ErrorKind::Protocol,
            "rendezvous",
            format!("cannot encode a rendezvous message: {e}"),
        )
    })?;
    Ok(Value::List(vec![Value::bytes(framed(&archive))]))
}

/// Decodes a rendezvous message from `peer` (its address), checked (CTRL-1, CTRL-2).
pub(crate) fn from_value(peer: &str, v: &Value) -> Result<Rendezvous> {
    let ctrl = match v {
        Value::List(items) if items.len() == 1 => match &items[0] {
            Value::Bytes(b) => &b[..],
            _ => return Err(bad_peer(peer, "no control bytes".into())),
        },
        _ => return Err(bad_peer(peer, format!("a {} value", v.type_name()))),
    };
    let aligned = unframed(peer, ctrl)?;
    let archived = rkyv::access::<ArchivedWire, RkyvError>(&aligned)
        .map_err(|e| bad_peer(peer, format!("archive: {e}")))?;
    let wire: Wire = rkyv::deserialize::<Wire, RkyvError>(archived)
        .map_err(|e| bad_peer(peer, format!("archive: {e}")))?;
    Ok(match wire {
        Wire::Join {
            world,
            rank,
            probe: p,
            token,
        } => Rendezvous::Join {
            world: size(peer, world, "world size")?,
            rank: rank.map(|r| size(peer, r, "rank")).transpose()?,
            probe: probe(peer, p)?,
            token,
        },
        Wire::Placed { rank, probes } => {
            let probes = probes
                .into_iter()
                .map(|p| probe(peer, p))
                .collect::<Result<Vec<_>>>()?;
            let rank = size(peer, rank, "rank")?;
            if rank >= probes.len() {
                return Err(bad_peer(
                    peer,
                    format!("rank {rank} in a plan of {} ranks", probes.len()),
                ));
            }
            Rendezvous::Placed {
                rank,
                plan: Plan::build(probes)?,
            }
        }
        Wire::Refused { why, msg } => Rendezvous::Refused {
            why: match why {
                1 => Refusal::Stranger,
                2 => Refusal::Timeout,
                _ => Refusal::Mismatch,
            },
            msg,
        },
        Wire::LinkFrom { rank } => Rendezvous::LinkFrom {
            rank: size(peer, rank, "rank")?,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe_of(rank: usize) -> Probe {
        Probe {
            rank,
            host_id: "h".into(),
            hostname: "h".into(),
            addr: "127.0.0.1".into(),
            port: 1000 + rank as u16,
            cores: 2,
            numa_nodes: 1,
            pid: 7,
            gpus: vec!["0000:3b:00.0".into()],
        }
    }

    #[test]
    fn ctrl_1_rendezvous_messages_round_trip() {
        let v = to_value(&Rendezvous::Join {
            world: 3,
            rank: None,
            probe: probe_of(2),
            token: Some("t".into()),
        })
        .unwrap();
        let Rendezvous::Join {
            world,
            rank,
            probe,
            token,
        } = from_value("10.0.0.2:5", &v).unwrap()
        else {
            panic!("not a join")
        };
        assert_eq!((world, rank, token.as_deref()), (3, None, Some("t")));
        assert_eq!(probe.gpus, probe_of(2).gpus);
        let plan = Plan::build((0..3).map(probe_of).collect()).unwrap();
        let v = to_value(&Rendezvous::Placed { rank: 2, plan }).unwrap();
        let Rendezvous::Placed { rank, plan: back } = from_value("p", &v).unwrap() else {
            panic!("not placed")
        };
        assert_eq!(rank, 2);
        assert_eq!(back, Plan::build((0..3).map(probe_of).collect()).unwrap());
    }

    #[test]
    fn ctrl_1_truncated_rendezvous_messages_name_the_peer_address() {
        let v = to_value(&Rendezvous::LinkFrom { rank: 4 }).unwrap();
        let Value::List(items) = &v else { panic!() };
        let Value::Bytes(b) = &items[0] else { panic!() };
        for n in 0..b.len() {
            let cut = Value::List(vec![Value::bytes(b[..n].to_vec())]);
            let e = from_value("10.0.0.9:77", &cut).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Protocol, "{e}");
            assert!(e.to_string().contains("10.0.0.9:77"), "{e}");
        }
        let e = from_value("10.0.0.9:77", &Value::str("hello")).unwrap_err();
        assert!(e.to_string().contains("10.0.0.9:77"), "{e}");
    }

    #[test]
    fn ctrl_1_a_plan_naming_a_rank_outside_it_is_refused() {
        let wire = Wire::Placed {
            rank: 2,
            probes: (0..2).map(|r| wire_probe(&probe_of(r))).collect(),
        };
        let v = Value::List(vec![Value::bytes(framed(
            &rkyv::to_bytes::<RkyvError>(&wire).unwrap(),
        ))]);
        let e = from_value("p", &v).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Protocol);
    }
}

//! The rendezvous's tests: resolution from arguments (RDV-1), meeting through a store (STORE-1,
//! STORE-3), and ranks that never arrive (RDV-2).

use super::entry::{parse_root, publish_root, rendezvous_token};
use super::member::connect_any;
use super::*;

#[test]
fn rdv_resolve_from_arguments() {
    let r = resolve(&TreeOptions {
        rank: Some(1),
        world_size: Some(3),
        root: Some("[::1]:1234".into()),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(
        (r.rank, r.world, r.root_host.as_str(), r.root_port),
        (Some(1), 3, "::1", 1234)
    );
    let e = resolve(&TreeOptions {
        rank: Some(3),
        world_size: Some(3),
        root: Some("h:1".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("rank 3"), "{e}");
}

fn store_opts(store: &Arc<MemStore>, rank: usize, world: usize, secs: f64) -> TreeOptions {
    TreeOptions {
        rank: Some(rank),
        world_size: Some(world),
        timeout: Some(Duration::from_secs_f64(secs)),
        store: Some(store.clone() as Arc<dyn Store>),
        store_prefix: "test/tree/0/".into(),
        ..Default::default()
    }
}

fn join_threads(
    store: &Arc<MemStore>,
    ranks: &[usize],
    world: usize,
    secs: f64,
) -> Vec<Result<Joined>> {
    let hs: Vec<_> = ranks
        .iter()
        .map(|&k| {
            let o = store_opts(store, k, world, secs);
            std::thread::spawn(move || join(&resolve(&o)?, o.timeout.unwrap()))
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank thread"))
        .collect()
}

/// Rank 0 deletes its entry once the rendezvous is over: the store keeps no key per tree.
fn assert_root_entry_deleted(store: &dyn Store) {
    let e = store.get("test/tree/0/root", Duration::ZERO).unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::Timeout,
        "rank 0's key was left in the store: {e}"
    );
}

#[test]
fn store_1_ranks_meet_through_a_store_and_agree_on_one_plan() {
    let store = Arc::new(MemStore::new());
    let joined = join_threads(&store, &[2, 0, 1], 3, 20.0);
    let joined: Vec<Joined> = joined.into_iter().map(Result::unwrap).collect();
    let mut ranks: Vec<usize> = joined.iter().map(|j| j.rank).collect();
    ranks.sort_unstable();
    assert_eq!(ranks, [0, 1, 2]);
    assert!(joined.iter().all(|j| j.plan == joined[0].plan));
    assert_root_entry_deleted(&*store);
}

#[test]
fn store_1_rank_0s_entry_reads_back_as_written() {
    let store = MemStore::new();
    let addrs = vec!["10.1.2.3".to_string(), "127.0.0.1".to_string()];
    publish_root(&store, "p/root", 4321, "abc", &addrs).unwrap();
    let e = parse_root("p/root", &store.get("p/root", Duration::ZERO).unwrap()).unwrap();
    assert_eq!((e.port, e.same_host, e.token.as_str()), (4321, true, "abc"));
    assert_eq!(e.addrs, addrs);
    let old = b"parallel-rendezvous 1\n4321\nh\n10.1.2.3";
    assert_eq!(
        parse_root("p/root", old).unwrap_err().kind(),
        ErrorKind::Protocol
    );
}

#[test]
fn store_3_a_member_with_a_stale_entry_naming_another_trees_port_is_refused_never_joining_it() {
    let (a, b) = (Arc::new(MemStore::new()), Arc::new(MemStore::new()));
    let opts = |store: &Arc<MemStore>, rank: usize, host: &str| TreeOptions {
        host: Some(host.into()),
        ..store_opts(store, rank, 2, 30.0)
    };
    let root_a = opts(&a, 0, "tree-a");
    let root = std::thread::spawn(move || join(&resolve(&root_a)?, Duration::from_secs(30)));
    // Tree B's store holds an entry an earlier run left, naming the port that tree A's
    // root now listens on: B's member reaches A's root, which is still waiting.
    let entry = a.get("test/tree/0/root", Duration::from_secs(20)).unwrap();
    let mut lines: Vec<&str> = std::str::from_utf8(&entry).unwrap().lines().collect();
    let earlier = rendezvous_token().unwrap();
    assert_ne!(lines[3], earlier);
    lines[3] = &earlier;
    b.set("test/tree/0/root", lines.join("\n").as_bytes())
        .unwrap();
    let t0 = Instant::now();
    let e = join(
        &resolve(&opts(&b, 1, "tree-b")).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    assert!(e.to_string().contains("another tree"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(20), "{:?}", t0.elapsed());
    // Tree A's own member still joins it, and A's plan holds only A's ranks.
    let member = join(
        &resolve(&opts(&a, 1, "tree-a")).unwrap(),
        Duration::from_secs(30),
    )
    .unwrap();
    let root = root.join().expect("root thread").unwrap();
    assert_eq!(member.plan, root.plan);
    assert!(root.plan.probes.iter().all(|p| p.host_id == "tree-a"));
}

#[test]
fn store_1_a_store_needs_a_rank() {
    let store = Arc::new(MemStore::new());
    let mut o = store_opts(&store, 0, 2, 1.0);
    o.rank = None;
    let e = resolve(&o).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config);
    assert!(e.to_string().contains("rank"), "{e}");
}

#[test]
fn rdv_2_a_rank_that_never_arrives_fails_the_others_within_the_timeout_naming_it() {
    let store = Arc::new(MemStore::new());
    let t0 = Instant::now();
    let results = join_threads(&store, &[0, 1], 3, 3.0);
    let took = t0.elapsed();
    for r in results {
        let e = r.unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{msg}");
        assert!(
            msg.contains("rank 2") && msg.contains("never arrived"),
            "{msg}"
        );
    }
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_root_entry_deleted(&*store);
}

#[test]
fn rdv_2_members_waiting_for_a_root_that_never_publishes_name_rank_0() {
    let store = Arc::new(MemStore::new());
    let results = join_threads(&store, &[1, 2], 3, 1.0);
    for r in results {
        let e = r.unwrap_err();
        let msg = e.to_string();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{msg}");
        assert!(
            msg.contains("rank 0") && msg.contains("never arrived"),
            "{msg}"
        );
    }
}

/// A store whose server is gone: every call fails at once.
#[derive(Debug)]
struct BrokenStore;

impl Store for BrokenStore {
    fn set(&self, _: &str, _: &[u8]) -> Result<()> {
        Err(Error::new(ErrorKind::PeerLost, "store", "connection reset"))
    }
    fn get(&self, _: &str, _: Duration) -> Result<Vec<u8>> {
        Err(Error::new(ErrorKind::PeerLost, "store", "connection reset"))
    }
    fn delete(&self, _: &str) -> Result<()> {
        Err(Error::new(ErrorKind::PeerLost, "store", "connection reset"))
    }
}

#[test]
fn rdv_1_a_failing_store_is_reported_as_such_not_as_a_rank_that_never_arrived() {
    let o = TreeOptions {
        rank: Some(1),
        world_size: Some(2),
        store: Some(Arc::new(BrokenStore)),
        store_prefix: "p/".into(),
        ..Default::default()
    };
    let t0 = Instant::now();
    let e = join(&resolve(&o).unwrap(), Duration::from_secs(30)).unwrap_err();
    let msg = e.to_string();
    assert_eq!(e.kind(), ErrorKind::PeerLost, "{msg}");
    assert!(
        msg.contains("connection reset") && msg.contains("p/root"),
        "{msg}"
    );
    assert!(
        !msg.contains("never arrived") && !msg.contains("waited"),
        "{msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
}

#[test]
fn store_1_loopback_of_another_host_is_never_tried() {
    let t0 = Instant::now();
    let e = connect_any(
        1,
        1,
        false,
        &["127.0.0.1".into()],
        Instant::now() + Duration::from_secs(30),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Config, "{e}");
    assert!(e.to_string().contains("only loopback"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn store_1_a_foreign_value_under_the_key_is_a_protocol_error() {
    let e = parse_root("p/root", b"127.0.0.1:29500").unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Protocol);
    assert!(e.to_string().contains("p/root"), "{e}");
}

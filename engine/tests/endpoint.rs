//! Client/Server conformance, in one process (threads). The same file runs under every
//! PARALLEL_IO x PARALLEL_SHM combination in CI (scripts/test.sh); cross-process cases live in
//! tests/processes.rs.

use parallel_engine::value::{DType, Device, Key, Tensor, Value};
use parallel_engine::{Client, ErrorKind, LinkKind, Server};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn t(secs: f64) -> Option<Duration> {
    Some(Duration::from_secs_f64(secs))
}

fn expected_link() -> LinkKind {
    if parallel_engine::config::config().shm {
        LinkKind::Shm
    } else {
        LinkKind::Tcp
    }
}

fn pair() -> (Server, Client) {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let c = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    s.wait_for(1, t(10.0)).unwrap();
    (s, c)
}

fn f32_tensor(vals: &[f32], shape: Vec<usize>) -> Tensor {
    Tensor::from_bytes(
        DType::F32,
        shape,
        vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
    )
    .unwrap()
}

#[test]
fn seed_example_hi() {
    let server = Server::bind("127.0.0.1", 0).unwrap();
    let client = Client::connect("127.0.0.1", server.port(), None).unwrap();
    client.send(&Value::str("hi")).unwrap();
    let (msg, conn) = server.recv_any(None, t(10.0)).unwrap();
    assert_eq!(msg.as_str(), Some("hi"));
    assert_eq!(conn.link_kind(), expected_link());
    assert_eq!(client.link_kind(), expected_link());
    client.close();
    server.close();
}

#[test]
fn values_roundtrip_both_directions() {
    let (s, c) = pair();
    let v = Value::Dict(vec![
        (
            Key::Str("x".into()),
            Value::List(vec![
                Value::Int(i64::MIN),
                Value::Float(-0.5),
                Value::None,
                Value::Bool(false),
            ]),
        ),
        (
            Key::Int(3),
            Value::Tuple(vec![
                Value::str("ünïcode"),
                Value::bytes(vec![0u8; 100_000]),
            ]),
        ),
        (
            Key::Str("t".into()),
            Value::Tensor(f32_tensor(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], vec![2, 3])),
        ),
    ]);
    c.send(&v).unwrap();
    let (got, conn) = s.recv_any(None, t(10.0)).unwrap();
    assert!(v.same(&got), "{got:?}");
    conn.send(&v, None).unwrap();
    assert!(v.same(&c.recv(t(10.0)).unwrap()));
}

#[test]
fn large_tensor_into_out_and_fresh() {
    let (s, c) = pair();
    let n = 6 << 20; // 24 MiB of f32: above the cross-memory threshold
    let data: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    let src = Tensor::from_bytes(DType::F32, vec![n], data.clone()).unwrap();
    let v = Value::Tensor(src);
    let c2 = c.clone();
    let h = std::thread::spawn(move || {
        c2.send(&v).unwrap();
        c2.send(&v).unwrap();
    });
    let conn = s.connections()[0].clone();
    let mut out = vec![Tensor::from_bytes(DType::F32, vec![n], vec![0u8; n * 4]).unwrap()];
    let got = conn.recv_into(&mut out, t(20.0)).unwrap();
    assert!(matches!(got, Value::Out(0)));
    assert!(out[0].bytes().unwrap() == &data[..]);
    let fresh = conn.recv(t(20.0)).unwrap();
    assert!(fresh.as_tensor().unwrap().bytes().unwrap() == &data[..]);
    h.join().unwrap();
}

#[test]
fn link_1_out_mismatch_keeps_the_connection() {
    let (s, c) = pair();
    let conn = s.connections()[0].clone();
    c.send(&Value::Tensor(f32_tensor(&[1.0; 6], vec![2, 3])))
        .unwrap();
    c.send(&Value::str("after")).unwrap();
    let mut wrong = vec![Tensor::from_bytes(DType::I32, vec![2, 3], vec![0; 24]).unwrap()];
    let e = conn.recv_into(&mut wrong, t(10.0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch);
    assert!(e.to_string().contains("int32"), "{e}");
    assert_eq!(conn.recv(t(10.0)).unwrap().as_str(), Some("after"));
    let mut shape = vec![f32_tensor(&[0.0; 6], vec![3, 2])];
    c.send(&Value::Tensor(f32_tensor(&[1.0; 6], vec![2, 3])))
        .unwrap();
    assert_eq!(
        conn.recv_into(&mut shape, t(10.0)).unwrap_err().kind(),
        ErrorKind::Mismatch
    );
    c.send(&Value::Int(5)).unwrap();
    assert_eq!(conn.recv(t(10.0)).unwrap().as_int(), Some(5));
}

#[test]
fn strided_tensors_send_and_receive() {
    let (s, c) = pair();
    let base = f32_tensor(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], vec![2, 3]);
    let keep: Arc<dyn std::any::Any + Send + Sync> = Arc::new(());
    // SAFETY: a transposed view over `base`, alive for the whole test.
    let tr = unsafe {
        Tensor::from_raw(
            DType::F32,
            vec![3, 2],
            Some(vec![1, 3]),
            Device::Cpu,
            base.data_ptr() as *mut u8,
            24,
            keep.clone(),
        )
    };
    c.send(&Value::Tensor(tr)).unwrap();
    let conn = s.connections()[0].clone();
    let mut dst = vec![0u8; 24];
    // SAFETY: a transposed view over dst.
    let out = unsafe {
        Tensor::from_raw(
            DType::F32,
            vec![3, 2],
            Some(vec![1, 3]),
            Device::Cpu,
            dst.as_mut_ptr(),
            24,
            keep,
        )
    };
    let mut outs = vec![out];
    conn.recv_into(&mut outs, t(10.0)).unwrap();
    drop(outs);
    assert_eq!(dst, base.bytes().unwrap());
}

#[test]
fn recv_timeout_is_clean_and_named() {
    let (s, c) = pair();
    let t0 = Instant::now();
    let e = c.recv(t(0.2)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(t0.elapsed() >= Duration::from_millis(200));
    assert!(e.to_string().contains("127.0.0.1"), "names the peer: {e}");
    s.connections()[0].send(&Value::Int(1), None).unwrap();
    assert_eq!(c.recv(t(10.0)).unwrap().as_int(), Some(1));
    let e = s.recv_any(None, t(0.1)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout);
}

#[test]
fn recv_any_is_fair() {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let a = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    let b = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    s.wait_for(2, t(10.0)).unwrap();
    for i in 0..50 {
        a.send(&Value::Int(i)).unwrap();
    }
    b.send(&Value::str("b")).unwrap();
    // b's single message must come out well before a's backlog is drained.
    let mut pos = None;
    for i in 0..51 {
        let (v, _) = s.recv_any(None, t(10.0)).unwrap();
        if v.as_str() == Some("b") {
            pos = Some(i);
            break;
        }
    }
    assert!(pos.is_some_and(|p| p < 5), "b starved: position {pos:?}");
}

#[test]
fn tags_ids_clients_and_broadcast() {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let cs: Vec<Client> = (0..3)
        .map(|_| Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap())
        .collect();
    let mut order = Vec::new();
    s.clients(3, None, t(10.0), |c| {
        order.push(c.id());
        c.set_tag(Some(if c.id() % 2 == 0 { "even" } else { "odd" }.into()));
        Ok(())
    })
    .unwrap();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted);
    assert_eq!(s.broadcast(&Value::str("all"), None, None).unwrap(), 3);
    for c in &cs {
        assert_eq!(c.recv(t(10.0)).unwrap().as_str(), Some("all"));
    }
    let n_odd = s.broadcast(&Value::str("odd"), Some("odd"), None).unwrap();
    assert_eq!(n_odd, order.iter().filter(|i| *i % 2 == 1).count());
    let got: usize = cs.iter().filter(|c| c.recv(t(0.3)).is_ok()).count();
    assert_eq!(got, n_odd);
    assert_eq!(
        s.clients(0, Some("even"), None, |_| Ok(())).unwrap(),
        3 - n_odd
    );
}

#[test]
fn ep_3_close_from_another_thread_wakes_blocked_calls() {
    let (s, c) = pair();
    let c2 = c.clone();
    let h = std::thread::spawn(move || c2.recv(t(30.0)));
    let s2 = s.clone();
    let h2 = std::thread::spawn(move || s2.recv_any(None, t(30.0)));
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    c.close();
    s.close();
    let e = h.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
    let e2 = h2.join().unwrap().unwrap_err();
    assert_eq!(e2.kind(), ErrorKind::Closed, "{e2}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    assert_eq!(c.send(&Value::None).unwrap_err().kind(), ErrorKind::Closed);
}

#[test]
fn orderly_close_is_closed_not_peer_lost() {
    let (s, c) = pair();
    let conn = s.connections()[0].clone();
    c.close();
    let e = conn.recv(t(10.0)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Closed, "{e}");
}

#[test]
fn async_send_and_recv_handles() {
    let (s, c) = pair();
    let conn = s.connections()[0].clone();
    let r = conn.recv_async(vec![], t(10.0));
    assert!(!r.done());
    let h = c.conn().send_async(Value::Int(42), None);
    h.wait(
        parallel_engine::runtime::Deadline::after(Duration::from_secs(10)),
        "send",
    )
    .unwrap();
    let (v, _) = r
        .wait(
            parallel_engine::runtime::Deadline::after(Duration::from_secs(10)),
            "recv",
        )
        .unwrap();
    assert_eq!(v.as_int(), Some(42));
    // Ordering of several async sends on one connection.
    let hs: Vec<_> = (0..20)
        .map(|i| c.conn().send_async(Value::Int(i), None))
        .collect();
    for h in hs {
        h.wait(
            parallel_engine::runtime::Deadline::after(Duration::from_secs(10)),
            "send",
        )
        .unwrap();
    }
    for i in 0..20 {
        assert_eq!(conn.recv(t(10.0)).unwrap().as_int(), Some(i));
    }
}

#[test]
fn scope_1_connections_carry_a_completion_scope_both_ways_and_the_buffers_come_back_filled() {
    let (s, c) = pair();
    let conn = s.connections()[0].clone();
    let (up, down) = (vec![7u8; 1 << 20], vec![9u8; 4099]);
    let (mut got_up, mut got_down) = (vec![0u8; up.len()], vec![0u8; down.len()]);
    let d = parallel_engine::runtime::Deadline::after(Duration::from_secs(20));
    parallel_engine::link::scope(d, |sc| {
        sc.recv_into(&conn, vec![&mut got_up[..]]);
        sc.recv_into(c.conn(), vec![&mut got_down[..]]);
        sc.send(c.conn(), &[&up[..]]);
        sc.send(&conn, &[&down[..]]);
    })
    .unwrap();
    assert!(got_up == up && got_down == down);
    // A message that does not fit the buffers is the scope's error; the link stays usable.
    c.send(&Value::bytes(vec![1u8; 3])).unwrap();
    let mut small = vec![0u8; 2];
    let e = parallel_engine::link::scope(d, |sc| {
        sc.recv_into(&conn, vec![&mut small[..]]);
    })
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    assert_eq!(small, vec![0u8; 2]);
    c.send(&Value::Int(5)).unwrap();
    assert_eq!(conn.recv(t(10.0)).unwrap().as_int(), Some(5));
}

#[test]
fn stats_count_traffic() {
    let (s, c) = pair();
    c.send(&Value::bytes(vec![1u8; 10_000])).unwrap();
    s.recv_any(None, t(10.0)).unwrap();
    let cs = c.stats();
    assert_eq!(cs.msgs_sent, 1);
    assert!(cs.bytes_sent >= 10_000);
    let ss = s.stats();
    assert_eq!(ss.traffic.msgs_recv, 1);
    assert_eq!(ss.traffic.bytes_recv, cs.bytes_sent);
    assert_eq!(ss.connections, 1);
}

#[test]
fn connect_retries_until_the_server_appears() {
    let probe = Server::bind("127.0.0.1", 0).unwrap();
    let port = probe.port();
    probe.close();
    drop(probe);
    std::thread::sleep(Duration::from_millis(300));
    let h = std::thread::spawn(move || Client::connect("127.0.0.1", port, t(10.0)));
    std::thread::sleep(Duration::from_millis(400));
    let s = Server::bind("127.0.0.1", port).unwrap();
    let c = h.join().unwrap().unwrap();
    c.send(&Value::str("late")).unwrap();
    assert_eq!(s.recv_any(None, t(10.0)).unwrap().0.as_str(), Some("late"));
}

#[test]
fn connect_failure_says_where_and_why() {
    let probe = Server::bind("127.0.0.1", 0).unwrap();
    let port = probe.port();
    drop(probe);
    std::thread::sleep(Duration::from_millis(300));
    let e = Client::connect("127.0.0.1", port, t(0.5)).unwrap_err();
    let m = e.to_string();
    assert_eq!(e.kind(), ErrorKind::Timeout);
    assert!(
        m.contains(&format!("127.0.0.1:{port}")) && m.contains("refused"),
        "{m}"
    );
}

#[test]
fn ipv6_loopback() {
    let Ok(s) = Server::bind("::1", 0) else {
        return;
    }; // no IPv6 on this host
    let c = Client::connect("::1", s.port(), t(10.0)).unwrap();
    c.send(&Value::Int(6)).unwrap();
    assert_eq!(s.recv_any(None, t(10.0)).unwrap().0.as_int(), Some(6));
}

/// EP-6 (issue 10.6): a client that closes is retired within a second without any receive on
/// the server; broadcast skips it and counts the living.
#[test]
fn ep_6_departed_client_is_retired_and_broadcast_counts_the_living() {
    let s = Server::bind("127.0.0.1", 0).unwrap();
    let a = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    let b = Client::connect("127.0.0.1", s.port(), t(10.0)).unwrap();
    s.wait_for(2, t(10.0)).unwrap();
    let held = s.connections();
    b.close();
    let t0 = Instant::now();
    while s.connections().len() > 1 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        s.connections().len(),
        1,
        "the departed client is still listed"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(held.iter().filter(|c| c.is_closed()).count(), 1);
    assert_eq!(s.broadcast(&Value::Int(7), None, t(10.0)).unwrap(), 1);
    assert_eq!(a.recv(t(10.0)).unwrap().as_int(), Some(7));
    // An orderly close is not an error for recv_any.
    assert_eq!(
        s.recv_any(None, t(0.2)).unwrap_err().kind(),
        ErrorKind::Timeout
    );
}

/// EP-5: a message read ahead for recv_any (a frame too large to be queued whole) is still
/// delivered, intact and in order with the connection's later messages, to a direct recv.
#[test]
fn ep_5_read_ahead_message_reaches_a_direct_recv_in_order() {
    let (s, c) = pair();
    let big: Vec<u8> = (0..(32usize << 20)).map(|i| (i % 251) as u8).collect();
    let c2 = c.clone();
    let expect = big.clone();
    let h = std::thread::spawn(move || {
        c2.send(&Value::bytes(big)).unwrap();
        c2.send(&Value::Int(2)).unwrap();
    });
    let (v, conn) = s.recv_any(None, t(30.0)).unwrap();
    match &v {
        Value::Bytes(b) => assert!(b[..] == expect[..], "payload corrupted"),
        other => panic!("expected bytes, got {}", other.type_name()),
    }
    assert_eq!(conn.recv(t(10.0)).unwrap().as_int(), Some(2));
    h.join().unwrap();
}

/// AHEAD-2/3: back-to-back small messages reach the socket together, so the first receive may
/// read the next ones ahead into the link's buffer; each must still come out whole, in order,
/// and `recv_any` must find a message already read ahead (the socket itself is empty then)
/// instead of waiting for its timeout.
#[test]
fn ahead_3_messages_read_ahead_are_found_by_recv_and_recv_any_in_order() {
    let (s, c) = pair();
    for round in 0..50i64 {
        for k in 0..4 {
            c.send(&Value::Int(round * 4 + k)).unwrap();
        }
        let (v, conn) = s.recv_any(None, t(10.0)).unwrap();
        assert_eq!(v.as_int(), Some(round * 4), "round {round}: first message");
        assert_eq!(conn.recv(t(10.0)).unwrap().as_int(), Some(round * 4 + 1));
        let started = Instant::now();
        let (v, _) = s.recv_any(None, t(10.0)).unwrap();
        assert_eq!(
            v.as_int(),
            Some(round * 4 + 2),
            "round {round}: third message"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "recv_any waited for a message already received ahead"
        );
        assert_eq!(conn.recv(t(10.0)).unwrap().as_int(), Some(round * 4 + 3));
    }
    c.close();
    s.close();
}

/// AHEAD-2: frames of every size around the read-ahead buffer's (16 KiB), sent back to back so
/// that a read ahead holds the start of the next frame, arrive whole and in order: bytes taken
/// ahead come first, and a large remainder goes straight to its destination.
#[test]
fn ahead_2_mixed_sizes_back_to_back_arrive_whole_and_in_order() {
    let (s, c) = pair();
    let sizes = [
        0usize,
        1,
        8,
        16 << 10,
        (16 << 10) - 1,
        (16 << 10) + 1,
        3,
        1 << 20,
        7,
        40_000,
        5,
    ];
    let payload = |n: usize, k: usize| -> Vec<u8> { (0..n).map(|i| (i * 7 + k) as u8).collect() };
    let c2 = c.clone();
    let h = std::thread::spawn(move || {
        for (k, n) in sizes.iter().enumerate() {
            c2.send(&Value::bytes(payload(*n, k))).unwrap();
        }
    });
    let (first, conn) = s.recv_any(None, t(30.0)).unwrap();
    let mut got = vec![first];
    for _ in 1..sizes.len() {
        got.push(conn.recv(t(30.0)).unwrap());
    }
    h.join().unwrap();
    for (k, (v, n)) in got.iter().zip(sizes).enumerate() {
        match v {
            Value::Bytes(b) => assert!(
                b[..] == payload(n, k)[..],
                "message {k} ({n} bytes) differs"
            ),
            other => panic!("message {k}: expected bytes, got {}", other.type_name()),
        }
    }
}

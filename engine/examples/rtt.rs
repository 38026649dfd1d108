//! Small-message round trip between two processes, in Rust: the floor under the Python figure
//! (`benches/transport.py --parts rtt`). `cargo run --example rtt -- [tcp|shm|raw] [n]`: this
//! process pings, a copy of it started with `echo` answers. `raw` is a plain TCP socket whose
//! receiver spins on non-blocking `recv` (what the kernel alone costs). Set `PARALLEL_SHM=1` for
//! `shm`, `PARALLEL_SHM=0` for `tcp` (the echo process inherits it).
#![allow(clippy::print_stdout)] // an example prints what it measures

use parallel_engine::{Client, Server, Value};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const T: Option<Duration> = Some(Duration::from_secs(30));

fn median_us(mut v: Vec<u64>) -> f64 {
    v.sort_unstable();
    v[v.len() / 2] as f64 / 1e3
}

fn echo(kind: &str, total: usize) -> parallel_engine::Result<()> {
    if kind == "raw" {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        println!("{}", l.local_addr().expect("addr").port());
        let (mut s, _) = l.accept().expect("accept");
        s.set_nodelay(true).expect("nodelay");
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = [0u8; 8];
        for _ in 0..total {
            let mut got = 0;
            while got < 8 {
                match s.read(&mut b[got..]) {
                    Ok(0) => return Ok(()),
                    Ok(n) => got += n,
                    Err(_) => std::hint::spin_loop(),
                }
            }
            s.write_all(&b).expect("write");
        }
        return Ok(());
    }
    let server = Server::bind("127.0.0.1", 0)?;
    println!("{}", server.port());
    let (_, conn) = server.recv_any(None, T)?;
    for _ in 0..total {
        let v = conn.recv(T)?;
        conn.send(&v, T)?;
    }
    Ok(())
}

/// What a message costs without any I/O: encoding and decoding it whole, and a spin decision.
fn cpu(n: usize) {
    use parallel_engine::wire;
    let limits = wire::Limits::from_config();
    let msg = Value::bytes(*b"12345678");
    let t0 = Instant::now();
    let mut frame = Vec::new();
    for _ in 0..n {
        let enc = wire::encode(&msg, &limits).expect("encode");
        frame.clear();
        frame.extend_from_slice(&[0u8; wire::HEADER_LEN]);
        frame.extend_from_slice(&enc.desc);
        std::hint::black_box(&enc.segs);
    }
    println!(
        "encode: {:.0} ns",
        t0.elapsed().as_nanos() as f64 / n as f64
    );
    let h = wire::Header {
        kind: wire::FrameKind::Message,
        flags: 0,
        desc_len: (frame.len() - wire::HEADER_LEN) as u32,
        nseg: 1,
        payload_len: 8,
        seq: 1,
    };
    frame[..wire::HEADER_LEN].copy_from_slice(&h.encode());
    frame.extend_from_slice(b"12345678");
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(wire::decode_frame(&frame, &limits).expect("decode"));
    }
    println!(
        "decode: {:.0} ns",
        t0.elapsed().as_nanos() as f64 / n as f64
    );
    let t0 = Instant::now();
    for _ in 0..n {
        std::hint::black_box(parallel_engine::runtime::Spin::start(
            Duration::from_micros(50),
        ));
    }
    println!(
        "spin start: {:.0} ns",
        t0.elapsed().as_nanos() as f64 / n as f64
    );
}

/// Per-call cost of send and recv on a link whose buffer holds every message (no waiting).
fn calls(n: usize, rounds: usize) -> parallel_engine::Result<()> {
    let server = Server::bind("127.0.0.1", 0)?;
    let c = Client::connect("127.0.0.1", server.port(), T)?;
    c.send(&Value::str("hello"))?;
    let (_, conn) = server.recv_any(None, T)?;
    let msg = Value::bytes(*b"12345678");
    for _ in 0..rounds {
        let t0 = Instant::now();
        for _ in 0..n {
            c.send(&msg)?;
        }
        let t1 = Instant::now();
        for _ in 0..n {
            std::hint::black_box(conn.recv(T)?);
        }
        println!(
            "{}: send {:.0} ns, recv {:.0} ns",
            c.link_kind().name(),
            (t1 - t0).as_nanos() as f64 / n as f64,
            t1.elapsed().as_nanos() as f64 / n as f64
        );
    }
    Ok(())
}

fn main() -> parallel_engine::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("tcp", |s| s.as_str()).to_string();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20000);
    let warm = 2000;
    if kind == "cpu" {
        cpu(n);
        // `cpu N ROUNDS`: ROUNDS rounds of N sends then N receives (3 by default).
        let rounds = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
        return calls(n, rounds);
    }
    if args.get(3).map(|s| s.as_str()) == Some("echo") {
        return echo(&kind, warm + n);
    }
    let mut child = Command::new(&args[0])
        .args([&kind, &n.to_string(), "echo"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the echo process");
    let mut line = String::new();
    let mut out = child.stdout.take().expect("stdout");
    let mut byte = [0u8; 1];
    while out.read(&mut byte).expect("port") == 1 && byte[0] != b'\n' {
        line.push(byte[0] as char);
    }
    let port: u16 = line.trim().parse().expect("a port");
    let r = ping(&kind, port, warm, n);
    if r.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    println!("{kind}: median {:.2} us over {n}", median_us(r?));
    Ok(())
}

/// The timed round trips against the echo process on `port`.
fn ping(kind: &str, port: u16, warm: usize, n: usize) -> parallel_engine::Result<Vec<u64>> {
    let mut samples = Vec::with_capacity(n);
    if kind == "raw" {
        let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        s.set_nonblocking(true).expect("nonblocking");
        let mut b = *b"12345678";
        for i in 0..warm + n {
            let t0 = Instant::now();
            s.write_all(&b).expect("write");
            let mut got = 0;
            while got < 8 {
                match s.read(&mut b[got..]) {
                    Ok(n) => got += n,
                    Err(_) => std::hint::spin_loop(),
                }
            }
            if i >= warm {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
        }
    } else {
        let c = Client::connect("127.0.0.1", port, T)?;
        c.send(&Value::str("hello"))?;
        let msg = Value::bytes(*b"12345678");
        for i in 0..warm + n {
            let t0 = Instant::now();
            c.send(&msg)?;
            let r = c.recv(T)?;
            if i >= warm {
                samples.push(t0.elapsed().as_nanos() as u64);
            }
            assert!(matches!(r, Value::Bytes(_)));
        }
        println!("link {}", c.link_kind().name());
    }
    Ok(samples)
}

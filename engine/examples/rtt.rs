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

fn main() -> parallel_engine::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args.get(1).map_or("tcp", |s| s.as_str()).to_string();
    let n: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20000);
    let warm = 2000;
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
    let _ = child.wait();
    println!("{kind}: median {:.2} us over {n}", median_us(samples));
    Ok(())
}

//! The seed's allreduce example in Rust, with ranks as processes: 2, 3, 5 and 8 ranks.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn run_world(n: usize, elements: usize, assign: bool) {
    let root = format!("127.0.0.1:{}", free_port());
    let mut kids: Vec<_> = (0..n)
        .map(|r| {
            let rank = if assign {
                "-".to_string()
            } else {
                r.to_string()
            };
            Command::new(env!("CARGO_BIN_EXE_parallel-allreduce"))
                .args([
                    rank,
                    n.to_string(),
                    root.clone(),
                    elements.to_string(),
                    "2".into(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let end = Instant::now() + Duration::from_secs(60);
    let mut ranks = Vec::new();
    for k in &mut kids {
        loop {
            if let Some(st) = k.try_wait().unwrap() {
                let out = std::io::read_to_string(k.stdout.take().unwrap()).unwrap();
                let err = std::io::read_to_string(k.stderr.take().unwrap()).unwrap();
                assert!(st.success(), "{out}{err}");
                let rank: usize = out.split_whitespace().nth(1).unwrap().parse().unwrap();
                ranks.push(rank);
                break;
            }
            assert!(Instant::now() < end, "a rank did not finish");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    ranks.sort_unstable();
    assert_eq!(ranks, (0..n).collect::<Vec<_>>());
}

#[test]
fn seed_allreduce_as_processes() {
    for n in [2, 3, 5, 8] {
        run_world(n, 1 << 16, false);
    }
    run_world(3, 1 << 20, false);
}

#[test]
fn ranks_assigned_by_the_root() {
    run_world(3, 1000, true);
}

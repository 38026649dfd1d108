//! Helpers shared by the Tree test files: a world of ranks as threads of this process.

use parallel_collectives::{Tree, TreeOptions};
use parallel_engine::Result;
use std::sync::Arc;
use std::time::Duration;

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Runs `f(tree)` on `n` ranks (threads); returns their results in rank order.
#[allow(dead_code)]
pub fn world<T: Send + 'static>(
    n: usize,
    f: impl Fn(Tree) -> Result<T> + Send + Sync + 'static,
) -> Vec<Result<T>> {
    world_on(n, None, f)
}

/// Like `world`, with rank r reporting host `hosts[r]` (simulated hosts).
pub fn world_on<T: Send + 'static>(
    n: usize,
    hosts: Option<Vec<&'static str>>,
    f: impl Fn(Tree) -> Result<T> + Send + Sync + 'static,
) -> Vec<Result<T>> {
    let port = free_port();
    let f = Arc::new(f);
    let hs: Vec<_> = (0..n)
        .map(|r| {
            let f = f.clone();
            let host = hosts.as_ref().map(|h| h[r].to_string());
            std::thread::spawn(move || {
                let t = Tree::new(TreeOptions {
                    rank: Some(r),
                    world_size: Some(n),
                    root: Some(format!("127.0.0.1:{port}")),
                    timeout: Some(Duration::from_secs(20)),
                    host,
                    ..Default::default()
                })?;
                f(t)
            })
        })
        .collect();
    hs.into_iter()
        .map(|h| h.join().expect("rank thread panicked"))
        .collect()
}

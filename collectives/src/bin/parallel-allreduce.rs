//! One rank of an all-reduce, as a process: the seed's Tree example in Rust.
//!
//! `parallel-allreduce RANK WORLD ROOT [ELEMENTS] [ITERS]` (RANK may be `-`: assigned by the
//! root). Every rank contributes `rank + 1` in every element; each checks the sum
//! `world * (world + 1) / 2`, prints its timing, and exits 0.
#![allow(clippy::print_stdout, clippy::print_stderr)] // a command-line tool reports on stdio

use parallel_collectives::{Op, Tree, TreeOptions};
use parallel_engine::value::DType;
use std::time::{Duration, Instant};

fn main() {
    if let Err(e) = run() {
        eprintln!("parallel-allreduce: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        return Err("usage: parallel-allreduce RANK|- WORLD HOST:PORT [ELEMENTS] [ITERS]".into());
    }
    let rank = if args[1] == "-" {
        None
    } else {
        Some(args[1].parse::<usize>().map_err(|e| format!("RANK: {e}"))?)
    };
    let world: usize = args[2].parse().map_err(|e| format!("WORLD: {e}"))?;
    let elements: usize = args
        .get(4)
        .map_or(Ok(1 << 20), |s| s.parse())
        .map_err(|e| format!("ELEMENTS: {e}"))?;
    let iters: usize = args
        .get(5)
        .map_or(Ok(5), |s| s.parse())
        .map_err(|e| format!("ITERS: {e}"))?;
    let opts = TreeOptions {
        rank,
        world_size: Some(world),
        root: Some(args[3].clone()),
        timeout: Some(Duration::from_secs(60)),
        ..Default::default()
    };
    let tree = Tree::new(opts).map_err(|e| e.to_string())?;
    let me = tree.rank();
    let want = (world * (world + 1) / 2) as f32;
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let mut grads: Vec<u8> = std::iter::repeat_n((me as f32 + 1.0).to_le_bytes(), elements)
            .flatten()
            .collect();
        tree.barrier().map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        // tree.allReduce(grads, function(a, b) return a:add(b) end)
        let n = tree
            .all_reduce(DType::F32, &mut grads, &Op::Sum)
            .map_err(|e| e.to_string())?;
        best = best.min(t0.elapsed().as_secs_f64());
        if n != world {
            return Err(format!("{n} ranks contributed, expected {world}"));
        }
        if let Some(bad) = grads
            .chunks_exact(4)
            .position(|c| f32::from_le_bytes(c.try_into().expect("4")) != want)
        {
            return Err(format!("element {bad} differs from {want}"));
        }
    }
    let mib = (elements * 4) as f64 / (1 << 20) as f64;
    println!(
        "rank {me} of {world}: all_reduce of {mib:.2} MiB float32 ok, best {:.3} ms",
        best * 1e3
    );
    if me == 0 {
        print!("{}", tree.describe());
    }
    Ok(())
}

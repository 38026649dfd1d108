//! Writes a seed corpus for the `decode` target: valid frames of every value kind, so the fuzzer
//! starts from real descriptors instead of rediscovering the rkyv layout byte by byte.
//!
//! Run from fuzz/: `cargo run --example seeds` (stable is enough); it fills corpus/decode/.

use parallel_engine::wire::{FrameKind, Limits, encode_frame};
use parallel_engine::{DType, Key, Tensor, Value};

fn main() -> std::io::Result<()> {
    let limits = Limits {
        max_descriptor: 64 << 10,
        max_payload: 1 << 20,
        max_segments: 64,
        max_depth: 16,
    };
    let t = |dtype: DType, shape: Vec<usize>| {
        let n = shape.iter().product::<usize>() * dtype.itemsize();
        Value::Tensor(Tensor::from_bytes(dtype, shape, vec![3; n]).expect("consistent tensor"))
    };
    let seeds = [
        Value::None,
        Value::Bool(true),
        Value::Int(-7),
        Value::Float(0.5),
        Value::str("hi"),
        Value::bytes(vec![1, 2, 3]),
        t(DType::F32, vec![2, 3]),
        t(DType::U8, vec![0]),
        Value::List(vec![Value::Int(1), Value::None, Value::List(vec![])]),
        Value::Tuple(vec![Value::str("a"), t(DType::I64, vec![1])]),
        Value::Dict(vec![
            (Key::Str("x".into()), Value::bytes(vec![9; 10])),
            (Key::Int(4), t(DType::BF16, vec![2, 2])),
        ]),
    ];
    let dir = std::path::Path::new("corpus/decode");
    std::fs::create_dir_all(dir)?;
    for (i, v) in seeds.iter().enumerate() {
        let f = encode_frame(FrameKind::Message, i as u64, v, &limits).expect("seed encodes");
        std::fs::write(dir.join(format!("seed-{i:02}")), f)?;
    }
    let hello = Value::Dict(vec![
        (Key::Str("host".into()), Value::str("h")),
        (Key::Str("nonce".into()), Value::bytes(vec![0; 32])),
    ]);
    let f = encode_frame(FrameKind::Hello, 0, &hello, &limits).expect("seed encodes");
    std::fs::write(dir.join("seed-hello"), f)?;
    Ok(())
}

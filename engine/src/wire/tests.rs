//! The wire format's tests: round trips, limits refused before allocation (WIRE-1), garbage and
//! mutated frames never panic the decoder (WIRE-2), depth (WIRE-3), segment sizes (WIRE-4).

use super::*;
use crate::error::ErrorKind;
use crate::value::{DType, Key, Tensor};
use proptest::prelude::*;
use rkyv::rancor::Error as RkyvError;

fn limits() -> Limits {
    Limits {
        max_descriptor: 1 << 20,
        max_payload: 1 << 30,
        max_segments: 1024,
        max_depth: 16,
    }
}

fn sample() -> Value {
    Value::Dict(vec![
        (
            Key::Str("a".into()),
            Value::List(vec![
                Value::Int(-3),
                Value::Float(2.5),
                Value::None,
                Value::Bool(true),
            ]),
        ),
        (
            Key::Int(7),
            Value::Tuple(vec![Value::str("hé"), Value::bytes(vec![1, 2, 3])]),
        ),
        (
            Key::Str("t".into()),
            Value::Tensor(Tensor::from_bytes(DType::F32, vec![2, 2], vec![0u8; 16]).unwrap()),
        ),
        (Key::Str("empty".into()), Value::List(vec![])),
    ])
}

#[test]
fn wire_roundtrip_nested() {
    let v = sample();
    let f = encode_frame(FrameKind::Message, 9, &v, &limits()).unwrap();
    let (h, back) = decode_frame(&f, &limits()).unwrap();
    assert_eq!(h.seq, 9);
    assert!(v.same(&back), "{back:?}");
}

#[test]
fn wire_1_oversize_declarations_refused_before_allocation() {
    let mut f = encode_frame(FrameKind::Message, 0, &sample(), &limits()).unwrap();
    f[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = decode_frame(&f, &limits()).unwrap_err();
    assert!(e.to_string().contains("PARALLEL_MAX_FRAME"), "{e}");
    let mut f = encode_frame(FrameKind::Message, 0, &sample(), &limits()).unwrap();
    f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(
        decode_frame(&f, &limits())
            .unwrap_err()
            .to_string()
            .contains("PARALLEL_MAX_DESCRIPTOR")
    );
}

#[test]
fn wire_bad_magic_and_version_are_named() {
    let mut f = encode_frame(FrameKind::Message, 0, &Value::None, &limits()).unwrap();
    f[4] = 9;
    assert!(
        decode_frame(&f, &limits())
            .unwrap_err()
            .to_string()
            .contains("wire version 9")
    );
    f[0] = b'G';
    assert!(
        decode_frame(&f, &limits())
            .unwrap_err()
            .to_string()
            .contains("bad magic")
    );
}

#[test]
fn wire_3_depth_limit_both_ways() {
    let mut v = Value::None;
    for _ in 0..20 {
        v = Value::List(vec![v]);
    }
    assert_eq!(
        encode(&v, &limits()).unwrap_err().kind(),
        ErrorKind::Unsupported
    );
    let deep = Limits {
        max_depth: 100,
        ..limits()
    };
    let f = encode_frame(FrameKind::Message, 0, &v, &deep).unwrap();
    assert!(
        decode_frame(&f, &limits())
            .unwrap_err()
            .to_string()
            .contains("PARALLEL_MAX_VALUE_DEPTH")
    );
    assert!(decode_frame(&f, &deep).is_ok());
}

#[test]
fn wire_3_value_100000_deep_encodes_decodes_and_drops_on_a_small_stack() {
    // Nothing on the way recurses on the depth (WIRE-3, VALUE-3): a 128 KiB stack suffices.
    std::thread::Builder::new()
        .stack_size(128 << 10)
        .spawn(|| {
            let deep = Limits {
                max_depth: 200_000,
                max_descriptor: 1 << 30,
                ..limits()
            };
            let mut v = Value::Int(7);
            for i in 0..100_000 {
                v = if i % 2 == 0 {
                    Value::List(vec![v])
                } else {
                    Value::Dict(vec![(Key::Int(i), v)])
                };
            }
            let f = encode_frame(FrameKind::Message, 0, &v, &deep).unwrap();
            let (_, back) = decode_frame(&f, &deep).unwrap();
            assert!(v.same(&back));
            let shallow = Limits {
                max_descriptor: 1 << 30,
                ..limits()
            };
            let e = decode_frame(&f, &shallow).unwrap_err();
            assert!(e.to_string().contains("PARALLEL_MAX_VALUE_DEPTH"), "{e}");
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn wire_4_inconsistent_tensor_sizes_refused() {
    let d = Descriptor {
        nodes: vec![Node::Tensor(TensorNode {
            dtype: DType::F64 as u8,
            device: 0,
            device_index: 0,
            shape: vec![1 << 40, 1 << 30],
            seg: 0,
        })],
        segments: vec![8],
    };
    let desc = rkyv::to_bytes::<RkyvError>(&d).unwrap();
    let h = Header {
        kind: FrameKind::Message,
        flags: 0,
        desc_len: desc.len() as u32,
        nseg: 1,
        payload_len: 8,
        seq: 0,
    };
    let a = access_descriptor(&desc).unwrap();
    assert!(check_descriptor(a, &h, &limits()).is_err());
}

/// A value of one of a few shapes, its contents drawn from `n` (floats among them the ones whose
/// bits `==` does not tell apart: 0.0 and -0.0, NaNs).
fn shaped(shape: usize, n: u64) -> Value {
    let floats = [
        0.0,
        -0.0,
        f64::NAN,
        -f64::NAN,
        f64::INFINITY,
        1.5,
        f64::MIN_POSITIVE,
    ];
    let f = floats[(n % floats.len() as u64) as usize];
    match shape % 6 {
        0 => Value::bytes(n.to_le_bytes().to_vec()),
        1 => Value::Int(n as i64 * -7),
        2 => Value::Float(f),
        3 => Value::Dict(vec![
            (Key::Str("x".into()), Value::Float(f)),
            (Key::Int(n as i64 % 3), Value::bytes(vec![n as u8; 100])),
        ]),
        4 => Value::List(vec![
            Value::Tensor(Tensor::from_bytes(DType::F32, vec![2], vec![n as u8; 8]).unwrap()),
            Value::Str(format!("s{}", n % 2)),
        ]),
        _ => Value::Tuple(vec![Value::None, Value::Bool(n % 2 == 0), Value::Float(-f)]),
    }
}

/// The descriptor bytes a thread with nothing remembered makes for `v` (handed over as a frame:
/// a value does not cross threads).
fn fresh_desc(v: &Value) -> Vec<u8> {
    let f = encode_frame(FrameKind::Message, 0, v, &limits()).unwrap();
    std::thread::spawn(move || {
        let (_, v) = decode_frame(&f, &limits()).unwrap();
        encode(&v, &limits()).unwrap().desc.to_vec()
    })
    .join()
    .unwrap()
}

/// The encoder's memo: messages of recent shapes with new contents (more shapes than it holds,
/// in turns and in runs) encode to exactly the bytes a fresh encoder makes, and decode to the
/// value sent, floats to the bit.
#[test]
fn wire_memo_reuses_an_archive_only_for_the_same_descriptor_floats_by_bits() {
    for n in 0..400u64 {
        let shape = if n < 200 {
            n as usize
        } else {
            (n / 7) as usize
        };
        let v = shaped(shape, n);
        let e = encode(&v, &limits()).unwrap();
        if n % 13 == 0 {
            assert_eq!(e.desc.to_vec(), fresh_desc(&v), "message {n}: {v:?}");
        }
        let f = encode_frame(FrameKind::Message, n, &v, &limits()).unwrap();
        let (_, back) = decode_frame(&f, &limits()).unwrap();
        assert!(v.same(&back), "message {n}: sent {v:?}, decoded {back:?}");
    }
    // The two zeros, one after the other: equal as numbers, never as archives.
    for (a, b) in [(0.0, -0.0), (-0.0, 0.0), (f64::NAN, -f64::NAN)] {
        let _ = encode(&Value::Float(a), &limits()).unwrap();
        let f = encode_frame(FrameKind::Message, 0, &Value::Float(b), &limits()).unwrap();
        let (_, back) = decode_frame(&f, &limits()).unwrap();
        assert!(
            Value::Float(b).same(&back),
            "{a} then {b}: decoded {back:?}"
        );
    }
}

/// A remembered archive is still held to the limits of the encode that recalls it.
#[test]
fn wire_memo_still_applies_the_descriptor_limit() {
    let v = shaped(3, 1);
    let n = encode(&v, &limits()).unwrap().desc.len();
    let tight = Limits {
        max_descriptor: n as u64 - 1,
        ..limits()
    };
    let e = encode(&v, &tight).unwrap_err();
    assert!(e.to_string().contains("PARALLEL_MAX_DESCRIPTOR"), "{e}");
    assert_eq!(encode(&v, &limits()).unwrap().desc.len(), n);
}

proptest! {
    #[test]
    fn wire_2_decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_frame(&bytes, &limits());
    }

    #[test]
    fn wire_2_decoder_never_panics_on_mutated_frames(idx in 0usize..4096, val in any::<u8>(), cut in 0usize..4096) {
        let mut f = encode_frame(FrameKind::Message, 1, &sample(), &limits()).unwrap();
        let i = idx % f.len();
        f[i] = val;
        f.truncate(cut.max(1).min(f.len()));
        let _ = decode_frame(&f, &limits());
    }

    #[test]
    fn wire_roundtrip_random_scalars(ints in proptest::collection::vec(any::<i64>(), 0..20), s in ".{0,40}", fl in any::<f64>()) {
        let v = Value::Tuple(vec![Value::List(ints.into_iter().map(Value::Int).collect()), Value::Str(s), Value::Float(fl)]);
        let f = encode_frame(FrameKind::Message, 0, &v, &limits()).unwrap();
        let (_, back) = decode_frame(&f, &limits()).unwrap();
        prop_assert!(v.same(&back));
    }
}

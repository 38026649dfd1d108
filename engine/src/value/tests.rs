//! The value model's tests: strided gather and scatter (VALUE-1), byte lengths (VALUE-2),
//! checked constructors (VALUE-3), deep values (VALUE-4).

use super::*;
use crate::error::ErrorKind;
use std::any::Any;
use std::sync::Arc;

#[test]
fn value_1_strided_gather_and_scatter() {
    // 2x3 int32 matrix, viewed transposed (3x2, strides [1, 3]).
    let data: Vec<u8> = (0i32..6).flat_map(|v| v.to_le_bytes()).collect();
    let base = Tensor::from_bytes(DType::I32, vec![2, 3], data).unwrap();
    let ptr = base.data_ptr() as *mut u8;
    let keep: Arc<dyn Any + Send + Sync> = Arc::new(());
    // SAFETY: the view covers the 6 elements of `base`, alive for the test.
    let t = unsafe {
        Tensor::from_raw(
            DType::I32,
            vec![3, 2],
            Some(vec![1, 3]),
            Device::Cpu,
            ptr,
            24,
            keep.clone(),
        )
    };
    assert!(!t.is_contiguous());
    let g = t.contiguous_bytes().unwrap();
    let vals: Vec<i32> = g
        .chunks(4)
        .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(vals, vec![0, 3, 1, 4, 2, 5]);
    let mut dst_store = vec![0u8; 24];
    // SAFETY: as above, over dst_store.
    let mut dst = unsafe {
        Tensor::from_raw(
            DType::I32,
            vec![3, 2],
            Some(vec![1, 3]),
            Device::Cpu,
            dst_store.as_mut_ptr(),
            24,
            keep,
        )
    };
    dst.scatter_from(&g).unwrap();
    assert_eq!(dst_store, base.bytes().unwrap());
}

#[test]
fn value_4_deep_values_drop_and_compare_without_recursion() {
    // On a 64 KiB stack, recursion over 200000 levels would overflow at once.
    std::thread::Builder::new()
        .stack_size(64 << 10)
        .spawn(|| {
            let deep = |leaf: i64| {
                let mut v = Value::Int(leaf);
                for i in 0..200_000 {
                    v = match i % 3 {
                        0 => Value::List(vec![v]),
                        1 => Value::Tuple(vec![Value::None, v]),
                        _ => Value::Dict(vec![(Key::Int(i), v)]),
                    };
                }
                v
            };
            let (a, b, c) = (deep(1), deep(1), deep(2));
            assert!(a.same(&b));
            assert!(!a.same(&c));
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn value_3_checked_constructors_refuse_a_buffer_of_the_wrong_size() {
    // One byte short, one byte over, and an empty buffer for a non-empty shape: all refused,
    // so no safe tensor can claim more elements than its memory holds.
    for (shape, len) in [
        (vec![2, 2], 15),
        (vec![2, 2], 17),
        (vec![3], 0),
        (vec![], 3),
    ] {
        let e = Tensor::from_bytes(DType::F32, shape.clone(), vec![0u8; len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{shape:?} {len}: {e}");
        assert!(e.to_string().contains("numel * itemsize"), "{e}");
        let e = Tensor::from_slice(DType::F32, shape.clone(), &vec![0u8; len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
        let e = Tensor::new(DType::F32, shape, Buf::from_vec(vec![0u8; len])).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{e}");
    }
    // A shape whose byte length overflows is refused, not wrapped to a small length.
    let e = Tensor::from_bytes(DType::F64, vec![usize::MAX, 2], vec![0u8; 0]).unwrap_err();
    assert!(e.to_string().contains("overflows"), "{e}");
    // The exact size is accepted, and the accessors report what was given.
    let t = Tensor::from_slice(DType::I16, vec![3, 1], &[1, 0, 2, 0, 3, 0]).unwrap();
    assert_eq!(
        (t.dtype(), t.shape(), t.device()),
        (DType::I16, &[3, 1][..], Device::Cpu)
    );
    assert!(t.strides().is_none() && matches!(t.storage(), Storage::Owned(_)));
    assert_eq!(t.bytes().unwrap(), &[1, 0, 2, 0, 3, 0]);
    let empty = Tensor::from_bytes(DType::C128, vec![4, 0], Vec::new()).unwrap();
    assert_eq!((empty.nbytes(), empty.bytes().unwrap().len()), (0, 0));
}

#[test]
fn value_3_scatter_refuses_a_source_of_the_wrong_length() {
    let mut t = Tensor::from_bytes(DType::I32, vec![2, 2], vec![0u8; 16]).unwrap();
    for len in [0, 15, 17, 64] {
        let e = t.scatter_from(&vec![9u8; len]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Mismatch, "{len}: {e}");
    }
    assert_eq!(
        t.bytes().unwrap(),
        &[0u8; 16],
        "a refused scatter writes nothing"
    );
    t.scatter_from(&[7u8; 16]).unwrap();
    assert_eq!(t.bytes().unwrap(), &[7u8; 16]);
}

#[test]
fn value_2_byte_len_overflow_is_an_error() {
    assert!(byte_len(DType::F64, &[usize::MAX, 2]).is_err());
    assert_eq!(byte_len(DType::BF16, &[3, 0]).unwrap(), 0);
    assert_eq!(byte_len(DType::C128, &[]).unwrap(), 16);
}

//! Reduction operators and their kernels, for every dtype.
//!
//! Kernels are plain loops over slices of native numbers, written so that LLVM vectorises them
//! (sum/prod/min/max/bitwise on ints and floats); f16 and bf16 are widened to f32 in blocks,
//! reduced, and narrowed back (the `half` crate's slice conversions use F16C where present).
//!
//! Invariants:
//! - OPS-1: `reduce_into(dst, src)` computes `dst[i] = dst[i] op src[i]` elementwise; the
//!   collectives always apply contributions in the same order (own, then children by rank), so
//!   every rank gets bitwise the same result.
//! - OPS-2: `identity` fills a buffer with the op's neutral element (0 for sum, 1 for prod, the
//!   largest value for min...), which is what a rank that has finished contributes (uneven endings).
//! - OPS-3: min/max propagate NaN: if either side is NaN the result is NaN.
//! - OPS-4: `reduce_into` checks, in every build (not only debug), that `dst` and `src` have the
//!   same length, a whole number of elements, and that the op applies to the dtype; otherwise it
//!   returns an error and touches nothing. The kernels' unsafe loads and stores rely on it.

use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result};
use std::sync::Arc;

/// A user reduce function: `f(dst, src, dtype, elements)` must leave `dst = dst op src`.
pub type UserReduce = Arc<dyn Fn(&mut [u8], &[u8], DType, usize) -> Result<()> + Send + Sync>;

/// A reduction operator.
#[derive(Clone)]
pub enum Op {
    Sum,
    Prod,
    Min,
    Max,
    /// Sum, then divided by the number of contributing ranks.
    Avg,
    Band,
    Bor,
    Bxor,
    /// A user function applied chunk by chunk; its identity is zero bytes.
    User(UserReduce),
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The name of [`Op::User`] in control frames (never a built-in op's name).
pub const USER_NAME: &str = "user";

impl Op {
    pub fn parse(s: &str) -> Result<Op> {
        Ok(match s {
            "sum" => Op::Sum,
            "prod" => Op::Prod,
            "min" => Op::Min,
            "max" => Op::Max,
            "avg" | "mean" => Op::Avg,
            "band" => Op::Band,
            "bor" => Op::Bor,
            "bxor" => Op::Bxor,
            _ => {
                return Err(Error::new(
                    ErrorKind::Config,
                    "all_reduce",
                    format!(
                        "unknown op {s:?}: use sum, prod, min, max, avg, band, bor, bxor, or a function"
                    ),
                ));
            }
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Sum => "sum",
            Op::Prod => "prod",
            Op::Min => "min",
            Op::Max => "max",
            Op::Avg => "avg",
            Op::Band => "band",
            Op::Bor => "bor",
            Op::Bxor => "bxor",
            Op::User(_) => USER_NAME,
        }
    }

    /// Checks that the op applies to the dtype.
    pub fn check(&self, dtype: DType) -> Result<()> {
        let float = matches!(
            dtype,
            DType::F16 | DType::BF16 | DType::F32 | DType::F64 | DType::C64 | DType::C128
        );
        let complex = matches!(dtype, DType::C64 | DType::C128);
        if matches!(self, Op::Avg) && !float {
            // As torch: an integer mean would be truncated silently.
            return Err(Error::new(
                ErrorKind::Unsupported,
                "all_reduce",
                format!(
                    "avg is only supported for floating-point and complex dtypes, got {}: cast to a floating-point dtype first (e.g. t.float()), or use op='sum' and divide",
                    dtype.name()
                ),
            ));
        }
        let bad = match self {
            Op::Band | Op::Bor | Op::Bxor => float,
            Op::Min | Op::Max => complex,
            Op::Prod => complex,
            _ => false,
        };
        if bad {
            return Err(Error::new(
                ErrorKind::Unsupported,
                "all_reduce",
                format!(
                    "op {} is not defined for {} tensors",
                    self.name(),
                    dtype.name()
                ),
            ));
        }
        Ok(())
    }
}

macro_rules! kernel {
    ($dst:expr, $src:expr, $t:ty, |$a:ident, $b:ident| $e:expr) => {{
        let n = $dst.len() / std::mem::size_of::<$t>();
        // SAFETY: both slices hold n elements of $t (the caller passes whole elements); the
        // pointers come from byte slices, so we use unaligned loads/stores through chunks.
        let d = $dst.as_mut_ptr() as *mut $t;
        let s = $src.as_ptr() as *const $t;
        if (d as usize) % std::mem::align_of::<$t>() == 0 && (s as usize) % std::mem::align_of::<$t>() == 0 {
            // SAFETY: aligned, in bounds, non-overlapping (distinct buffers).
            let (d, s) = unsafe { (std::slice::from_raw_parts_mut(d, n), std::slice::from_raw_parts(s, n)) };
            for (x, y) in d.iter_mut().zip(s) {
                let ($a, $b) = (*x, *y);
                *x = $e;
            }
        } else {
            for i in 0..n {
                // SAFETY: i < n, unaligned access is explicit.
                unsafe {
                    let ($a, $b) = (d.add(i).read_unaligned(), s.add(i).read_unaligned());
                    d.add(i).write_unaligned($e);
                }
            }
        }
    }};
}

macro_rules! int_ops {
    ($op:expr, $dst:expr, $src:expr, $t:ty) => {
        match $op {
            Op::Sum | Op::Avg => kernel!($dst, $src, $t, |a, b| a.wrapping_add(b)),
            Op::Prod => kernel!($dst, $src, $t, |a, b| a.wrapping_mul(b)),
            Op::Min => kernel!($dst, $src, $t, |a, b| if b < a { b } else { a }),
            Op::Max => kernel!($dst, $src, $t, |a, b| if b > a { b } else { a }),
            Op::Band => kernel!($dst, $src, $t, |a, b| a & b),
            Op::Bor => kernel!($dst, $src, $t, |a, b| a | b),
            Op::Bxor => kernel!($dst, $src, $t, |a, b| a ^ b),
            Op::User(_) => unreachable!("handled by the caller"),
        }
    };
}

macro_rules! float_ops {
    ($op:expr, $dst:expr, $src:expr, $t:ty) => {
        match $op {
            Op::Sum | Op::Avg => kernel!($dst, $src, $t, |a, b| a + b),
            Op::Prod => kernel!($dst, $src, $t, |a, b| a * b),
            Op::Min => kernel!($dst, $src, $t, |a, b| if a.is_nan() || b.is_nan() {
                <$t>::NAN
            } else if b < a {
                b
            } else {
                a
            }),
            Op::Max => kernel!($dst, $src, $t, |a, b| if a.is_nan() || b.is_nan() {
                <$t>::NAN
            } else if b > a {
                b
            } else {
                a
            }),
            _ => unreachable!("checked by Op::check"),
        }
    };
}

/// Widened block reduction for 16-bit floats.
fn reduce_half<T: Copy>(
    op: &Op,
    dst: &mut [u8],
    src: &[u8],
    to32: fn(&[T], &mut [f32]),
    from32: fn(&[f32], &mut [T]),
) {
    const B: usize = 1024;
    let n = dst.len() / 2;
    let (mut a, mut b) = ([0f32; B], [0f32; B]);
    let mut tmp: Vec<T> = Vec::with_capacity(B);
    // The byte slices may be unaligned for T (found by Miri): copy into aligned vectors first.
    let (mut ds, mut ss): (Vec<T>, Vec<T>) = (Vec::with_capacity(B), Vec::with_capacity(B));
    let mut i = 0;
    while i < n {
        let m = (n - i).min(B);
        // SAFETY: T is a 16-bit plain-old-data float (every bit pattern valid); m 16-bit values at
        // element offset i are in bounds of dst and src (OPS-4: same length), and each vector has
        // capacity B >= m, so the copies fill exactly the m elements set_len exposes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                dst.as_ptr().add(i * 2),
                ds.as_mut_ptr() as *mut u8,
                m * 2,
            );
            ds.set_len(m);
            std::ptr::copy_nonoverlapping(
                src.as_ptr().add(i * 2),
                ss.as_mut_ptr() as *mut u8,
                m * 2,
            );
            ss.set_len(m);
        }
        to32(&ds, &mut a[..m]);
        to32(&ss, &mut b[..m]);
        let (ab, bb) = (bytes_of_mut(&mut a[..m]), bytes_of(&b[..m]));
        float_ops!(op, ab, bb, f32);
        // Initialised values (overwritten by from32), so no reference to uninitialised memory.
        tmp.clear();
        tmp.extend_from_slice(&ds);
        from32(&a[..m], &mut tmp);
        // SAFETY: writing m 16-bit values back at element offset i (in bounds).
        unsafe {
            std::ptr::copy_nonoverlapping(
                tmp.as_ptr() as *const u8,
                dst.as_mut_ptr().add(i * 2),
                m * 2,
            )
        };
        i += m;
    }
}

fn bytes_of(x: &[f32]) -> &[u8] {
    // SAFETY: f32 slices are plain data; the byte view covers exactly the same memory.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

fn bytes_of_mut(x: &mut [f32]) -> &mut [u8] {
    // SAFETY: as in bytes_of, exclusively borrowed.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u8, std::mem::size_of_val(x)) }
}

/// `dst = dst op src`, elementwise (OPS-1). Both slices must hold the same number of whole
/// elements of `dtype`: anything else is an error, in release builds too (OPS-4).
pub fn reduce_into(op: &Op, dtype: DType, dst: &mut [u8], src: &[u8]) -> Result<()> {
    let item = dtype.itemsize();
    if dst.len() != src.len() || dst.len() % item != 0 {
        return Err(Error::new(
            ErrorKind::Mismatch,
            "reduce",
            format!(
                "reduce {} of {} bytes into {} bytes of {} ({item}-byte elements): both sides must \
                 hold the same whole number of elements (this is a bug in the caller: please report it)",
                op.name(),
                src.len(),
                dst.len(),
                dtype.name()
            ),
        ));
    }
    op.check(dtype)?;
    if let Op::User(f) = op {
        // Nothing to combine: a user function never sees an empty chunk (nor the placeholder
        // dtype of a value without tensors).
        if dst.is_empty() {
            return Ok(());
        }
        if (src.as_ptr() as usize) % item != 0 {
            // A streamed receive may hand bytes at any address (a shared-memory ring's own);
            // a user function sees a tensor, and tensors are aligned to their elements.
            let mut al = vec![0u128; src.len().div_ceil(16)];
            // SAFETY: `al` holds at least src.len() bytes; distinct allocations.
            let a =
                unsafe { std::slice::from_raw_parts_mut(al.as_mut_ptr() as *mut u8, src.len()) };
            a.copy_from_slice(src);
            return f(dst, a, dtype, dst.len() / item);
        }
        return f(dst, src, dtype, dst.len() / item);
    }
    match dtype {
        DType::Bool => match op {
            Op::Sum | Op::Avg | Op::Max | Op::Bor => kernel!(dst, src, u8, |a, b| a | b),
            Op::Prod | Op::Min | Op::Band => kernel!(dst, src, u8, |a, b| a & b),
            Op::Bxor => kernel!(dst, src, u8, |a, b| a ^ b),
            Op::User(_) => unreachable!(),
        },
        DType::U8 => int_ops!(op, dst, src, u8),
        DType::I8 => int_ops!(op, dst, src, i8),
        DType::I16 => int_ops!(op, dst, src, i16),
        DType::I32 => int_ops!(op, dst, src, i32),
        DType::I64 => int_ops!(op, dst, src, i64),
        DType::U16 => int_ops!(op, dst, src, u16),
        DType::U32 => int_ops!(op, dst, src, u32),
        DType::U64 => int_ops!(op, dst, src, u64),
        DType::F32 => float_ops!(op, dst, src, f32),
        DType::F64 => float_ops!(op, dst, src, f64),
        DType::C64 => match op {
            Op::Sum | Op::Avg => kernel!(dst, src, f32, |a, b| a + b),
            _ => unreachable!("checked by Op::check"),
        },
        DType::C128 => match op {
            Op::Sum | Op::Avg => kernel!(dst, src, f64, |a, b| a + b),
            _ => unreachable!("checked by Op::check"),
        },
        DType::F16 => reduce_half::<half::f16>(
            op,
            dst,
            src,
            half::slice::HalfFloatSliceExt::convert_to_f32_slice,
            |s, d| half::slice::HalfFloatSliceExt::convert_from_f32_slice(d, s),
        ),
        DType::BF16 => reduce_half::<half::bf16>(
            op,
            dst,
            src,
            half::slice::HalfFloatSliceExt::convert_to_f32_slice,
            |s, d| half::slice::HalfFloatSliceExt::convert_from_f32_slice(d, s),
        ),
    }
    Ok(())
}

/// Fills `buf` with the op's neutral element (OPS-2).
pub fn identity(op: &Op, dtype: DType, buf: &mut [u8]) {
    macro_rules! fill {
        ($t:ty, $v:expr) => {{
            let v: $t = $v;
            for c in buf.chunks_exact_mut(std::mem::size_of::<$t>()) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }};
    }
    macro_rules! by_dtype {
        ($lo:ident, $hi:ident, $one:expr, $zero:expr) => {
            match dtype {
                DType::Bool => fill!(u8, $one as u8),
                DType::U8 => fill!(u8, <u8>::$lo),
                DType::I8 => fill!(i8, <i8>::$lo),
                DType::I16 => fill!(i16, <i16>::$lo),
                DType::I32 => fill!(i32, <i32>::$lo),
                DType::I64 => fill!(i64, <i64>::$lo),
                DType::U16 => fill!(u16, <u16>::$lo),
                DType::U32 => fill!(u32, <u32>::$lo),
                DType::U64 => fill!(u64, <u64>::$lo),
                DType::F32 | DType::C64 => fill!(f32, <f32>::$hi),
                DType::F64 | DType::C128 => fill!(f64, <f64>::$hi),
                DType::F16 => fill!(u16, half::f16::$hi.to_bits()),
                DType::BF16 => fill!(u16, half::bf16::$hi.to_bits()),
            }
        };
    }
    match op {
        Op::Sum | Op::Avg | Op::Bor | Op::Bxor | Op::User(_) => buf.fill(0),
        Op::Min => by_dtype!(MAX, INFINITY, 1, 0),
        Op::Max => by_dtype!(MIN, NEG_INFINITY, 0, 0),
        Op::Band => buf.fill(0xff),
        Op::Prod => match dtype {
            DType::Bool | DType::U8 | DType::I8 => fill!(u8, 1),
            DType::I16 | DType::U16 => fill!(u16, 1),
            DType::I32 | DType::U32 => fill!(u32, 1),
            DType::I64 | DType::U64 => fill!(u64, 1),
            DType::F32 => fill!(f32, 1.0),
            DType::F64 => fill!(f64, 1.0),
            DType::F16 => fill!(u16, half::f16::ONE.to_bits()),
            DType::BF16 => fill!(u16, half::bf16::ONE.to_bits()),
            DType::C64 | DType::C128 => buf.fill(0),
        },
    }
}

/// Divides every element by `n` (for avg); integers divide with truncation.
pub fn divide(dtype: DType, buf: &mut [u8], n: usize) {
    if n <= 1 {
        return;
    }
    macro_rules! div {
        ($t:ty, $conv:expr) => {{
            let d: $t = $conv;
            for c in buf.chunks_exact_mut(std::mem::size_of::<$t>()) {
                let v = <$t>::from_le_bytes(c.try_into().expect("element"));
                c.copy_from_slice(&(v / d).to_le_bytes());
            }
        }};
    }
    match dtype {
        DType::Bool => {}
        DType::U8 => div!(u8, n as u8),
        DType::I8 => div!(i8, n as i8),
        DType::I16 => div!(i16, n as i16),
        DType::I32 => div!(i32, n as i32),
        DType::I64 => div!(i64, n as i64),
        DType::U16 => div!(u16, n as u16),
        DType::U32 => div!(u32, n as u32),
        DType::U64 => div!(u64, n as u64),
        DType::F32 | DType::C64 => div!(f32, n as f32),
        DType::F64 | DType::C128 => div!(f64, n as f64),
        DType::F16 => {
            for c in buf.chunks_exact_mut(2) {
                let v = half::f16::from_le_bytes([c[0], c[1]]).to_f32() / n as f32;
                c.copy_from_slice(&half::f16::from_f32(v).to_le_bytes());
            }
        }
        DType::BF16 => {
            for c in buf.chunks_exact_mut(2) {
                let v = half::bf16::from_le_bytes([c[0], c[1]]).to_f32() / n as f32;
                c.copy_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f32s(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn ops_1_float_ops() {
        let mut a = f32s(&[1.0, -2.0, 3.0, f32::NAN]);
        reduce_into(&Op::Sum, DType::F32, &mut a, &f32s(&[1.0, 1.0, 1.0, 1.0])).unwrap();
        let v: Vec<f32> = a
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&v[..3], &[2.0, -1.0, 4.0]);
        let mut m = f32s(&[1.0, 5.0, f32::NAN]);
        reduce_into(&Op::Min, DType::F32, &mut m, &f32s(&[2.0, 0.5, 1.0])).unwrap();
        let v: Vec<f32> = m
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&v[..2], &[1.0, 0.5]);
        assert!(v[2].is_nan(), "OPS-3");
    }

    #[test]
    fn ops_half_and_bf16() {
        for dt in [DType::F16, DType::BF16] {
            let enc = |x: f32| -> [u8; 2] {
                if dt == DType::F16 {
                    half::f16::from_f32(x).to_le_bytes()
                } else {
                    half::bf16::from_f32(x).to_le_bytes()
                }
            };
            let mut a: Vec<u8> = (0..3000).flat_map(|i| enc((i % 7) as f32)).collect();
            let b: Vec<u8> = (0..3000).flat_map(|i| enc((i % 5) as f32)).collect();
            reduce_into(&Op::Max, dt, &mut a, &b).unwrap();
            for i in 0..3000 {
                assert_eq!(&a[i * 2..i * 2 + 2], &enc(((i % 7).max(i % 5)) as f32));
            }
        }
    }

    #[test]
    fn ops_2_identity_is_neutral() {
        let src: Vec<u8> = [3i32, -7, 100]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        for op in [
            Op::Sum,
            Op::Prod,
            Op::Min,
            Op::Max,
            Op::Band,
            Op::Bor,
            Op::Bxor,
        ] {
            let mut id = vec![0u8; 12];
            identity(&op, DType::I32, &mut id);
            reduce_into(&op, DType::I32, &mut id, &src).unwrap();
            assert_eq!(id, src, "{op:?}");
        }
        for dt in [DType::F16, DType::BF16, DType::F64] {
            for op in [Op::Min, Op::Max, Op::Prod, Op::Sum] {
                let n = dt.itemsize();
                let mut src = vec![0u8; n * 2];
                identity(&Op::Sum, dt, &mut src);
                let mut id = vec![0u8; n * 2];
                identity(&op, dt, &mut id);
                let mut x = src.clone();
                reduce_into(&op, dt, &mut x, &id).unwrap();
                assert_eq!(x, src, "{op:?} {dt:?}");
            }
        }
    }

    #[test]
    fn ops_4_reduce_into_refuses_mismatched_lengths_in_every_build() {
        // Run with `--release` too: this is an assert in release builds, not a debug_assert.
        for dt in [
            DType::U8,
            DType::F16,
            DType::BF16,
            DType::F32,
            DType::F64,
            DType::C128,
        ] {
            let n = dt.itemsize();
            for op in [Op::Sum, Op::Max] {
                if op.check(dt).is_err() {
                    continue;
                }
                // src shorter, src longer, and a partial element: each an error, dst untouched.
                let partial = if n > 1 { 4 * n - 1 } else { 5 };
                for (d, s) in [(4 * n, 3 * n), (4 * n, 5 * n), (partial, partial)] {
                    let mut dst = vec![0x11u8; d];
                    let e = reduce_into(&op, dt, &mut dst, &vec![0x22u8; s]);
                    if n == 1 && d == s {
                        continue; // every length is whole for 1-byte elements
                    }
                    let e = e.unwrap_err();
                    assert_eq!(e.kind(), ErrorKind::Mismatch, "{op:?} {dt:?} {d}/{s}: {e}");
                    assert!(
                        dst.iter().all(|b| *b == 0x11),
                        "{op:?} {dt:?}: dst was written"
                    );
                }
            }
        }
        // A user function is never called with mismatched lengths either.
        let called: UserReduce = Arc::new(|_, _, _, _| panic!("called with a bad length"));
        let e = reduce_into(&Op::User(called), DType::F32, &mut [0u8; 8], &[0u8; 4]);
        assert_eq!(e.unwrap_err().kind(), ErrorKind::Mismatch);
        // An op that does not apply to the dtype is an error, not a panic.
        let e = reduce_into(&Op::Band, DType::F32, &mut [0u8; 4], &[0u8; 4]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported, "{e}");
    }

    #[test]
    fn ops_check_refuses_meaningless_combinations() {
        assert!(Op::Band.check(DType::F32).is_err());
        assert!(Op::Max.check(DType::C64).is_err());
        assert!(Op::Sum.check(DType::C128).is_ok());
        assert!(Op::parse("median").is_err());
    }
}

//! GPU reduction kernels: CUDA C generated per (op, dtype), compiled at run time by NVRTC, and
//! bitwise equal to the CPU kernels of [`crate::ops`].
//!
//! Every rank of a collective may reduce on the CPU (`ops::reduce_into`) or on its GPU
//! ([`reduce_device`]); the results must not depend on which, so the kernels reproduce the CPU
//! kernels bit for bit rather than computing "the same sum". The CUDA text has two parts: a
//! prelude of element functions (the ops, the f16/bf16 conversions, the NaN rules), which also
//! compiles as host C++ so that a test can check it against `ops` without a GPU, and a kernel of
//! a few lines around it (a grid-stride loop, `dst[i] = op(dst[i], src[i])`).
//!
//! Kernels are named `par_<op>_<dtype>` (`par_sum_f32`, `par_avg_bf16`, `par_bxor_u64`) and
//! `par_div_<dtype>` for the division of avg; the dtype suffixes are `bool u8 i8 i16 i32 i64
//! u16 u32 u64 f16 bf16 f32 f64 c64 c128`.
//!
//! Invariants:
//! - CUOPS-1: for every built-in op and dtype that `Op::check` accepts, the kernel leaves in
//!   `dst` exactly the bytes `ops::reduce_into` leaves, and `par_div_*` exactly the bytes of
//!   `ops::divide`, including NaN bit patterns, signed zeros, subnormals and wrapped integers:
//!   integers wrap (arithmetic in the unsigned type of the same width); Bool is bitwise on the
//!   raw bytes (sum/avg/max/bor `|`, prod/min/band `&`, bxor `^`); min/max answer Rust's
//!   `NAN` when either side is NaN, else `if b < a { b } else { a }` (resp. `>`).
//! - CUOPS-2: f16 and bf16 are widened to f32, reduced in f32 and narrowed back with the `half`
//!   crate's conversions, written out here with bit operations (no cuda_fp16.h, which NVRTC may
//!   lack): round to nearest even, overflow to infinity, subnormals, NaN quieted with its payload
//!   truncated. The hardware F16C path the CPU takes where present gives the same bits.
//! - CUOPS-3: GPUs answer every NaN-producing add/mul/div with the canonical NaN 0x7fffffff; the
//!   CPU keeps operand payloads. The prelude applies the CPU's rules by hand: a NaN operand is
//!   returned quieted (its payload kept); an invalid operation on numbers (inf - inf, 0 * inf)
//!   gives the CPU's default NaN (0xffc00000 on x86-64, 0x7fc00000 elsewhere, chosen when this
//!   crate is compiled). When both operands are NaN with different payloads, Rust leaves the
//!   result's payload open and the CPU kernels differ by build: unoptimized code keeps `dst`'s,
//!   the vectorized loops of optimized builds (what ships) keep `src`'s. The kernels keep
//!   `src`'s, and the host test does not compare that one case. On aarch64 the CPU also prefers
//!   a signalling NaN over a quiet one, which the kernels do not model (again two NaN operands).
//!   The engine compiles without fast-math and each element is one IEEE operation (no
//!   contraction), so results on numbers are the CPU's exactly.
//! - CUOPS-4: complex tensors are reduced as their real scalars: a C64 tensor of `count`
//!   elements is `2 * count` f32 values (sum/avg add, avg divides both parts), so the C64
//!   kernels are the f32 kernels under their own name and the launchers pass `2 * count`.
//! - CUOPS-5: nothing is launched for zero elements, nor for a division by `n <= 1` (the CPU
//!   leaves the buffer untouched then, NaN payloads included) or of Bool. Launches are
//!   asynchronous on the engine's stream of the device; the caller synchronizes.
//!
//! The launchers run on the caller's thread; kernels are compiled once per device and name by
//! the engine's backend (`Gpu::kernel`).

use crate::ops::{self, Op};
use parallel_engine::value::DType;
use parallel_engine::{Error, ErrorKind, Result};
use std::ffi::c_void;

/// The CPU's answer to an invalid f32 operation (CUOPS-3).
const DEFAULT_NAN_F32: &str = if cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
    "0xffc00000u"
} else {
    "0x7fc00000u"
};

/// The CPU's answer to an invalid f64 operation (CUOPS-3).
const DEFAULT_NAN_F64: &str = if cfg!(any(target_arch = "x86_64", target_arch = "x86")) {
    "0xfff8000000000000ull"
} else {
    "0x7ff8000000000000ull"
};

/// Bit casts: CUDA intrinsics on the device, `__builtin_memcpy` in host C++ (the test harness).
const PRELUDE_HEAD: &str = r#"// Parallel's reduction element functions (collectives/src/cuda_ops.rs); also valid host C++.
#ifdef __CUDACC__
#define PAR_FN static __device__ __forceinline__
PAR_FN unsigned par_bits_f32(float x) { return __float_as_uint(x); }
PAR_FN float par_from_bits_f32(unsigned u) { return __uint_as_float(u); }
PAR_FN unsigned long long par_bits_f64(double x) { return (unsigned long long)__double_as_longlong(x); }
PAR_FN double par_from_bits_f64(unsigned long long u) { return __longlong_as_double((long long)u); }
#else
#define PAR_FN static inline
PAR_FN unsigned par_bits_f32(float x) { unsigned u; __builtin_memcpy(&u, &x, 4); return u; }
PAR_FN float par_from_bits_f32(unsigned u) { float x; __builtin_memcpy(&x, &u, 4); return x; }
PAR_FN unsigned long long par_bits_f64(double x) { unsigned long long u; __builtin_memcpy(&u, &x, 8); return u; }
PAR_FN double par_from_bits_f64(unsigned long long u) { double x; __builtin_memcpy(&x, &u, 8); return x; }
#endif
"#;

/// The float helpers, instantiated for f32 and f64 by [`float_helpers`]: `F` the float type,
/// `B` its bits type, `ABS` the non-sign mask, `INF` the infinity bits, `QUIET` the quiet bit,
/// `RUSTNAN` Rust's `NAN`, `DEFNAN` the CPU's default NaN.
const FLOAT_TEMPLATE: &str = r#"PAR_FN int par_isnan_@F@(@T@ x) { return (par_bits_@F@(x) & @ABS@) > @INF@; }
// CUOPS-3: the CPU's NaN rules applied to the GPU's result r of a op b.
PAR_FN @T@ par_nan2_@F@(@T@ a, @T@ b, @T@ r) {
    if (par_isnan_@F@(b)) return par_from_bits_@F@(par_bits_@F@(b) | @QUIET@);
    if (par_isnan_@F@(a)) return par_from_bits_@F@(par_bits_@F@(a) | @QUIET@);
    if (par_isnan_@F@(r)) return par_from_bits_@F@(@DEFNAN@);
    return r;
}
PAR_FN @T@ par_add_@F@(@T@ a, @T@ b) { return par_nan2_@F@(a, b, a + b); }
PAR_FN @T@ par_mul_@F@(@T@ a, @T@ b) { return par_nan2_@F@(a, b, a * b); }
PAR_FN @T@ par_div_@F@(@T@ a, @T@ b) { return par_nan2_@F@(a, b, a / b); }
// CUOPS-1: min/max give Rust's NAN when either side is NaN.
PAR_FN @T@ par_min_@F@(@T@ a, @T@ b) {
    if (par_isnan_@F@(a) || par_isnan_@F@(b)) return par_from_bits_@F@(@RUSTNAN@);
    return b < a ? b : a;
}
PAR_FN @T@ par_max_@F@(@T@ a, @T@ b) {
    if (par_isnan_@F@(a) || par_isnan_@F@(b)) return par_from_bits_@F@(@RUSTNAN@);
    return b > a ? b : a;
}
"#;

/// CUOPS-2: the `half` crate's conversions (`f16_to_f32_fallback`, `f32_to_f16_fallback`,
/// `bf16_to_f32`, `f32_to_bf16`), bit for bit.
const HALF_CONVERSIONS: &str = r#"PAR_FN float par_f16_to_f32(unsigned short h) {
    unsigned sign = ((unsigned)h & 0x8000u) << 16;
    unsigned exp = (unsigned)h & 0x7c00u;
    unsigned man = (unsigned)h & 0x03ffu;
    if (exp == 0x7c00u) {
        // Infinity, or NaN with the quiet bit set and the payload kept.
        return par_from_bits_f32(sign | 0x7f800000u | (man ? (0x00400000u | (man << 13)) : 0u));
    }
    if (exp == 0u) {
        if (man == 0u) return par_from_bits_f32(sign);
        // Subnormal: normalize (man * 2^-24 = m * 2^(-24 - shift), m in [2^10, 2^11)).
        int shift = 0;
        while (!(man & 0x0400u)) { man <<= 1; ++shift; }
        return par_from_bits_f32(sign | ((unsigned)(113 - shift) << 23) | ((man & 0x03ffu) << 13));
    }
    return par_from_bits_f32(sign | (((exp >> 10) + 112u) << 23) | (man << 13));
}
PAR_FN unsigned short par_f32_to_f16(float f) {
    unsigned x = par_bits_f32(f);
    unsigned sign = (x & 0x80000000u) >> 16;
    unsigned exp = x & 0x7f800000u;
    unsigned man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        return (unsigned short)(sign | 0x7c00u | (man ? 0x0200u : 0u) | (man >> 13));
    }
    int e = (int)(exp >> 23) - 127 + 15;
    if (e >= 0x1f) return (unsigned short)(sign | 0x7c00u);
    if (e <= 0) {
        if (14 - e > 24) return (unsigned short)sign;
        man |= 0x00800000u;
        unsigned hm = man >> (14 - e);
        unsigned round = 1u << (13 - e);
        // Round half to even: the round bit, and a sticky bit or the kept lowest bit.
        if ((man & round) && (man & (3u * round - 1u))) hm += 1u;
        return (unsigned short)(sign | hm);
    }
    unsigned r = sign | ((unsigned)e << 10) | (man >> 13);
    // The carry of the rounding may overflow into the exponent (to infinity), as on the CPU.
    if ((man & 0x1000u) && (man & 0x2fffu)) r += 1u;
    return (unsigned short)r;
}
PAR_FN float par_bf16_to_f32(unsigned short h) {
    unsigned u = (unsigned)h;
    if ((u & 0x7fffu) > 0x7f80u) u |= 0x0040u;
    return par_from_bits_f32(u << 16);
}
PAR_FN unsigned short par_f32_to_bf16(float f) {
    unsigned x = par_bits_f32(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((x >> 16) | 0x0040u);
    if ((x & 0x8000u) && (x & 0x17fffu)) return (unsigned short)((x >> 16) + 1u);
    return (unsigned short)(x >> 16);
}
"#;

fn float_helpers(f: &str) -> String {
    let (t, abs, inf, quiet, rust_nan, def_nan) = if f == "f32" {
        let nan = format!("0x{:08x}u", f32::NAN.to_bits());
        (
            "float",
            "0x7fffffffu",
            "0x7f800000u",
            "0x00400000u",
            nan,
            DEFAULT_NAN_F32,
        )
    } else {
        let nan = format!("0x{:016x}ull", f64::NAN.to_bits());
        (
            "double",
            "0x7fffffffffffffffull",
            "0x7ff0000000000000ull",
            "0x0008000000000000ull",
            nan,
            DEFAULT_NAN_F64,
        )
    };
    FLOAT_TEMPLATE
        .replace("@F@", f)
        .replace("@T@", t)
        .replace("@ABS@", abs)
        .replace("@INF@", inf)
        .replace("@QUIET@", quiet)
        .replace("@RUSTNAN@", &rust_nan)
        .replace("@DEFNAN@", def_nan)
}

/// The element functions every kernel shares (valid CUDA C and host C++).
pub(crate) fn prelude() -> String {
    let mut s = String::from(PRELUDE_HEAD);
    s.push_str(&float_helpers("f32"));
    s.push_str(&float_helpers("f64"));
    s.push_str(HALF_CONVERSIONS);
    s
}

/// The kernel-name suffix of a dtype.
pub(crate) fn suffix(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool => "bool",
        DType::U8 => "u8",
        DType::I8 => "i8",
        DType::I16 => "i16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U16 => "u16",
        DType::U32 => "u32",
        DType::U64 => "u64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::C64 => "c64",
        DType::C128 => "c128",
    }
}

/// The C type of one scalar as the kernels see it (complex: one of its two parts, CUOPS-4).
pub(crate) fn scalar_type(dtype: DType) -> &'static str {
    match dtype {
        DType::Bool | DType::U8 => "unsigned char",
        DType::I8 => "signed char",
        DType::I16 => "short",
        DType::U16 | DType::F16 | DType::BF16 => "unsigned short",
        DType::I32 => "int",
        DType::U32 => "unsigned int",
        DType::I64 => "long long",
        DType::U64 => "unsigned long long",
        DType::F32 | DType::C64 => "float",
        DType::F64 | DType::C128 => "double",
    }
}

/// Scalars per element: 2 for complex dtypes (CUOPS-4), else 1.
pub(crate) fn lanes(dtype: DType) -> usize {
    if matches!(dtype, DType::C64 | DType::C128) {
        2
    } else {
        1
    }
}

/// The unsigned type integer arithmetic wraps in (no signed overflow, no int promotion traps).
fn wrap_type(dtype: DType) -> &'static str {
    match dtype {
        DType::I64 | DType::U64 => "unsigned long long",
        _ => "unsigned int",
    }
}

/// The float helpers' suffix a float dtype computes in, and its 16-bit conversions if any.
fn float_kind(dtype: DType) -> Option<(&'static str, Option<(&'static str, &'static str)>)> {
    match dtype {
        DType::F32 | DType::C64 => Some(("f32", None)),
        DType::F64 | DType::C128 => Some(("f64", None)),
        DType::F16 => Some(("f32", Some(("par_f16_to_f32", "par_f32_to_f16")))),
        DType::BF16 => Some(("f32", Some(("par_bf16_to_f32", "par_f32_to_bf16")))),
        _ => None,
    }
}

/// The expression of `a op b` in the element function of `(op, dtype)` (`op` checked).
fn op_expr(op: &Op, dtype: DType) -> Option<String> {
    let t = scalar_type(dtype);
    if dtype == DType::Bool {
        let c = match op {
            Op::Sum | Op::Avg | Op::Max | Op::Bor => '|',
            Op::Prod | Op::Min | Op::Band => '&',
            Op::Bxor => '^',
            Op::User(_) => return None,
        };
        return Some(format!("({t})(a {c} b)"));
    }
    if let Some((f, conv)) = float_kind(dtype) {
        let helper = match op {
            Op::Sum | Op::Avg => "add",
            Op::Prod => "mul",
            Op::Min => "min",
            Op::Max => "max",
            _ => return None,
        };
        return Some(match conv {
            None => format!("par_{helper}_{f}(a, b)"),
            Some((widen, narrow)) => {
                format!("{narrow}(par_{helper}_{f}({widen}(a), {widen}(b)))")
            }
        });
    }
    let u = wrap_type(dtype);
    Some(match op {
        Op::Sum | Op::Avg => format!("({t})(({u})a + ({u})b)"),
        Op::Prod => format!("({t})(({u})a * ({u})b)"),
        Op::Min => "b < a ? b : a".to_string(),
        Op::Max => "b > a ? b : a".to_string(),
        Op::Band => format!("({t})(a & b)"),
        Op::Bor => format!("({t})(a | b)"),
        Op::Bxor => format!("({t})(a ^ b)"),
        Op::User(_) => return None,
    })
}

/// The name of the kernel of `(op, dtype)`, `None` for user ops and pairs `Op::check` refuses.
pub fn kernel_name(op: &Op, dtype: DType) -> Option<String> {
    if matches!(op, Op::User(_)) || op.check(dtype).is_err() {
        return None;
    }
    Some(format!("par_{}_{}", op.name(), suffix(dtype)))
}

/// The element function of `(op, dtype)`: `(function name, text)`, the text without the prelude.
pub(crate) fn element_fn(op: &Op, dtype: DType) -> Option<(String, String)> {
    let kernel = kernel_name(op, dtype)?;
    let expr = op_expr(op, dtype)?;
    let t = scalar_type(dtype);
    let name = format!("{kernel}_el");
    let text = format!("PAR_FN {t} {name}({t} a, {t} b) {{ return {expr}; }}\n");
    Some((name, text))
}

/// The element function of the division by the rank count (`ops::divide`): `(name, text)`.
pub(crate) fn divide_fn(dtype: DType) -> (String, String) {
    let t = scalar_type(dtype);
    let name = format!("par_div_{}_el", suffix(dtype));
    let body = match dtype {
        DType::Bool => "(void)divisor; return v;".to_string(),
        DType::U8 | DType::U16 | DType::U32 | DType::U64 => {
            // Never launched with a divisor that truncates to 0 (CUOPS-5); guarded anyway.
            format!("{t} d = ({t})divisor; return d == 0 ? v : ({t})(v / d);")
        }
        DType::I8 | DType::I16 | DType::I32 | DType::I64 => {
            let u = wrap_type(dtype);
            // MIN / -1 overflows (the CPU panics there): wrap instead of C's undefined behaviour.
            format!(
                "{t} d = ({t})divisor; if (d == 0) return v; \
                 if (d == -1) return ({t})(({u})0 - ({u})v); return ({t})(v / d);"
            )
        }
        _ => {
            let (f, conv) = float_kind(dtype).unwrap_or(("f32", None));
            let ft = if f == "f32" { "float" } else { "double" };
            match conv {
                None => format!("return par_div_{f}(v, ({ft})divisor);"),
                Some((widen, narrow)) => {
                    format!("return {narrow}(par_div_{f}({widen}(v), ({ft})divisor));")
                }
            }
        }
    };
    let text = format!("PAR_FN {t} {name}({t} v, long long divisor) {{ {body} }}\n");
    (name, text)
}

/// The grid-stride loop around an element function.
fn kernel_text(name: &str, dtype: DType, element: &str, el_text: &str, divide: bool) -> String {
    let t = scalar_type(dtype);
    let (params, call) = if divide {
        (
            format!("{t}* dst, unsigned long long n, long long divisor"),
            format!("dst[i] = {element}(dst[i], divisor);"),
        )
    } else {
        (
            format!("{t}* dst, const {t}* src, unsigned long long n"),
            format!("dst[i] = {element}(dst[i], src[i]);"),
        )
    };
    format!(
        "{prelude}{el_text}\
         extern \"C\" __global__ void {name}({params}) {{\n    \
         unsigned long long stride = (unsigned long long)gridDim.x * blockDim.x;\n    \
         for (unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; \
         i < n; i += stride) {{\n        {call}\n    }}\n}}\n",
        prelude = prelude(),
    )
}

/// `(kernel name, CUDA C source)` of `dst[i] = dst[i] op src[i]` over `n` scalars, for every
/// built-in op and dtype that `Op::check` accepts; `None` for user ops and refused pairs.
/// Complex kernels count scalars: `n` is twice the element count (CUOPS-4).
pub fn kernel_source(op: &Op, dtype: DType) -> Option<(String, String)> {
    let name = kernel_name(op, dtype)?;
    let (el, el_text) = element_fn(op, dtype)?;
    let src = kernel_text(&name, dtype, &el, &el_text, false);
    Some((name, src))
}

/// The name of the division kernel of `dtype`.
pub fn divide_name(dtype: DType) -> String {
    format!("par_div_{}", suffix(dtype))
}

/// `(kernel name, CUDA C source)` of `ops::divide` (avg's division by the rank count):
/// `void par_div_<dtype>(T* dst, unsigned long long n, long long divisor)`, `n` counting scalars
/// (CUOPS-4). Integers divide with truncation by the divisor cast to their type as Rust's `as`
/// does, floats divide, f16/bf16 through f32, Bool is left unchanged.
pub fn divide_source(dtype: DType) -> Option<(String, String)> {
    let name = divide_name(dtype);
    let (el, el_text) = divide_fn(dtype);
    let src = kernel_text(&name, dtype, &el, &el_text, true);
    Some((name, src))
}

/// Queues `dst = dst op src` over `count` elements of `dtype` on device `dev` (CUOPS-5: the
/// caller synchronizes the engine's stream). On the simulated device the CPU kernel runs in place.
///
/// # Safety
/// `dst` and `src` are device addresses on `dev` (host addresses on the simulated device) of
/// `count` elements each, distinct buffers, valid and not otherwise accessed until the engine's
/// stream of `dev` is synchronized.
pub unsafe fn reduce_device(
    op: &Op,
    dtype: DType,
    dst: u64,
    src: u64,
    count: usize,
    dev: i32,
) -> Result<()> {
    if matches!(op, Op::User(_)) {
        return Err(Error::new(
            ErrorKind::Unsupported,
            "all_reduce",
            "user reduce functions have no GPU kernel: reduce them on the host",
        ));
    }
    op.check(dtype)?;
    let g = parallel_engine::cuda::require("all_reduce")?;
    if count == 0 {
        return Ok(());
    }
    let bytes = byte_len(dtype, count)?;
    if g.simulated() {
        // SAFETY: on the simulated device, device addresses are host addresses; the caller
        // guarantees `bytes` valid bytes at each, in distinct buffers, accessed by no one else.
        let (d, s) = unsafe {
            (
                std::slice::from_raw_parts_mut(dst as *mut u8, bytes),
                std::slice::from_raw_parts(src as *const u8, bytes),
            )
        };
        return ops::reduce_into(op, dtype, d, s);
    }
    let name = kernel_name(op, dtype).unwrap_or_default();
    let source = || kernel_source(op, dtype).map(|k| k.1).unwrap_or_default();
    let k = g.kernel(dev, &name, &source)?;
    let (mut d, mut s, mut n) = (dst, src, (count * lanes(dtype)) as u64);
    let mut args = [
        (&raw mut d).cast::<c_void>(),
        (&raw mut s).cast::<c_void>(),
        (&raw mut n).cast::<c_void>(),
    ];
    // SAFETY: the arguments match `(T* dst, const T* src, unsigned long long n)`: two 64-bit
    // device addresses and the scalar count; the memory is valid until the caller synchronizes.
    unsafe { g.launch(k, n as usize, &mut args) }
}

/// Queues avg's division of `count` elements of `dtype` at `dst` by `n` ranks (`ops::divide`)
/// on device `dev`; nothing for `n <= 1`, Bool or no elements (CUOPS-5).
///
/// # Safety
/// `dst` is a device address on `dev` (a host address on the simulated device) of `count`
/// elements, valid and not otherwise accessed until the engine's stream of `dev` is synchronized.
pub unsafe fn divide_device(
    dtype: DType,
    dst: u64,
    count: usize,
    n: usize,
    dev: i32,
) -> Result<()> {
    let g = parallel_engine::cuda::require("all_reduce")?;
    if count == 0 || n <= 1 || dtype == DType::Bool {
        return Ok(());
    }
    let divisor = checked_divisor(dtype, n)?;
    let bytes = byte_len(dtype, count)?;
    if g.simulated() {
        // SAFETY: on the simulated device, device addresses are host addresses; the caller
        // guarantees `bytes` valid bytes at `dst`, accessed by no one else meanwhile.
        let d = unsafe { std::slice::from_raw_parts_mut(dst as *mut u8, bytes) };
        ops::divide(dtype, d, n);
        return Ok(());
    }
    let name = divide_name(dtype);
    let source = || divide_source(dtype).map(|k| k.1).unwrap_or_default();
    let k = g.kernel(dev, &name, &source)?;
    let (mut d, mut len, mut div) = (dst, (count * lanes(dtype)) as u64, divisor);
    let mut args = [
        (&raw mut d).cast::<c_void>(),
        (&raw mut len).cast::<c_void>(),
        (&raw mut div).cast::<c_void>(),
    ];
    // SAFETY: the arguments match `(T* dst, unsigned long long n, long long divisor)`; the
    // memory is valid until the caller synchronizes.
    unsafe { g.launch(k, len as usize, &mut args) }
}

fn byte_len(dtype: DType, count: usize) -> Result<usize> {
    count.checked_mul(dtype.itemsize()).ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "all_reduce",
            format!(
                "{count} elements of {} overflow the address space",
                dtype.name()
            ),
        )
    })
}

/// `n` as the kernel's divisor; refuses what the CPU's `ops::divide` would panic on (an integer
/// divisor that truncates to 0 in the dtype, as `n as u8` does for 256 ranks).
fn checked_divisor(dtype: DType, n: usize) -> Result<i64> {
    let zero = match dtype {
        DType::U8 | DType::I8 => n as u8 == 0,
        DType::U16 | DType::I16 => n as u16 == 0,
        DType::U32 | DType::I32 => n as u32 == 0,
        _ => false,
    };
    match i64::try_from(n) {
        Ok(d) if !zero => Ok(d),
        _ => Err(Error::new(
            ErrorKind::Unsupported,
            "all_reduce",
            format!(
                "avg over {n} ranks cannot divide {} tensors (the divisor wraps to 0): use sum and divide in a wider dtype",
                dtype.name()
            ),
        )),
    }
}

#[cfg(test)]
mod tests;

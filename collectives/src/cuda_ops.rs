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
mod tests {
    //! CUOPS-1/2/3 checked without a GPU: the element functions of every kernel, compiled by the
    //! host C++ compiler from the very text the kernels embed, against `ops`; and every kernel
    //! compiled by NVRTC where libnvrtc is found.
    use super::*;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Stdio};

    fn ops() -> Vec<Op> {
        vec![
            Op::Sum,
            Op::Prod,
            Op::Min,
            Op::Max,
            Op::Avg,
            Op::Band,
            Op::Bor,
            Op::Bxor,
        ]
    }

    #[allow(clippy::print_stderr)] // a skipped test says why in the test output
    fn skip(why: &str) {
        eprintln!("SKIPPED: {why}");
    }

    /// xorshift64*: deterministic inputs, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Bytes per scalar (complex: per part).
    fn width(dtype: DType) -> usize {
        dtype.itemsize() / lanes(dtype)
    }

    /// Edge-case scalars (bit patterns) of a dtype.
    fn edges(dtype: DType) -> Vec<u64> {
        match dtype {
            DType::Bool => vec![0, 1, 2, 0xff],
            DType::F16 => vec![
                0x0000, 0x8000, 0x3c00, 0xbc00, 0x3c01, 0x1000, 0x0001, 0x8001, 0x0002, 0x0003,
                0x03ff, 0x0400, 0x0200, 0x3800, 0x3a00, 0x3e00, 0x4000, 0x4200, 0x5640, 0x6800,
                0x7800, 0x7bff, 0xfbff, 0x7c00, 0xfc00, 0x7e00, 0xfe00, 0x7c01, 0x7d55, 0xfd00,
            ],
            DType::BF16 => vec![
                0x0000, 0x8000, 0x3f80, 0xbf80, 0x3f81, 0x3b80, 0x3c00, 0x0001, 0x8001, 0x007f,
                0x0080, 0x3f00, 0x3f40, 0x3fc0, 0x4040, 0x4300, 0x4380, 0x7f7f, 0xff7f, 0x7f80,
                0xff80, 0x7fc0, 0xffc0, 0x7f81, 0x7fa5, 0xffa5,
            ],
            DType::F32 | DType::C64 => [
                0.0f32,
                -0.0,
                1.0,
                -1.0,
                0.5,
                1.5,
                3.0,
                -2.5,
                1e-30,
                1e30,
                16_777_216.0,
                f32::MAX,
                f32::MIN,
                f32::MIN_POSITIVE,
                f32::INFINITY,
                f32::NEG_INFINITY,
            ]
            .iter()
            .map(|x| x.to_bits() as u64)
            .chain([
                0x0000_0001,
                0x8000_0001,
                0x007f_ffff,
                0x3f80_0001,
                0x7fc0_0000,
                0xffc0_0000,
                0x7f80_0001,
                0xff80_0001,
                0x7fa0_0000,
                0x7fc1_2345,
            ])
            .collect(),
            DType::F64 | DType::C128 => [
                0.0f64,
                -0.0,
                1.0,
                -1.0,
                0.5,
                1.5,
                3.0,
                -2.5,
                1e-300,
                1e300,
                9_007_199_254_740_992.0,
                f64::MAX,
                f64::MIN,
                f64::MIN_POSITIVE,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ]
            .iter()
            .map(|x| x.to_bits())
            .chain([
                0x1,
                0x8000_0000_0000_0001,
                0x000f_ffff_ffff_ffff,
                0x3ff0_0000_0000_0001,
                0x7ff8_0000_0000_0000,
                0xfff8_0000_0000_0000,
                0x7ff0_0000_0000_0001,
                0x7ff4_0000_0000_0000,
                0xfff8_1234_5678_9abc,
            ])
            .collect(),
            _ => {
                let bits = width(dtype) * 8;
                let mask = if bits == 64 {
                    u64::MAX
                } else {
                    (1 << bits) - 1
                };
                let top = 1u64 << (bits - 1);
                [
                    0,
                    1,
                    2,
                    3,
                    7,
                    100,
                    mask,
                    mask - 1,
                    top,
                    top | 1,
                    top - 1,
                    0x5555_5555_5555_5555 & mask,
                    0xaaaa_aaaa_aaaa_aaaa & mask,
                ]
                .to_vec()
            }
        }
    }

    /// A random scalar: any bit pattern, or (floats) one of moderate magnitude, or (integers)
    /// a small positive or negative one, so that sums, products and roundings interact.
    fn random(dtype: DType, rng: &mut Rng) -> u64 {
        let bits = width(dtype) * 8;
        let mask = if bits == 64 {
            u64::MAX
        } else {
            (1 << bits) - 1
        };
        let r = rng.next();
        let exp = match dtype {
            DType::F16 => Some((10, 15)),
            DType::BF16 | DType::F32 | DType::C64 => Some((if bits == 16 { 7 } else { 23 }, 127)),
            DType::F64 | DType::C128 => Some((52, 1023)),
            _ => None,
        };
        match (r % 3, exp) {
            (0, _) => r >> 8 & mask,
            (_, Some((shift, bias))) => {
                let e = bias - 4 + (rng.next() % 9);
                let sign = (rng.next() & 1) << (bits - 1);
                sign | (e << shift) | (rng.next() & ((1 << shift) - 1))
            }
            (_, None) => (rng.next() % 33).wrapping_sub(16) & mask,
        }
    }

    fn push(buf: &mut Vec<u8>, dtype: DType, v: u64) {
        buf.extend_from_slice(&v.to_le_bytes()[..width(dtype)]);
    }

    /// `(dst, src)`: every pair of edge cases, random pairs, and edges against randoms.
    fn reduce_inputs(dtype: DType, rng: &mut Rng) -> (Vec<u8>, Vec<u8>) {
        let e = edges(dtype);
        let mut pairs: Vec<(u64, u64)> = Vec::new();
        for &a in &e {
            for &b in &e {
                pairs.push((a, b));
            }
            for _ in 0..16 {
                let r = random(dtype, rng);
                pairs.push((a, r));
                pairs.push((r, a));
            }
        }
        for _ in 0..4000 {
            pairs.push((random(dtype, rng), random(dtype, rng)));
        }
        if pairs.len() % lanes(dtype) != 0 {
            pairs.push((0, 0));
        }
        let (mut d, mut s) = (Vec::new(), Vec::new());
        for (a, b) in pairs {
            push(&mut d, dtype, a);
            push(&mut s, dtype, b);
        }
        (d, s)
    }

    fn divide_inputs(dtype: DType, rng: &mut Rng) -> Vec<u8> {
        let mut v = edges(dtype);
        v.extend((0..2000).map(|_| random(dtype, rng)));
        if v.len() % lanes(dtype) != 0 {
            v.push(0);
        }
        let mut d = Vec::new();
        for x in v {
            push(&mut d, dtype, x);
        }
        d
    }

    /// Whether `ops::divide` by `n` is defined (it panics where the integer divisor truncates to
    /// 0, and on MIN / -1), so that the CPU can be compared.
    fn cpu_divides(dtype: DType, n: usize) -> bool {
        let d: i128 = match dtype {
            DType::U8 => n as u8 as i128,
            DType::I8 => n as i8 as i128,
            DType::U16 => n as u16 as i128,
            DType::I16 => n as i16 as i128,
            DType::U32 => n as u32 as i128,
            DType::I32 => n as i32 as i128,
            DType::U64 => n as u64 as i128,
            DType::I64 => n as i64 as i128,
            _ => return true,
        };
        d != 0 && d != -1
    }

    const DIVISORS: [usize; 18] = [
        2,
        3,
        5,
        7,
        8,
        10,
        100,
        127,
        128,
        129,
        255,
        1000,
        65535,
        65537,
        1 << 31,
        (1 << 31) + 1,
        (1 << 32) + 3,
        3_000_000_007,
    ];

    /// An element function of the harness.
    struct Fun {
        name: String,
        text: String,
        scalar: &'static str,
        divide: bool,
    }

    fn all_funs() -> Vec<Fun> {
        let mut v = Vec::new();
        for dtype in DType::ALL {
            let scalar = scalar_type(dtype);
            for op in ops() {
                if let Some((name, text)) = element_fn(&op, dtype) {
                    let divide = false;
                    v.push(Fun {
                        name,
                        text,
                        scalar,
                        divide,
                    });
                }
            }
            let (name, text) = divide_fn(dtype);
            let divide = true;
            v.push(Fun {
                name,
                text,
                scalar,
                divide,
            });
        }
        v
    }

    /// One call of an element function over a buffer, with what the CPU kernels make of it.
    struct Case {
        label: String,
        dtype: DType,
        fun: usize,
        divisor: i64,
        dst: Vec<u8>,
        src: Vec<u8>,
        expected: Vec<u8>,
        /// Two NaN operands of an add or mul: the CPU's payload is open (CUOPS-3).
        nan_pair_open: bool,
    }

    fn is_nan_bits(dtype: DType, v: u64) -> bool {
        match dtype {
            DType::F16 => v & 0x7fff > 0x7c00,
            DType::BF16 => v & 0x7fff > 0x7f80,
            DType::F32 | DType::C64 => v & 0x7fff_ffff > 0x7f80_0000,
            DType::F64 | DType::C128 => v & !(1 << 63) > 0x7ff0_0000_0000_0000,
            _ => false,
        }
    }

    fn fun_index(funs: &[Fun], name: &str) -> usize {
        funs.iter()
            .position(|f| f.name == name)
            .expect("element function")
    }

    fn reduce_case(funs: &[Fun], op: &Op, cpu_op: &Op, dtype: DType, rng: &mut Rng) -> Case {
        let (dst, src) = reduce_inputs(dtype, rng);
        let mut expected = dst.clone();
        ops::reduce_into(cpu_op, dtype, &mut expected, &src).expect("cpu reduce");
        let name = element_fn(op, dtype).expect("checked pair").0;
        Case {
            label: format!("{} {:?} (cpu {:?})", name, dtype, cpu_op),
            dtype,
            fun: fun_index(funs, &name),
            divisor: 0,
            dst,
            src,
            expected,
            nan_pair_open: matches!(op, Op::Sum | Op::Avg | Op::Prod),
        }
    }

    fn divide_case(funs: &[Fun], dtype: DType, n: usize, rng: &mut Rng) -> Case {
        let dst = divide_inputs(dtype, rng);
        let mut expected = dst.clone();
        ops::divide(dtype, &mut expected, n);
        let name = divide_fn(dtype).0;
        Case {
            label: format!("{name} by {n}"),
            dtype,
            fun: fun_index(funs, &name),
            divisor: n as i64,
            dst,
            src: Vec::new(),
            expected,
            nan_pair_open: false,
        }
    }

    /// The harness: the prelude and element functions as given, and a loop applying one of
    /// them to each record of stdin (`u32 fun, u64 bytes, i64 divisor, dst[, src]`).
    fn harness_source(prelude: &str, funs: &[Fun]) -> String {
        let mut s = String::from("#include <cstdio>\n#include <cstring>\n#include <vector>\n");
        s.push_str(prelude);
        let mut cases = String::new();
        for (i, f) in funs.iter().enumerate() {
            s.push_str(&f.text);
            let call = if f.divide {
                format!("run_div<{}>({}, d, nb, div)", f.scalar, f.name)
            } else {
                format!("run2<{}>({}, d, s, nb)", f.scalar, f.name)
            };
            cases.push_str(&format!("        case {i}: {call}; break;\n"));
        }
        let flags: Vec<&str> = funs
            .iter()
            .map(|f| if f.divide { "1" } else { "0" })
            .collect();
        s.push_str(&format!(
            "static const bool par_is_div[] = {{{}}};\n",
            flags.join(", ")
        ));
        s.push_str(
            r#"
template <typename T> static void run2(T (*f)(T, T), unsigned char* d, const unsigned char* s, unsigned long long nb) {
    for (unsigned long long i = 0; i + sizeof(T) <= nb; i += sizeof(T)) {
        T a, b;
        std::memcpy(&a, d + i, sizeof a);
        std::memcpy(&b, s + i, sizeof b);
        a = f(a, b);
        std::memcpy(d + i, &a, sizeof a);
    }
}
template <typename T> static void run_div(T (*f)(T, long long), unsigned char* d, unsigned long long nb, long long div) {
    for (unsigned long long i = 0; i + sizeof(T) <= nb; i += sizeof(T)) {
        T a;
        std::memcpy(&a, d + i, sizeof a);
        a = f(a, div);
        std::memcpy(d + i, &a, sizeof a);
    }
}
int main() {
    std::vector<unsigned char> in;
    unsigned char buf[65536];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, stdin)) > 0) in.insert(in.end(), buf, buf + got);
    size_t p = 0;
    while (p + 20 <= in.size()) {
        unsigned id; unsigned long long nb; long long div;
        std::memcpy(&id, &in[p], 4); std::memcpy(&nb, &in[p + 4], 8); std::memcpy(&div, &in[p + 12], 8);
        p += 20;
        unsigned char* d = &in[p];
        p += nb;
        const unsigned char* s = d;
        if (id >= sizeof par_is_div || !par_is_div[id]) {
            s = &in[p];
            p += nb;
        }
        switch (id) {
"#,
        );
        s.push_str(&cases);
        s.push_str(
            r#"        default: return 2;
        }
        std::fwrite(d, 1, nb, stdout);
    }
    return 0;
}
"#,
        );
        s
    }

    /// Compiles and runs the harness; `None` (after saying so) when there is no g++.
    fn run_harness(tag: &str, prelude: &str, funs: &[Fun], cases: &[Case]) -> Option<Vec<u8>> {
        let dir =
            std::env::temp_dir().join(format!("parallel-cuda-ops-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let (cpp, exe, input) = (dir.join("h.cpp"), dir.join("h"), dir.join("in.bin"));
        std::fs::write(&cpp, harness_source(prelude, funs)).expect("write harness");
        let cc = Command::new("g++")
            .args(["-std=c++17", "-O2", "-ffp-contract=off", "-fno-fast-math"])
            .args(["-Wall", "-Wextra", "-Werror", "-o"])
            .arg(&exe)
            .arg(&cpp)
            .output();
        let cc = match cc {
            Ok(o) => o,
            Err(e) => {
                skip(&format!(
                    "g++ cannot be run ({e}): the element functions are untested"
                ));
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
        };
        assert!(
            cc.status.success(),
            "g++ refused the harness {}:\n{}",
            cpp.display(),
            String::from_utf8_lossy(&cc.stderr)
        );
        let mut bytes = Vec::new();
        for c in cases {
            bytes.extend_from_slice(&(c.fun as u32).to_le_bytes());
            bytes.extend_from_slice(&(c.dst.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&c.divisor.to_le_bytes());
            bytes.extend_from_slice(&c.dst);
            bytes.extend_from_slice(&c.src);
        }
        std::fs::write(&input, bytes).expect("write input");
        let out = Command::new(&exe)
            .stdin(std::fs::File::open(&input).expect("input"))
            .stdout(Stdio::piped())
            .output()
            .expect("run harness");
        assert!(out.status.success(), "harness failed: {:?}", out.status);
        let _ = std::fs::remove_dir_all(&dir);
        Some(out.stdout)
    }

    /// The scalars where the harness and the CPU kernels differ, described.
    fn mismatches(cases: &[Case], out: &[u8]) -> Vec<String> {
        let mut bad = Vec::new();
        let mut at = 0;
        for c in cases {
            let got = &out[at.min(out.len())..(at + c.dst.len()).min(out.len())];
            at += c.dst.len();
            if got.len() != c.dst.len() {
                bad.push(format!("{}: short output", c.label));
                continue;
            }
            let w = width(c.dtype);
            let bits = |b: &[u8], i: usize| {
                let mut v = [0u8; 8];
                v[..w].copy_from_slice(&b[i * w..(i + 1) * w]);
                u64::from_le_bytes(v)
            };
            let hex = |b: &[u8], i: usize| format!("{:#0x}", bits(b, i));
            for i in 0..c.dst.len() / w {
                let open = c.nan_pair_open
                    && is_nan_bits(c.dtype, bits(&c.dst, i))
                    && is_nan_bits(c.dtype, bits(&c.src, i));
                if !open && got[i * w..(i + 1) * w] != c.expected[i * w..(i + 1) * w] {
                    let src = if c.src.is_empty() {
                        format!("divisor {}", c.divisor)
                    } else {
                        format!("src {}", hex(&c.src, i))
                    };
                    bad.push(format!(
                        "{} scalar {i}: dst {} {src}: cpu {} kernel {}",
                        c.label,
                        hex(&c.dst, i),
                        hex(&c.expected, i),
                        hex(got, i)
                    ));
                }
            }
        }
        bad
    }

    #[test]
    fn cuops_1_2_3_element_functions_are_bitwise_the_cpu_kernels() {
        let funs = all_funs();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut cases = Vec::new();
        for dtype in DType::ALL {
            for op in ops() {
                if element_fn(&op, dtype).is_some() {
                    cases.push(reduce_case(&funs, &op, &op, dtype, &mut rng));
                }
            }
            for n in DIVISORS.into_iter().filter(|&n| cpu_divides(dtype, n)) {
                cases.push(divide_case(&funs, dtype, n, &mut rng));
            }
        }
        assert_eq!(
            cases.iter().filter(|c| !c.src.is_empty()).count(),
            // 8 ops x 15 dtypes, less: 6 ops on complex (x 2), bitwise on floats (3 x 4), avg on
            // bool and integers (9, refused like torch)
            87,
            "every (op, dtype) pair Op::check accepts"
        );
        let Some(out) = run_harness("all", &prelude(), &funs, &cases) else {
            return;
        };
        let bad = mismatches(&cases, &out);
        let mut per_kernel = std::collections::BTreeMap::<&str, usize>::new();
        for b in &bad {
            *per_kernel
                .entry(b.split(' ').next().unwrap_or(""))
                .or_default() += 1;
        }
        assert!(
            bad.is_empty(),
            "{} scalars differ from ops.rs ({per_kernel:?}), first: {:#?}",
            bad.len(),
            &bad[..bad.len().min(30)]
        );
    }

    #[test]
    fn cuops_element_test_catches_wrong_kernels() {
        let funs = all_funs();
        let mut rng = Rng(7);
        // A wrong op: the min kernel's element function against the CPU's max.
        let wrong_op = [reduce_case(&funs, &Op::Min, &Op::Max, DType::I32, &mut rng)];
        // Round half up instead of to even when narrowing to f16.
        let f16_sum = [reduce_case(&funs, &Op::Sum, &Op::Sum, DType::F16, &mut rng)];
        let ties_up = prelude().replace(
            "if ((man & 0x1000u) && (man & 0x2fffu)) r += 1u;",
            "if (man & 0x1000u) r += 1u;",
        );
        // The GPU's own NaN (no quieting of a signalling NaN operand, no CPU default NaN).
        let f32_prod = [reduce_case(
            &funs,
            &Op::Prod,
            &Op::Prod,
            DType::F32,
            &mut rng,
        )];
        let gpu_nan = prelude().replace(
            "par_nan2_f32(a, b, a * b)",
            "par_isnan_f32(a * b) ? par_from_bits_f32(0x7fffffffu) : a * b",
        );
        assert_ne!(ties_up, prelude(), "the mutation applies");
        assert_ne!(gpu_nan, prelude(), "the mutation applies");
        for (tag, text, cases) in [
            ("wrong-op", prelude(), &wrong_op),
            ("ties-up", ties_up, &f16_sum),
            ("gpu-nan", gpu_nan, &f32_prod),
        ] {
            let Some(out) = run_harness(tag, &text, &funs, cases) else {
                return;
            };
            assert!(!mismatches(cases, &out).is_empty(), "{tag} went unnoticed");
        }
    }

    #[test]
    fn cuops_kernel_names_are_unique_and_cover_every_checked_pair() {
        let mut names = Vec::new();
        for dtype in DType::ALL {
            for op in ops() {
                let k = kernel_source(&op, dtype);
                assert_eq!(k.is_some(), op.check(dtype).is_ok(), "{op:?} {dtype:?}");
                if let Some((name, src)) = k {
                    assert!(src.contains(&format!("void {name}(")), "{name}");
                    names.push(name);
                }
            }
            let (name, src) = divide_source(dtype).expect("every dtype divides");
            assert!(src.contains(&format!("void {name}(")), "{name}");
            names.push(name);
        }
        let user = Op::User(std::sync::Arc::new(|_: &mut [u8], _: &[u8], _, _| Ok(())));
        assert!(kernel_source(&user, DType::F32).is_none());
        assert_eq!(names.len(), 87 + 15); // the pairs above, and one divide kernel per dtype
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), names.len(), "kernel names are unique");
        assert!(names.contains(&"par_sum_f32".to_string()));
    }

    #[test]
    fn cuops_user_ops_and_wrapping_divisors_are_refused() {
        let user = Op::User(std::sync::Arc::new(|_: &mut [u8], _: &[u8], _, _| Ok(())));
        // SAFETY: refused before any address is used.
        let e = unsafe { reduce_device(&user, DType::F32, 0, 0, 4, 0) }.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(checked_divisor(DType::U8, 256).is_err());
        assert!(checked_divisor(DType::I16, 1 << 16).is_err());
        assert_eq!(checked_divisor(DType::I8, 255).ok(), Some(255));
        assert_eq!(checked_divisor(DType::F16, 256).ok(), Some(256));
    }

    /// The libnvrtc files of the NVIDIA wheels in the workspace's virtual environment.
    fn venv_nvrtc() -> Vec<PathBuf> {
        let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
        let mut found = Vec::new();
        let dirs = |p: &Path| -> Vec<PathBuf> {
            std::fs::read_dir(p)
                .map(|r| r.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        for py in dirs(&lib) {
            let is_py = py
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("python3"));
            if !is_py {
                continue;
            }
            for pkg in dirs(&py.join("site-packages/nvidia")) {
                for f in dirs(&pkg.join("lib")) {
                    let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
                    if name.is_some_and(|n| n.starts_with("libnvrtc.so")) {
                        found.push(f);
                    }
                }
            }
        }
        found.sort();
        found
    }

    #[test]
    fn cuops_nvrtc_compiles_every_kernel() {
        use parallel_engine::cuda::nvrtc;
        for p in venv_nvrtc() {
            nvrtc::add_hint(&p.to_string_lossy());
        }
        if let Err(e) = nvrtc::load() {
            skip(&format!("no libnvrtc, kernels not compiled: {e}"));
            return;
        }
        let mut sources = Vec::new();
        for dtype in DType::ALL {
            sources.extend(ops().iter().filter_map(|op| kernel_source(op, dtype)));
            sources.extend(divide_source(dtype));
        }
        assert_eq!(sources.len(), 96 + 15);
        for (name, src) in sources {
            let opts = vec!["--gpu-architecture=compute_90".to_string()];
            let ptx = nvrtc::compile(&src, &name, opts)
                .unwrap_or_else(|e| panic!("NVRTC refused {name}: {e}\n{src}"));
            let ptx = String::from_utf8_lossy(&ptx);
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{name} is not an entry of its PTX"
            );
        }
        // The driver path asks for a CUBIN of the device's own architecture first.
        let (name, src) = kernel_source(&Op::Sum, DType::BF16).expect("a kernel");
        let cubin = nvrtc::compile(&src, &name, vec!["--gpu-architecture=sm_90".into()])
            .unwrap_or_else(|e| panic!("NVRTC refused {name} for sm_90: {e}"));
        assert_eq!(&cubin[..4], b"\x7fELF", "a CUBIN is an ELF image");
        assert!(
            cubin.windows(name.len()).any(|w| w == name.as_bytes()),
            "{name} is not in its CUBIN"
        );
    }
}

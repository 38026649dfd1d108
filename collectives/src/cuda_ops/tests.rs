//! The device kernels against the CPU reductions (on the simulated device here). Over 600 lines:
//! one test file per kernel module keeps the host-compiled element checks next to each other.
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
            0x0000, 0x8000, 0x3c00, 0xbc00, 0x3c01, 0x1000, 0x0001, 0x8001, 0x0002, 0x0003, 0x03ff,
            0x0400, 0x0200, 0x3800, 0x3a00, 0x3e00, 0x4000, 0x4200, 0x5640, 0x6800, 0x7800, 0x7bff,
            0xfbff, 0x7c00, 0xfc00, 0x7e00, 0xfe00, 0x7c01, 0x7d55, 0xfd00,
        ],
        DType::BF16 => vec![
            0x0000, 0x8000, 0x3f80, 0xbf80, 0x3f81, 0x3b80, 0x3c00, 0x0001, 0x8001, 0x007f, 0x0080,
            0x3f00, 0x3f40, 0x3fc0, 0x4040, 0x4300, 0x4380, 0x7f7f, 0xff7f, 0x7f80, 0xff80, 0x7fc0,
            0xffc0, 0x7f81, 0x7fa5, 0xffa5,
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
    let dir = std::env::temp_dir().join(format!("parallel-cuda-ops-{}-{tag}", std::process::id()));
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
        87, // avg is refused on the 9 integer and bool dtypes (as torch does)
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
    assert_eq!(names.len(), 87 + 15);
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
    assert_eq!(sources.len(), 87 + 15);
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

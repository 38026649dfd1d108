//! Every `PARALLEL_*` environment variable, parsed in one place.
//!
//! Invariants:
//! - CONFIG-1: this is the only module that reads the environment (clippy's `disallowed-methods`
//!   guards it); everything else asks [`config()`].
//! - CONFIG-2: [`TABLE`] is the single source of truth: `docs/environment.md` is rendered from it
//!   ([`render_markdown`]) and a test fails when the file drifts.
//! - CONFIG-3: a malformed value is an error naming the variable, its value and the accepted range;
//!   it is never silently replaced by the default.
//!
//! The configuration is read once per process, on first use, and is immutable afterwards.

use crate::error::{Error, ErrorKind, Result};
use std::sync::OnceLock;
use std::time::Duration;

/// The kind of a configuration value, used for parsing and for the documentation table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// Unsigned integer with an inclusive range.
    Int { min: u64, max: u64 },
    /// A size in bytes; accepts suffixes K, M, G, T (powers of 1024).
    Bytes { min: u64, max: u64 },
    /// Seconds as a decimal number.
    Seconds,
    /// 0/1, false/true, no/yes, off/on.
    Bool,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// Free text.
    Text,
}

/// One row of the configuration table.
#[derive(Debug, Clone, Copy)]
pub struct Var {
    pub name: &'static str,
    pub kind: VarKind,
    /// Default as written by a user (empty: unset).
    pub default: &'static str,
    pub doc: &'static str,
}

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;

/// The table of every variable the engine (and the crates above it) reads.
pub const TABLE: &[Var] = &[
    Var {
        name: "PARALLEL_IO",
        kind: VarKind::Choice(&["auto", "uring", "epoll"]),
        default: "auto",
        doc: "I/O backend. `auto` uses io_uring when the kernel and the container allow it (a probe ring is set up once) and falls back to epoll otherwise (ENOSYS, EPERM from seccomp). `uring` fails with a clear error when io_uring is unavailable.",
    },
    Var {
        name: "PARALLEL_THREADS",
        kind: VarKind::Int { min: 0, max: 1024 },
        default: "0",
        doc: "Reactor threads for asynchronous operations and accepting connections. 0: one per usable core, at most 4.",
    },
    Var {
        name: "PARALLEL_CPUS",
        kind: VarKind::Text,
        default: "",
        doc: "Cores the reactor threads are pinned to, as a list like `0-3,6`. Empty: the cores of the process's affinity mask, round-robin. Pinning failures are logged, not fatal.",
    },
    Var {
        name: "PARALLEL_TIMEOUT",
        kind: VarKind::Seconds,
        default: "600",
        doc: "Deadline in seconds for every blocking call that is given no timeout (recv, send, accept, handshake). No call waits forever.",
    },
    Var {
        name: "PARALLEL_CONNECT_TIMEOUT",
        kind: VarKind::Seconds,
        default: "30",
        doc: "Default time a client keeps retrying to connect before it gives up, in seconds.",
    },
    Var {
        name: "PARALLEL_HANDSHAKE_TIMEOUT",
        kind: VarKind::Seconds,
        default: "10",
        doc: "Time a freshly accepted connection has to complete the hello (and authentication) before the server drops it, in seconds.",
    },
    Var {
        name: "PARALLEL_FRAME_TIMEOUT",
        kind: VarKind::Seconds,
        default: "30",
        doc: "Time a message has to arrive completely once its first byte arrived, when a server reads it for `recv_any`, in seconds. A client that sends part of a message and stalls is dropped (with a warning) after this long, and never delays messages from other clients. Raise it for very large messages over slow networks.",
    },
    Var {
        name: "PARALLEL_MAX_FRAME",
        kind: VarKind::Bytes {
            min: KIB,
            max: 1 << 50,
        },
        default: "64G",
        doc: "Largest payload (sum of all tensor and bytes segments) one message may declare. Larger declarations are refused before anything is allocated.",
    },
    Var {
        name: "PARALLEL_MAX_DESCRIPTOR",
        kind: VarKind::Bytes {
            min: KIB,
            max: 4 * GIB,
        },
        default: "64M",
        doc: "Largest descriptor (the value tree: strings, numbers, shapes) of one message.",
    },
    Var {
        name: "PARALLEL_MAX_VALUE_DEPTH",
        kind: VarKind::Int {
            min: 1,
            max: 10_000,
        },
        default: "64",
        doc: "Deepest nesting of lists, tuples and dicts accepted in a message (and produced by a sender).",
    },
    Var {
        name: "PARALLEL_MAX_SEGMENTS",
        kind: VarKind::Int {
            min: 1,
            max: 1 << 24,
        },
        default: "65536",
        doc: "Most payload segments (tensors plus bytes objects) in one message.",
    },
    Var {
        name: "PARALLEL_SHM",
        kind: VarKind::Bool,
        default: "1",
        doc: "Use a shared-memory ring instead of TCP when both ends are on the same host (same kernel boot and network namespace). 0 keeps every link on TCP.",
    },
    Var {
        name: "PARALLEL_SHM_RING",
        kind: VarKind::Bytes {
            min: 64 * KIB,
            max: GIB,
        },
        default: "4M",
        doc: "Bytes of each direction's shared-memory ring, rounded up to a multiple of 4096 (so the ring's control words stay page aligned: 100000 gives 102400 bytes).",
    },
    Var {
        name: "PARALLEL_SHM_CMA",
        kind: VarKind::Bool,
        default: "1",
        doc: "On shared-memory links, copy large segments once, straight from the sender's memory into the receiver's (process_vm_readv), instead of twice through the ring. Probed at connect time; falls back to the ring when the kernel refuses.",
    },
    Var {
        name: "PARALLEL_SHM_CMA_THRESHOLD",
        kind: VarKind::Bytes {
            min: 4 * KIB,
            max: 1 << 40,
        },
        default: "1M",
        doc: "Segments at least this large take the single-copy path on shared-memory links. Below it, two copies through the ring pipelined over both cores are faster (measured: 1 MiB all-reduces 0.25 ms against 0.35 ms with 256K).",
    },
    Var {
        name: "PARALLEL_SPIN_US",
        kind: VarKind::Int {
            min: 0,
            max: 1_000_000,
        },
        default: "50",
        doc: "Microseconds a receiver polls before it parks in the kernel. Lower saves CPU on oversubscribed machines; higher lowers latency.",
    },
    Var {
        name: "PARALLEL_SECRET",
        kind: VarKind::Text,
        default: "",
        doc: "Shared secret. When set (here or through PARALLEL_SECRET_FILE), every connection is authenticated by HMAC-SHA256 challenge-response in both directions; the secret never crosses the wire.",
    },
    Var {
        name: "PARALLEL_SECRET_FILE",
        kind: VarKind::Text,
        default: "",
        doc: "Path of a file whose contents (trailing newline removed) are the shared secret. Takes precedence over PARALLEL_SECRET.",
    },
    Var {
        name: "PARALLEL_POOL_BYTES",
        kind: VarKind::Bytes {
            min: 0,
            max: 1 << 44,
        },
        default: "1G",
        doc: "Most bytes of idle receive buffers the pool keeps for reuse (pre-faulted, huge-page advised, locked where allowed).",
    },
    Var {
        name: "PARALLEL_MLOCK",
        kind: VarKind::Bool,
        default: "1",
        doc: "Try to mlock pooled buffers. Failures (RLIMIT_MEMLOCK) are ignored after one log line.",
    },
    Var {
        name: "PARALLEL_CHUNK",
        kind: VarKind::Bytes {
            min: 4 * KIB,
            max: GIB,
        },
        default: "4M",
        doc: "Largest single socket read or write; bounds the time one operation holds a link.",
    },
    Var {
        name: "PARALLEL_ALGO",
        kind: VarKind::Choice(&["auto", "tree", "ring"]),
        default: "auto",
        doc: "All-reduce algorithm: `tree` (reduce up the topology tree, result back down; fewest hops), `ring` (pipelined reduce-scatter + all-gather; least data per link), `auto` (ring from PARALLEL_RING_THRESHOLD bytes on). Must be the same on every rank.",
    },
    Var {
        name: "PARALLEL_RING_THRESHOLD",
        kind: VarKind::Bytes {
            min: 0,
            max: 1 << 50,
        },
        default: "256K",
        doc: "With PARALLEL_ALGO=auto, all-reduces of at least this many bytes take the ring. Must be the same on every rank.",
    },
    Var {
        name: "PARALLEL_COLLECTIVE_CHUNK",
        kind: VarKind::Bytes {
            min: 4 * KIB,
            max: GIB,
        },
        default: "1M",
        doc: "Pipeline chunk of the ring all-reduce: each chunk is sent while the previous one is reduced.",
    },
    Var {
        name: "PARALLEL_RANK",
        kind: VarKind::Text,
        default: "",
        doc: "This process's rank in a tree (else RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK; unset everywhere: the root assigns ranks in arrival order).",
    },
    Var {
        name: "PARALLEL_WORLD_SIZE",
        kind: VarKind::Text,
        default: "",
        doc: "Number of ranks in a tree (else WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE, PMI_SIZE).",
    },
    Var {
        name: "PARALLEL_ROOT",
        kind: VarKind::Text,
        default: "",
        doc: "host:port where rank 0 listens for the rendezvous (else MASTER_ADDR:MASTER_PORT, or the first host of SLURM_NODELIST with MASTER_PORT, default port 29500).",
    },
    Var {
        name: "PARALLEL_IFNAME",
        kind: VarKind::Text,
        default: "",
        doc: "Network interface whose IPv4 address a rank listens on for its tree links. Empty: the interface that routes to the root.",
    },
    Var {
        name: "PARALLEL_WORKQUEUE_CAPACITY",
        kind: VarKind::Int {
            min: 2,
            max: 1 << 24,
        },
        default: "1024",
        doc: "Items each direction of a work queue (and a pool's job queue) holds before writers wait for readers (back-pressure).",
    },
    Var {
        name: "PARALLEL_WORKQUEUE_ARENA",
        kind: VarKind::Bytes {
            min: MIB,
            max: 1 << 44,
        },
        default: "16G",
        doc: "Address space of the shared-memory arena behind a work queue that other processes open. Only the pages items use are committed; freed blocks are reused (and stay faulted in). Writers wait for readers to free blocks when it is full.",
    },
    Var {
        name: "PARALLEL_CUDA",
        kind: VarKind::Bool,
        default: "1",
        doc: "Use CUDA when a driver (libcuda) is found. 0: behave as on a machine without a GPU (CUDA tensors are refused with a clear error). The library is looked for once, with dlopen, before any CUDA call.",
    },
    Var {
        name: "PARALLEL_CUDA_IPC",
        kind: VarKind::Bool,
        default: "1",
        doc: "Send CUDA tensors between processes of one host by CUDA IPC (memory and event handles; the receiver copies device to device) when both ends have CUDA and share a shared-memory link. 0: stage them through pinned host memory like across hosts.",
    },
    Var {
        name: "PARALLEL_CUDA_IPC_THRESHOLD",
        kind: VarKind::Bytes {
            min: 0,
            max: 1 << 40,
        },
        default: "1M",
        doc: "Messages whose CUDA tensors add up to at least this many bytes go by CUDA IPC (when the link allows it); smaller ones are staged through the shared-memory ring, which is faster for them (no mapping to open) and lets `send` return before the peer receives.",
    },
    Var {
        name: "PARALLEL_CUDA_IPC_CACHE",
        kind: VarKind::Int { min: 0, max: 4096 },
        default: "0",
        doc: "Peer allocations a receiver keeps mapped after a CUDA IPC copy (least recently used are closed first). 0: every mapping is closed right after its copy, as CUDA requires before the sender may free the memory. More saves the mapping cost (about 0.1-1 ms) on repeated transfers from the same allocation, but then a sender must not return that memory to the driver (torch.cuda.empty_cache) while a peer may hold it mapped.",
    },
    Var {
        name: "PARALLEL_CUDA_CHUNK",
        kind: VarKind::Bytes {
            min: 64 * KIB,
            max: GIB,
        },
        default: "4M",
        doc: "Pipeline chunk of staged CUDA transfers: the device-to-host copy of chunk k+1 overlaps the send of chunk k (and the host-to-device copy of chunk k the receive of chunk k+1).",
    },
    Var {
        name: "PARALLEL_CUDA_STAGING",
        kind: VarKind::Int { min: 2, max: 64 },
        default: "4",
        doc: "Pinned host buffers of PARALLEL_CUDA_CHUNK bytes each staged transfer cycles through (per direction, per thread; allocated on first use and kept).",
    },
    Var {
        name: "PARALLEL_NVRTC_LIB",
        kind: VarKind::Text,
        default: "",
        doc: "Path of libnvrtc for the GPU reduction kernels. Empty: the loader's path (libnvrtc.so.13, .12), then the NVIDIA wheels next to torch (`nvidia/*/lib`), found by torch_parallel.",
    },
];

/// The effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub io: IoChoice,
    pub threads: usize,
    pub cpus: Vec<usize>,
    pub timeout: Duration,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub frame_timeout: Duration,
    pub max_frame: u64,
    pub max_descriptor: u64,
    pub max_value_depth: usize,
    pub max_segments: usize,
    pub shm: bool,
    pub shm_ring: usize,
    pub shm_cma: bool,
    pub shm_cma_threshold: u64,
    pub spin: Duration,
    pub secret: Option<Vec<u8>>,
    pub pool_bytes: u64,
    pub mlock: bool,
    pub chunk: usize,
    /// PARALLEL_ALGO: "auto", "tree" or "ring".
    pub algo: String,
    pub ring_threshold: u64,
    pub collective_chunk: u64,
    pub workqueue_capacity: usize,
    pub workqueue_arena: u64,
    pub cuda: bool,
    pub cuda_ipc: bool,
    pub cuda_ipc_threshold: u64,
    pub cuda_ipc_cache: usize,
    pub cuda_chunk: usize,
    pub cuda_staging: usize,
    pub nvrtc_lib: String,
    /// Every variable's effective value as text, in table order.
    pub effective: Vec<(&'static str, String)>,
}

/// The I/O backend requested by `PARALLEL_IO`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoChoice {
    Auto,
    Uring,
    Epoll,
}

static CONFIG: OnceLock<std::result::Result<Config, Error>> = OnceLock::new();

/// The process configuration, read from the environment on first use.
///
/// Panics never; a malformed variable is reported by [`try_config`] and, here, replaced by the
/// whole default configuration after an error log line (so a reactor thread cannot fail on it).
#[allow(clippy::disallowed_methods)] // CONFIG-1: the one place that reads the environment
pub fn config() -> &'static Config {
    match CONFIG.get_or_init(|| Config::from_lookup(&|n| std::env::var(n).ok())) {
        Ok(c) => c,
        Err(e) => {
            static FALLBACK: OnceLock<Config> = OnceLock::new();
            FALLBACK.get_or_init(|| {
                tracing::error!("{e}; using defaults for every PARALLEL_* variable");
                Config::from_lookup(&|_| None).expect("defaults parse")
            })
        }
    }
}

/// The process configuration, or the error that a malformed variable caused.
#[allow(clippy::disallowed_methods)] // CONFIG-1: the one place that reads the environment
pub fn try_config() -> Result<&'static Config> {
    match CONFIG.get_or_init(|| Config::from_lookup(&|n| std::env::var(n).ok())) {
        Ok(c) => Ok(c),
        Err(e) => Err(e.clone()),
    }
}

fn bad(var: &Var, value: &str, why: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        "config",
        format!("{}={value:?} is not valid: {why}", var.name),
    )
}

fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.chars().last()? {
        'k' | 'K' => (&s[..s.len() - 1], KIB),
        'm' | 'M' => (&s[..s.len() - 1], MIB),
        'g' | 'G' => (&s[..s.len() - 1], GIB),
        't' | 'T' => (&s[..s.len() - 1], GIB * 1024),
        _ => (s, 1),
    };
    num.trim().parse::<u64>().ok()?.checked_mul(mul)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// Parses a core list such as `0-3,6`.
pub fn parse_cpu_list(s: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a || b - a > 4096 {
                    return None;
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// A checked value of one variable.
enum Parsed {
    U(u64),
    D(Duration),
    B(bool),
    T(String),
}

fn parse_var(var: &Var, raw: &str) -> Result<Parsed> {
    Ok(match var.kind {
        VarKind::Int { min, max } => {
            let v: u64 = raw
                .trim()
                .parse()
                .map_err(|_| bad(var, raw, "expected a whole number"))?;
            if v < min || v > max {
                return Err(bad(var, raw, &format!("expected {min}..={max}")));
            }
            Parsed::U(v)
        }
        VarKind::Bytes { min, max } => {
            let v = parse_bytes(raw)
                .ok_or_else(|| bad(var, raw, "expected bytes like 4096, 64K, 4M, 1G"))?;
            if v < min || v > max {
                return Err(bad(var, raw, &format!("expected {min}..={max} bytes")));
            }
            Parsed::U(v)
        }
        VarKind::Seconds => {
            let v: f64 = raw
                .trim()
                .parse()
                .map_err(|_| bad(var, raw, "expected seconds"))?;
            if !(v.is_finite() && v > 0.0 && v <= 1e9) {
                return Err(bad(var, raw, "expected a positive number of seconds"));
            }
            Parsed::D(Duration::from_secs_f64(v))
        }
        VarKind::Bool => {
            Parsed::B(parse_bool(raw).ok_or_else(|| bad(var, raw, "expected 0 or 1"))?)
        }
        VarKind::Choice(words) => {
            let w = raw.trim().to_ascii_lowercase();
            if !words.contains(&w.as_str()) {
                return Err(bad(
                    var,
                    raw,
                    &format!("expected one of {}", words.join(", ")),
                ));
            }
            Parsed::T(w)
        }
        VarKind::Text => Parsed::T(raw.to_string()),
    })
}

impl Config {
    /// Builds a configuration from a lookup function (the environment, or a test's map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let mut vals = Vec::with_capacity(TABLE.len());
        let mut effective = Vec::with_capacity(TABLE.len());
        for var in TABLE {
            let raw = lookup(var.name).filter(|s| !s.trim().is_empty());
            let text = raw.clone().unwrap_or_else(|| var.default.to_string());
            vals.push(parse_var(var, &text)?);
            let shown = if var.name == "PARALLEL_SECRET" && raw.is_some() {
                "<set>".to_string()
            } else {
                text
            };
            effective.push((var.name, shown));
        }
        let mut it = vals.into_iter();
        let mut next = || it.next().expect("table order");
        let u = |p: Parsed| {
            if let Parsed::U(v) = p {
                v
            } else {
                unreachable!("kind")
            }
        };
        let d = |p: Parsed| {
            if let Parsed::D(v) = p {
                v
            } else {
                unreachable!("kind")
            }
        };
        let b = |p: Parsed| {
            if let Parsed::B(v) = p {
                v
            } else {
                unreachable!("kind")
            }
        };
        let t = |p: Parsed| {
            if let Parsed::T(v) = p {
                v
            } else {
                unreachable!("kind")
            }
        };
        let io = match t(next()).as_str() {
            "uring" => IoChoice::Uring,
            "epoll" => IoChoice::Epoll,
            _ => IoChoice::Auto,
        };
        let threads = u(next()) as usize;
        let cpus_text = t(next());
        let cpus = parse_cpu_list(&cpus_text)
            .ok_or_else(|| bad(&TABLE[2], &cpus_text, "expected a core list like 0-3,6"))?;
        let timeout = d(next());
        let connect_timeout = d(next());
        let handshake_timeout = d(next());
        let frame_timeout = d(next());
        let max_frame = u(next());
        let max_descriptor = u(next());
        let max_value_depth = u(next()) as usize;
        let max_segments = u(next()) as usize;
        let shm = b(next());
        let shm_ring = u(next()) as usize;
        let shm_cma = b(next());
        let shm_cma_threshold = u(next());
        let spin = Duration::from_micros(u(next()));
        let secret_text = t(next());
        let secret_file = t(next());
        let secret = if !secret_file.is_empty() {
            let mut bytes = std::fs::read(&secret_file).map_err(|e| {
                bad(
                    &TABLE[17],
                    &secret_file,
                    &format!("cannot read the secret file: {e}"),
                )
            })?;
            while bytes.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                bytes.pop();
            }
            Some(bytes)
        } else if !secret_text.is_empty() {
            Some(secret_text.into_bytes())
        } else {
            None
        };
        let pool_bytes = u(next());
        let mlock = b(next());
        let chunk = u(next()) as usize;
        let algo = t(next());
        let ring_threshold = u(next());
        let collective_chunk = u(next());
        // Launcher-facing text variables, validated where they are used (collectives' rendezvous).
        for _ in 0..4 {
            let _ = t(next());
        }
        let workqueue_capacity = u(next()) as usize;
        let workqueue_arena = u(next());
        let cuda = b(next());
        let cuda_ipc = b(next());
        let cuda_ipc_threshold = u(next());
        let cuda_ipc_cache = u(next()) as usize;
        let cuda_chunk = u(next()) as usize;
        let cuda_staging = u(next()) as usize;
        let nvrtc_lib = t(next());
        Ok(Config {
            io,
            threads,
            cpus,
            timeout,
            connect_timeout,
            handshake_timeout,
            frame_timeout,
            max_frame,
            max_descriptor,
            max_value_depth,
            max_segments,
            shm,
            shm_ring,
            shm_cma,
            shm_cma_threshold,
            spin,
            secret,
            pool_bytes,
            mlock,
            chunk,
            algo,
            ring_threshold,
            collective_chunk,
            workqueue_capacity,
            workqueue_arena,
            cuda,
            cuda_ipc,
            cuda_ipc_threshold,
            cuda_ipc_cache,
            cuda_chunk,
            cuda_staging,
            nvrtc_lib,
            effective,
        })
    }
}

/// Renders the table as the Markdown of `docs/environment.md`.
pub fn render_markdown() -> String {
    let mut s = String::from(
        "# Environment variables\n\n<!-- Generated from engine/src/config.rs (TABLE); a test fails when this file differs. \
         Regenerate with `cargo run -p parallel-engine --example envdoc > docs/environment.md`. -->\n\n\
         Every tuning knob of Parallel is one environment variable, read once per process when the engine \
         is first used. `torch_parallel.config()` returns the effective values. A malformed value is an \
         error naming the variable (`torch_parallel.config()` raises it; the engine logs it and uses the defaults).\n\n\
         | variable | default | accepted | meaning |\n|---|---|---|---|\n",
    );
    for v in TABLE {
        let accepted = match v.kind {
            VarKind::Int { min, max } => format!("{min}..={max}"),
            VarKind::Bytes { .. } => "bytes (K, M, G, T suffixes)".to_string(),
            VarKind::Seconds => "seconds".to_string(),
            VarKind::Bool => "0 or 1".to_string(),
            VarKind::Choice(w) => w.join(", "),
            VarKind::Text => "text".to_string(),
        };
        let default = if v.default.is_empty() {
            "(unset)".to_string()
        } else {
            format!("`{}`", v.default)
        };
        s.push_str(&format!(
            "| `{}` | {default} | {accepted} | {} |\n",
            v.name, v.doc
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Config::from_lookup(&|n| m.get(n).cloned())
    }

    #[test]
    fn defaults_parse() {
        let c = with(&[]).unwrap();
        assert_eq!(c.io, IoChoice::Auto);
        assert_eq!(c.max_value_depth, 64);
        assert_eq!(c.max_frame, 64 * GIB);
        assert_eq!(c.effective.len(), TABLE.len());
    }

    #[test]
    fn config_3_malformed_values_name_the_variable() {
        let e = with(&[("PARALLEL_MAX_FRAME", "lots")]).unwrap_err();
        assert!(e.to_string().contains("PARALLEL_MAX_FRAME"), "{e}");
        let e = with(&[("PARALLEL_IO", "kqueue")]).unwrap_err();
        assert!(e.to_string().contains("uring, epoll"), "{e}");
        let e = with(&[("PARALLEL_THREADS", "99999")]).unwrap_err();
        assert!(e.to_string().contains("0..=1024"), "{e}");
    }

    #[test]
    fn values_and_suffixes() {
        let c = with(&[
            ("PARALLEL_SHM_RING", "8M"),
            ("PARALLEL_IO", "EPOLL"),
            ("PARALLEL_CPUS", "0-2,5"),
        ])
        .unwrap();
        assert_eq!(c.shm_ring, 8 << 20);
        assert_eq!(c.io, IoChoice::Epoll);
        assert_eq!(c.cpus, vec![0, 1, 2, 5]);
        let c = with(&[("PARALLEL_SECRET", "s3")]).unwrap();
        assert_eq!(c.secret.as_deref(), Some(&b"s3"[..]));
        assert!(
            c.effective
                .iter()
                .any(|(n, v)| *n == "PARALLEL_SECRET" && v == "<set>")
        );
    }

    #[test]
    fn config_2_docs_environment_md_matches_table() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/environment.md");
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert_eq!(
            on_disk,
            render_markdown(),
            "docs/environment.md is stale: regenerate it (see its header)"
        );
    }
}

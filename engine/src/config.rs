//! Every environment variable the code reads, parsed in one place.
//!
//! Invariants:
//! - CONFIG-1: this is the only module that reads the environment (clippy's `disallowed-methods`
//!   guards it); everything else asks [`try_config`] / [`config`], or [`launcher_var`] for the
//!   launcher variables of a tree's rendezvous.
//! - CONFIG-2: [`TABLE`] and [`LAUNCHER`] list every variable read; `docs/environment.md` is
//!   rendered from them ([`render_markdown`]) and a test fails when the file drifts. Values are
//!   looked up by name, never by position in the table.
//! - CONFIG-3: a malformed value is an error `NAME='value' is not valid: expected ...` naming the
//!   accepted form; it is never replaced by a default.
//! - CONFIG-4 (fail closed): every public entry point (Server, Client, Tree, work queues, pools,
//!   the Python `config()`) calls [`try_config`] before anything else, so a malformed environment
//!   is a `Config` error there. [`config`] is for code that runs after such a call; reached with a
//!   malformed environment anyway it aborts the process: nothing ever runs on defaults, and
//!   authentication is never silently off.
//! - CONFIG-5: authentication is off only when PARALLEL_SECRET and PARALLEL_SECRET_FILE are both
//!   unset. A set but empty secret, an unreadable or empty secret file, is an error.
//!
//! The [`TABLE`] is read once per process, on first use, and is immutable afterwards; the
//! [`LAUNCHER`] variables are read when a tree resolves its rank (so a launcher that sets them
//! late still works).

use crate::error::{Error, ErrorKind, Result};
use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The kind of a configuration value, used for parsing and for the documentation table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarKind {
    /// Unsigned integer with an inclusive range.
    Int { min: u64, max: u64 },
    /// A size in bytes with an inclusive range (see [`parse_bytes`] for the units).
    Bytes { min: u64, max: u64 },
    /// A positive duration: seconds as a decimal number, or with a unit (ms, s, min, h).
    Seconds,
    /// 1/true/yes/on or 0/false/no/off.
    Bool,
    /// One of a fixed set of words.
    Choice(&'static [&'static str]),
    /// Free text (validated where it is used, if at all).
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
/// The most ranks a tree may have (bounds rank and world-size variables).
const MAX_RANKS: u64 = 1 << 24;

/// The accepted form of a size, as the documentation and the errors say it.
const BYTES_FORM: &str = "a size in bytes: a number with an optional unit, K M G T P or KiB MiB GiB TiB PiB (powers of 1024), KB MB GB TB PB (powers of 1000), coming to a whole number of bytes, e.g. 4096, 64K, 4MiB, 4MB, 1.5G";

/// The table of every variable the engine (and the crates above it) reads.
pub const TABLE: &[Var] = &[
    Var {
        name: "PARALLEL_IO",
        kind: VarKind::Choice(&["auto", "uring", "epoll"]),
        default: "auto",
        doc: "I/O backend. `auto` uses io_uring when the kernel and the container allow it (a probe ring is set up once) and falls back to epoll otherwise (ENOSYS, EPERM from seccomp). `uring` fails with a clear error when io_uring is unavailable.",
    },
    Var {
        name: "PARALLEL_LOG",
        kind: VarKind::Text,
        default: "",
        doc: "Log filter, in tracing's EnvFilter syntax: a level (`error`, `warn`, `info`, `debug`, `trace`), optionally per module (`parallel_collectives=debug,warn`). Unset: no log. Lines go to stderr with the UTC time, level, tree rank, host and module; in Python each record also goes to the `logging` logger `torch_parallel` (child loggers by module). At `info`: rendezvous (who joined, from where), the plan and its link kinds, fallbacks (io_uring to epoll, CUDA IPC to staging), peers lost. The shared secret is never logged.",
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
        doc: "Longest spin, in microseconds, of a waiting thread before it sleeps in the kernel. A waiter spins only while a core is free for it (runnable threads no more than cores) and spins less after spins that did not pay, so a loaded machine does not pay for it; 0 never spins.",
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
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "This process's rank in a tree (else RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK; unset everywhere: the root assigns ranks in arrival order).",
    },
    Var {
        name: "PARALLEL_WORLD_SIZE",
        kind: VarKind::Int {
            min: 1,
            max: MAX_RANKS,
        },
        default: "",
        doc: "Number of ranks in a tree (else WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE, PMI_SIZE).",
    },
    Var {
        name: "PARALLEL_ROOT",
        kind: VarKind::Text,
        default: "",
        doc: "host:port where rank 0 listens for the rendezvous (else MASTER_ADDR:MASTER_PORT outside torchrun, or the first host of SLURM_JOB_NODELIST with MASTER_PORT, default port 29500). Not used by a tree that meets through a store (under torchrun from Python, or given one).",
    },
    Var {
        name: "PARALLEL_IFNAME",
        kind: VarKind::Text,
        default: "",
        doc: "Network interface whose IPv4 address a rank listens on for its tree links (and rank 0 for a rendezvous through a store). Empty: the interface that routes to the root (rank 0 through a store: every interface, its addresses published best first).",
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

/// Launcher variables (torchrun, SLURM, Open MPI, PMI/PMIx) a tree's rendezvous reads when
/// PARALLEL_RANK, PARALLEL_WORLD_SIZE or PARALLEL_ROOT are unset. Read (and validated) when a
/// tree is created, through [`launcher_var`] and [`launcher_uint`]; not tuning knobs, so a
/// malformed one fails only the tree that needs it.
pub const LAUNCHER: &[Var] = &[
    Var {
        name: "RANK",
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "torchrun: this process's rank (after PARALLEL_RANK).",
    },
    Var {
        name: "WORLD_SIZE",
        kind: VarKind::Int {
            min: 1,
            max: MAX_RANKS,
        },
        default: "",
        doc: "torchrun: the number of ranks (after PARALLEL_WORLD_SIZE).",
    },
    Var {
        name: "MASTER_ADDR",
        kind: VarKind::Text,
        default: "",
        doc: "torchrun: the root's host, with MASTER_PORT (after PARALLEL_ROOT).",
    },
    Var {
        name: "MASTER_PORT",
        kind: VarKind::Int { min: 1, max: 65535 },
        default: "29500",
        doc: "torchrun: the root's port, with MASTER_ADDR or SLURM_NODELIST. Under torchrun (TORCHELASTIC_RUN_ID set) it is the launcher's TCPStore: a tree never binds it, but meets through that store (Python) or fails with a Config error (Rust without a store).",
    },
    Var {
        name: "TORCHELASTIC_RUN_ID",
        kind: VarKind::Text,
        default: "",
        doc: "torchrun: set in every worker; marks MASTER_ADDR:MASTER_PORT as the launcher's store, not a free port.",
    },
    Var {
        name: "TORCHELASTIC_USE_AGENT_STORE",
        kind: VarKind::Bool,
        default: "",
        doc: "torchrun: `True` when the agent hosts the TCPStore at MASTER_ADDR:MASTER_PORT (every worker is a client of it; torch_parallel.tree() then uses it as a client).",
    },
    Var {
        name: "LOCAL_WORLD_SIZE",
        kind: VarKind::Int {
            min: 1,
            max: MAX_RANKS,
        },
        default: "",
        doc: "torchrun: processes per node; with GROUP_RANK it names the node of a rank that never arrives.",
    },
    Var {
        name: "GROUP_RANK",
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "torchrun: this node's index among the nodes (see LOCAL_WORLD_SIZE).",
    },
    Var {
        name: "SLURM_PROCID",
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "SLURM: this process's rank (after PARALLEL_RANK, RANK).",
    },
    Var {
        name: "SLURM_NTASKS",
        kind: VarKind::Int {
            min: 1,
            max: MAX_RANKS,
        },
        default: "",
        doc: "SLURM: the number of ranks (after PARALLEL_WORLD_SIZE, WORLD_SIZE).",
    },
    Var {
        name: "SLURM_JOB_NODELIST",
        kind: VarKind::Text,
        default: "",
        doc: "SLURM: the job's hosts in hostlist syntax (`node[01-04,07],gpu-a[1-2]`); its first host is the root (after PARALLEL_ROOT, MASTER_ADDR), with MASTER_PORT; with SLURM_TASKS_PER_NODE it names the host of a rank that never arrives.",
    },
    Var {
        name: "SLURM_NODELIST",
        kind: VarKind::Text,
        default: "",
        doc: "SLURM: the older name of SLURM_JOB_NODELIST (read when that is unset).",
    },
    Var {
        name: "SLURM_TASKS_PER_NODE",
        kind: VarKind::Text,
        default: "",
        doc: "SLURM: tasks on each host of the node list (`2(x3),1`); ranks are mapped to hosts in blocks (SLURM's default distribution), for error messages only.",
    },
    Var {
        name: "OMPI_COMM_WORLD_RANK",
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "Open MPI: this process's rank (after PARALLEL_RANK, RANK, SLURM_PROCID).",
    },
    Var {
        name: "OMPI_COMM_WORLD_SIZE",
        kind: VarKind::Int {
            min: 1,
            max: MAX_RANKS,
        },
        default: "",
        doc: "Open MPI: the number of ranks (after PARALLEL_WORLD_SIZE, WORLD_SIZE, SLURM_NTASKS).",
    },
    Var {
        name: "PMI_RANK",
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "PMI (MPICH, Intel MPI): this process's rank (after the above).",
    },
    Var {
        name: "PMI_SIZE",
        kind: VarKind::Int {
            min: 1,
            max: MAX_RANKS,
        },
        default: "",
        doc: "PMI: the number of ranks (after the above).",
    },
    Var {
        name: "PMIX_RANK",
        kind: VarKind::Int {
            min: 0,
            max: MAX_RANKS,
        },
        default: "",
        doc: "PMIx: this process's rank (after the above).",
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
    /// PARALLEL_LOG: the log filter (empty: no log).
    pub log: String,
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

/// One variable from the environment. A value that is not UTF-8 is kept (lossily converted), so
/// a numeric one fails validation and a secret stays set (CONFIG-5): never "unset".
#[allow(clippy::disallowed_methods)] // CONFIG-1: the one place that reads the environment
fn env_lookup(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) => Some(v),
        Err(std::env::VarError::NotPresent) => None,
        Err(std::env::VarError::NotUnicode(v)) => Some(v.to_string_lossy().into_owned()),
    }
}

/// The process configuration, or the error a malformed variable causes (CONFIG-3). Every
/// public entry point calls this first (CONFIG-4); the result is computed once per process.
pub fn try_config() -> Result<&'static Config> {
    match CONFIG.get_or_init(|| Config::from_lookup(&env_lookup)) {
        Ok(c) => {
            crate::log::install(&c.log); // LOG-2
            Ok(c)
        }
        Err(e) => Err(e.clone()),
    }
}

/// The process configuration, for code that runs after an entry point's [`try_config`].
///
/// Never returns defaults for a malformed environment: reached with one (an entry point that
/// forgot its check), it logs the error and aborts the process (CONFIG-4).
pub fn config() -> &'static Config {
    match try_config() {
        Ok(c) => c,
        Err(e) => unusable(&e),
    }
}

#[cold]
fn unusable(e: &Error) -> ! {
    use std::io::Write;
    tracing::error!("{e}; refusing to run on defaults");
    let _ = writeln!(
        std::io::stderr(),
        "parallel: {e}; refusing to run on defaults (aborting)"
    );
    std::process::abort()
}

/// A row of [`TABLE`] or [`LAUNCHER`] by name.
fn find(name: &str) -> Result<&'static Var> {
    TABLE
        .iter()
        .chain(LAUNCHER)
        .find(|v| v.name == name)
        .ok_or_else(|| internal(name))
}

/// A launcher variable (or one of the tree's PARALLEL_* variables), read from the environment
/// now and checked against its row (CONFIG-2, CONFIG-3). Unset or blank: its default, if any.
pub fn launcher_var(name: &str) -> Result<Option<String>> {
    let var = find(name)?;
    let raw = env_lookup(name).filter(|s| !s.trim().is_empty());
    match raw.or_else(|| Some(var.default.to_string()).filter(|d| !d.is_empty())) {
        None => Ok(None),
        Some(v) => {
            parse_var(var, &v)?;
            Ok(Some(v.trim().to_string()))
        }
    }
}

/// A numeric launcher variable (see [`launcher_var`]), checked against its range.
pub fn launcher_uint(name: &str) -> Result<Option<u64>> {
    let var = find(name)?;
    match launcher_var(name)? {
        None => Ok(None),
        Some(v) => match parse_var(var, &v)? {
            Parsed::U(x) => Ok(Some(x)),
            _ => Err(internal(name)),
        },
    }
}

/// The error of a malformed value: `NAME='value' is not valid: expected ...` (CONFIG-3).
fn bad(name: &str, value: &str, expected: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        "config",
        format!(
            "{name}='{}' is not valid: expected {expected}",
            value.escape_debug()
        ),
    )
}

fn internal(name: &str) -> Error {
    Error::new(
        ErrorKind::Config,
        "config",
        format!(
            "internal error: {name} is missing from the configuration table or read as another kind"
        ),
    )
}

/// A byte count for people: `64KiB`, `1GiB`, `1000`.
fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, &str); 5] = [
        (1 << 50, "PiB"),
        (1 << 40, "TiB"),
        (GIB, "GiB"),
        (MIB, "MiB"),
        (KIB, "KiB"),
    ];
    UNITS
        .iter()
        .find(|(u, _)| n >= *u && n % u == 0)
        .map_or_else(|| n.to_string(), |(u, s)| format!("{}{s}", n / u))
}

/// Parses a size: a number (digits, optionally a decimal fraction), optional spaces, an optional
/// unit, case-insensitive. `K`, `Ki`, `KiB` (and M, G, T, P) are powers of 1024; `KB`, `MB`,
/// `GB`, `TB`, `PB` are SI, powers of 1000; `B` or nothing: bytes. The result must be a whole
/// number of bytes (`1.5K` = 1536; `1.5` is refused) and fit in 64 bits.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim());
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "ki" | "kib" => KIB,
        "m" | "mi" | "mib" => MIB,
        "g" | "gi" | "gib" => GIB,
        "t" | "ti" | "tib" => 1 << 40,
        "p" | "pi" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        _ => return None,
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let digits = |d: &str| d.bytes().all(|c| c.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) || frac.len() > 18 {
        return None;
    }
    let whole = if int.is_empty() {
        0
    } else {
        int.parse::<u64>().ok()?.checked_mul(mul)?
    };
    if frac.is_empty() {
        return Some(whole);
    }
    let den = 10u128.pow(frac.len() as u32);
    let part = frac.parse::<u128>().ok()? * u128::from(mul);
    if part % den != 0 {
        return None;
    }
    whole.checked_add(u64::try_from(part / den).ok()?)
}

/// Parses a duration in seconds: a decimal number, optionally with a unit `ms`, `s`, `min`, `h`.
pub fn parse_seconds(s: &str) -> Option<f64> {
    let s = s.trim().to_ascii_lowercase();
    let split = s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len());
    let (num, unit) = (s[..split].trim(), &s[split..]);
    let mul = match unit {
        "" | "s" => 1.0,
        "ms" => 1e-3,
        "min" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    num.parse::<f64>().ok().map(|v| v * mul)
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

/// The accepted form of a kind, as the errors and the documentation say it.
fn accepted(kind: VarKind) -> String {
    match kind {
        VarKind::Int { min, max } => format!("a whole number from {min} to {max}"),
        VarKind::Bytes { min, max } => format!(
            "{BYTES_FORM}; from {} to {}",
            human_bytes(min),
            human_bytes(max)
        ),
        VarKind::Seconds => {
            "a positive duration in seconds (e.g. 30, 0.5), or with a unit: 500ms, 30s, 2min, 1h"
                .to_string()
        }
        VarKind::Bool => "1, true, yes, on or 0, false, no, off".to_string(),
        VarKind::Choice(words) => format!("one of {}", words.join(", ")),
        VarKind::Text => "text".to_string(),
    }
}

/// A checked value of one variable.
#[derive(Debug, Clone)]
enum Parsed {
    U(u64),
    D(Duration),
    B(bool),
    T(String),
    /// Unset, and the row has no default.
    Unset,
}

fn parse_var(var: &Var, raw: &str) -> Result<Parsed> {
    let no = || bad(var.name, raw, &accepted(var.kind));
    Ok(match var.kind {
        VarKind::Int { min, max } => {
            let v: u64 = raw.trim().parse().map_err(|_| no())?;
            if v < min || v > max {
                return Err(no());
            }
            Parsed::U(v)
        }
        VarKind::Bytes { min, max } => {
            let v = parse_bytes(raw).ok_or_else(no)?;
            if v < min || v > max {
                return Err(no());
            }
            Parsed::U(v)
        }
        VarKind::Seconds => {
            let v = parse_seconds(raw).ok_or_else(no)?;
            if !(v.is_finite() && v > 0.0 && v <= 1e9) {
                return Err(no());
            }
            Parsed::D(Duration::from_secs_f64(v))
        }
        VarKind::Bool => Parsed::B(parse_bool(raw).ok_or_else(no)?),
        VarKind::Choice(words) => {
            let w = raw.trim().to_ascii_lowercase();
            if !words.contains(&w.as_str()) {
                return Err(no());
            }
            Parsed::T(w)
        }
        VarKind::Text => Parsed::T(raw.to_string()),
    })
}

/// Every variable of [`TABLE`], checked, by name (CONFIG-2: never by position).
#[derive(Debug)]
struct Vals {
    map: HashMap<&'static str, Parsed>,
    read: std::cell::RefCell<Vec<&'static str>>,
}

impl Vals {
    fn get(&self, name: &'static str) -> Result<&Parsed> {
        self.read.borrow_mut().push(name);
        self.map.get(name).ok_or_else(|| internal(name))
    }
    fn u(&self, name: &'static str) -> Result<u64> {
        match self.get(name)? {
            Parsed::U(v) => Ok(*v),
            _ => Err(internal(name)),
        }
    }
    fn n(&self, name: &'static str) -> Result<usize> {
        usize::try_from(self.u(name)?).map_err(|_| internal(name))
    }
    fn d(&self, name: &'static str) -> Result<Duration> {
        match self.get(name)? {
            Parsed::D(v) => Ok(*v),
            _ => Err(internal(name)),
        }
    }
    fn b(&self, name: &'static str) -> Result<bool> {
        match self.get(name)? {
            Parsed::B(v) => Ok(*v),
            _ => Err(internal(name)),
        }
    }
    fn t(&self, name: &'static str) -> Result<String> {
        match self.get(name)? {
            Parsed::T(v) => Ok(v.clone()),
            Parsed::Unset => Ok(String::new()),
            _ => Err(internal(name)),
        }
    }
}

/// The shared secret (CONFIG-5): from PARALLEL_SECRET_FILE (which wins), else PARALLEL_SECRET;
/// None only when both are unset.
fn read_secret(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<Vec<u8>>> {
    const OFF: &str = "unset PARALLEL_SECRET and PARALLEL_SECRET_FILE to turn authentication off";
    if let Some(path) = lookup("PARALLEL_SECRET_FILE") {
        let name = "PARALLEL_SECRET_FILE";
        if path.trim().is_empty() {
            return Err(bad(
                name,
                &path,
                &format!("the path of a file holding the shared secret ({OFF})"),
            ));
        }
        let mut bytes = std::fs::read(&path).map_err(|e| {
            bad(
                name,
                &path,
                &format!("a readable file holding the shared secret (reading it failed: {e})"),
            )
        })?;
        while bytes.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            bytes.pop();
        }
        if bytes.is_empty() {
            return Err(bad(
                name,
                &path,
                &format!("a file holding the shared secret, but it is empty ({OFF})"),
            ));
        }
        return Ok(Some(bytes));
    }
    match lookup("PARALLEL_SECRET") {
        None => Ok(None),
        // The value is blank, so naming it discloses nothing.
        Some(s) if s.trim().is_empty() => Err(bad(
            "PARALLEL_SECRET",
            &s,
            &format!("a non-empty shared secret ({OFF})"),
        )),
        Some(s) => Ok(Some(s.into_bytes())),
    }
}

/// PARALLEL_LOG, checked (CONFIG-3): a malformed filter is an error, never "no log".
fn log_filter(text: &str) -> Result<String> {
    crate::log::parse_filter(text).map_err(|e| {
        bad(
            "PARALLEL_LOG",
            text,
            &format!("a log filter such as info, debug or parallel_collectives=debug,warn ({e})"),
        )
    })?;
    Ok(text.trim().to_string())
}

impl Config {
    /// Builds a configuration from a lookup function (the environment, or a test's map).
    pub fn from_lookup(lookup: &dyn Fn(&str) -> Option<String>) -> Result<Config> {
        let (vals, effective) = Self::check_all(lookup)?;
        let secret = read_secret(lookup)?;
        Self::build(&vals, secret, effective)
    }

    /// Parses every row of [`TABLE`]; a blank value means the default, except for the secret.
    #[allow(clippy::type_complexity)]
    fn check_all(
        lookup: &dyn Fn(&str) -> Option<String>,
    ) -> Result<(Vals, Vec<(&'static str, String)>)> {
        let mut map = HashMap::with_capacity(TABLE.len());
        let mut effective = Vec::with_capacity(TABLE.len());
        for var in TABLE {
            let raw = lookup(var.name).filter(|s| !s.trim().is_empty());
            let text = raw.clone().unwrap_or_else(|| var.default.to_string());
            let parsed = if text.is_empty() {
                Parsed::Unset
            } else {
                parse_var(var, &text)?
            };
            if map.insert(var.name, parsed).is_some() {
                return Err(internal(var.name)); // a name listed twice
            }
            let shown = if var.name == "PARALLEL_SECRET" && raw.is_some() {
                "<set>".to_string()
            } else {
                text
            };
            effective.push((var.name, shown));
        }
        let vals = Vals {
            map,
            read: Default::default(),
        };
        Ok((vals, effective))
    }

    fn build(
        v: &Vals,
        secret: Option<Vec<u8>>,
        effective: Vec<(&'static str, String)>,
    ) -> Result<Config> {
        let io = match v.t("PARALLEL_IO")?.as_str() {
            "uring" => IoChoice::Uring,
            "epoll" => IoChoice::Epoll,
            _ => IoChoice::Auto,
        };
        let cpus_text = v.t("PARALLEL_CPUS")?;
        let cpus = parse_cpu_list(&cpus_text)
            .ok_or_else(|| bad("PARALLEL_CPUS", &cpus_text, "a core list like 0-3,6"))?;
        // Read where they are used (the tree's rendezvous, launcher_var), checked above.
        for name in [
            "PARALLEL_SECRET",
            "PARALLEL_SECRET_FILE",
            "PARALLEL_RANK",
            "PARALLEL_WORLD_SIZE",
            "PARALLEL_ROOT",
            "PARALLEL_IFNAME",
        ] {
            v.get(name)?;
        }
        Ok(Config {
            io,
            threads: v.n("PARALLEL_THREADS")?,
            cpus,
            timeout: v.d("PARALLEL_TIMEOUT")?,
            connect_timeout: v.d("PARALLEL_CONNECT_TIMEOUT")?,
            handshake_timeout: v.d("PARALLEL_HANDSHAKE_TIMEOUT")?,
            frame_timeout: v.d("PARALLEL_FRAME_TIMEOUT")?,
            max_frame: v.u("PARALLEL_MAX_FRAME")?,
            max_descriptor: v.u("PARALLEL_MAX_DESCRIPTOR")?,
            max_value_depth: v.n("PARALLEL_MAX_VALUE_DEPTH")?,
            max_segments: v.n("PARALLEL_MAX_SEGMENTS")?,
            shm: v.b("PARALLEL_SHM")?,
            shm_ring: v.n("PARALLEL_SHM_RING")?,
            shm_cma: v.b("PARALLEL_SHM_CMA")?,
            shm_cma_threshold: v.u("PARALLEL_SHM_CMA_THRESHOLD")?,
            spin: Duration::from_micros(v.u("PARALLEL_SPIN_US")?),
            secret,
            pool_bytes: v.u("PARALLEL_POOL_BYTES")?,
            mlock: v.b("PARALLEL_MLOCK")?,
            chunk: v.n("PARALLEL_CHUNK")?,
            algo: v.t("PARALLEL_ALGO")?,
            ring_threshold: v.u("PARALLEL_RING_THRESHOLD")?,
            collective_chunk: v.u("PARALLEL_COLLECTIVE_CHUNK")?,
            workqueue_capacity: v.n("PARALLEL_WORKQUEUE_CAPACITY")?,
            workqueue_arena: v.u("PARALLEL_WORKQUEUE_ARENA")?,
            cuda: v.b("PARALLEL_CUDA")?,
            cuda_ipc: v.b("PARALLEL_CUDA_IPC")?,
            cuda_ipc_threshold: v.u("PARALLEL_CUDA_IPC_THRESHOLD")?,
            cuda_ipc_cache: v.n("PARALLEL_CUDA_IPC_CACHE")?,
            cuda_chunk: v.n("PARALLEL_CUDA_CHUNK")?,
            cuda_staging: v.n("PARALLEL_CUDA_STAGING")?,
            nvrtc_lib: v.t("PARALLEL_NVRTC_LIB")?,
            log: log_filter(&v.t("PARALLEL_LOG")?)?,
            effective,
        })
    }
}

fn render_rows(s: &mut String, rows: &[Var]) {
    s.push_str("| variable | default | accepted | meaning |\n|---|---|---|---|\n");
    for v in rows {
        let accepted = match v.kind {
            VarKind::Int { min, max } => format!("{min}..={max}"),
            VarKind::Bytes { min, max } => {
                format!("size, {}..={}", human_bytes(min), human_bytes(max))
            }
            VarKind::Seconds => "duration".to_string(),
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
}

/// Renders the tables as the Markdown of `docs/environment.md`.
pub fn render_markdown() -> String {
    let mut s = String::from(
        "# Environment variables\n\n<!-- Generated from engine/src/config.rs (TABLE, LAUNCHER); a test fails when this file differs. \
         Regenerate with `cargo run -p parallel-engine --example envdoc > docs/environment.md`. -->\n\n\
         Every tuning knob of Parallel is one environment variable, read once per process when the engine \
         is first used. `torch_parallel.config()` returns the effective values.\n\n\
         **A malformed value is an error, never a default.** The first call that uses the configuration \
         (creating a server, client, tree, work queue or pool, `torch_parallel.config()`) fails with \
         `ConfigError`: `PARALLEL_X='value' is not valid: expected ...`, naming the accepted form. \
         Nothing runs on defaults, so a typo elsewhere cannot silently turn authentication off. \
         A blank value means the default, except for the secret: authentication is off only when both \
         `PARALLEL_SECRET` and `PARALLEL_SECRET_FILE` are unset; a blank secret, or a secret file that \
         cannot be read or is empty, is an error.\n\n\
         Forms accepted:\n\n\
         - **size**: a number with an optional unit, case-insensitive, spaces allowed: `K`, `Ki`, `KiB` \
         (and `M`, `G`, `T`, `P`) are powers of 1024; `KB`, `MB`, `GB`, `TB`, `PB` are SI, powers of 1000; \
         `B` or no unit: bytes. `4096`, `4k`, `4KiB` and `4 KiB` are 4096 bytes, `4KB` is 4000, `4MB` is \
         4000000, `4MiB` is 4194304, `1.5G` is 1610612736. A fraction must come to a whole number of bytes.\n\
         - **duration**: seconds as a decimal number (`30`, `0.5`), or with a unit: `500ms`, `30s`, `2min`, `1h`.\n\
         - **0 or 1**: also `true`/`false`, `yes`/`no`, `on`/`off`.\n\n",
    );
    render_rows(&mut s, TABLE);
    s.push_str(
        "\n## Launcher variables\n\n\
         Read by a tree when it resolves its rank, world size and root (after `PARALLEL_RANK`, \
         `PARALLEL_WORLD_SIZE` and `PARALLEL_ROOT`, in this order), when the tree is created. A malformed \
         one that the tree needs is a `ConfigError` of that tree; the others are not read.\n\n",
    );
    render_rows(&mut s, LAUNCHER);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(&str, &str)]) -> Result<Config> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect();
        Config::from_lookup(&|n| m.get(n).cloned())
    }

    fn err(pairs: &[(&str, &str)]) -> String {
        with(pairs).unwrap_err().to_string()
    }

    #[test]
    fn defaults_parse() {
        let c = with(&[]).unwrap();
        assert_eq!(c.io, IoChoice::Auto);
        assert_eq!(c.max_value_depth, 64);
        assert_eq!(c.max_frame, 64 * GIB);
        assert_eq!(c.shm_ring, 4 * MIB as usize);
        assert!(c.secret.is_none());
        assert_eq!(c.effective.len(), TABLE.len());
    }

    #[test]
    fn config_2_every_table_row_is_read_by_name() {
        let (vals, effective) = Config::check_all(&|_| None).unwrap();
        Config::build(&vals, None, effective).unwrap();
        let read = vals.read.borrow();
        for var in TABLE {
            assert!(read.contains(&var.name), "{} is never read", var.name);
        }
        let mut names: Vec<_> = TABLE.iter().chain(LAUNCHER).map(|v| v.name).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(n, names.len(), "a variable is listed twice");
    }

    #[test]
    fn config_2_every_default_is_valid() {
        for var in TABLE.iter().chain(LAUNCHER) {
            if !var.default.is_empty() {
                parse_var(var, var.default).unwrap();
            }
        }
    }

    #[test]
    fn config_3_each_malformed_kind_names_variable_value_and_form() {
        let cases: &[(&str, &str, &str)] = &[
            ("PARALLEL_SHM_RING", "lots", "KiB MiB GiB"),
            ("PARALLEL_SHM_RING", "4 furlongs", "powers of 1000"),
            ("PARALLEL_MAX_FRAME", "-1", "a size in bytes"),
            ("PARALLEL_MAX_FRAME", "1.5", "whole"), // not a whole number of bytes
            (
                "PARALLEL_MAX_FRAME",
                "99999999999999999999",
                "a size in bytes",
            ),
            ("PARALLEL_MAX_FRAME", "20000P", "a size in bytes"), // overflows 64 bits
            ("PARALLEL_SHM_RING", "1K", "from 64KiB to 1GiB"),
            ("PARALLEL_THREADS", "99999", "from 0 to 1024"),
            ("PARALLEL_THREADS", "four", "a whole number"),
            ("PARALLEL_THREADS", "-1", "a whole number"),
            ("PARALLEL_TIMEOUT", "soon", "duration in seconds"),
            ("PARALLEL_TIMEOUT", "0", "positive"),
            ("PARALLEL_TIMEOUT", "-5", "positive"),
            ("PARALLEL_TIMEOUT", "NaN", "positive"),
            ("PARALLEL_TIMEOUT", "inf", "positive"),
            ("PARALLEL_TIMEOUT", "5 fortnights", "500ms"),
            (
                "PARALLEL_SHM",
                "maybe",
                "1, true, yes, on or 0, false, no, off",
            ),
            ("PARALLEL_IO", "kqueue", "one of auto, uring, epoll"),
            ("PARALLEL_CPUS", "0-x", "a core list"),
            ("PARALLEL_RANK", "first", "a whole number"),
            ("PARALLEL_WORLD_SIZE", "0", "from 1 to"),
        ];
        for (name, value, form) in cases {
            let e = err(&[(name, value), ("PARALLEL_SECRET", "s")]);
            let head = format!("{name}='{value}' is not valid: expected ");
            assert!(e.contains(&head), "{name}={value}: {e}");
            assert!(e.contains(form), "{name}={value}: {e} lacks {form:?}");
            assert!(!e.contains("='s'"), "the secret leaked: {e}");
        }
        // Quotes and control characters in a value are escaped, not printed raw.
        let e = err(&[("PARALLEL_IO", "a'b\nc")]);
        assert!(e.contains(r"PARALLEL_IO='a\'b\nc' is not valid"), "{e}");
    }

    #[test]
    fn config_3_malformed_variable_never_yields_defaults_or_drops_the_secret() {
        // The old behaviour: one bad variable made everything default, secret included.
        assert!(with(&[("PARALLEL_SECRET", "s"), ("PARALLEL_SHM_RING", "lots")]).is_err());
        let c = with(&[("PARALLEL_SECRET", "s"), ("PARALLEL_SHM_RING", "8MiB")]).unwrap();
        assert_eq!(c.secret.as_deref(), Some(&b"s"[..]));
    }

    #[test]
    fn config_bytes_accepts_the_forms_people_write() {
        let cases: &[(&str, u64)] = &[
            ("4096", 4096),
            ("4096B", 4096),
            ("4k", 4096),
            ("4K", 4096),
            ("4Ki", 4096),
            ("4KiB", 4096),
            ("4kib", 4096),
            ("4 KiB", 4096),
            (" 4 KiB ", 4096),
            ("4KB", 4000),
            ("4kB", 4000),
            ("4MB", 4_000_000),
            ("4M", 4 * MIB),
            ("4MiB", 4 * MIB),
            ("4 MiB", 4 * MIB),
            ("1.5G", 3 * GIB / 2),
            ("1.5GiB", 3 * GIB / 2),
            ("0.5K", 512),
            (".5K", 512),
            ("2.0", 2),
            ("1GB", 1_000_000_000),
            ("2T", 2 << 40),
            ("1TB", 1_000_000_000_000),
            ("1P", 1 << 50),
            ("1PB", 1_000_000_000_000_000),
            ("0", 0),
        ];
        for (text, want) in cases {
            assert_eq!(parse_bytes(text), Some(*want), "{text:?}");
        }
        for text in [
            "", ".", "K", "4KK", "4 K B", "1.2.3K", "0x10", "4e3", "-4K", "4KiBs", "1.5", "0.3K",
            "16EiB", "1,5K",
        ] {
            assert_eq!(parse_bytes(text), None, "{text:?}");
        }
        let c = with(&[("PARALLEL_SHM_RING", "4 MiB"), ("PARALLEL_CHUNK", "4MB")]).unwrap();
        assert_eq!(c.shm_ring, 4 * MIB as usize);
        assert_eq!(c.chunk, 4_000_000);
    }

    #[test]
    fn config_durations_and_booleans() {
        let c = with(&[
            ("PARALLEL_TIMEOUT", "500ms"),
            ("PARALLEL_CONNECT_TIMEOUT", "2min"),
            ("PARALLEL_HANDSHAKE_TIMEOUT", "0.25"),
            ("PARALLEL_SHM", "off"),
            ("PARALLEL_MLOCK", "Yes"),
        ])
        .unwrap();
        assert_eq!(c.timeout, Duration::from_millis(500));
        assert_eq!(c.connect_timeout, Duration::from_secs(120));
        assert_eq!(c.handshake_timeout, Duration::from_millis(250));
        assert!(!c.shm && c.mlock);
        assert_eq!(parse_seconds("1h"), Some(3600.0));
        assert_eq!(parse_seconds("30 s"), Some(30.0));
    }

    #[test]
    fn values_and_suffixes() {
        let c = with(&[
            ("PARALLEL_SHM_RING", "8M"),
            ("PARALLEL_IO", "EPOLL"),
            ("PARALLEL_CPUS", "0-2,5"),
            ("PARALLEL_THREADS", " 3 "),
        ])
        .unwrap();
        assert_eq!(c.shm_ring, 8 << 20);
        assert_eq!(c.io, IoChoice::Epoll);
        assert_eq!(c.cpus, vec![0, 1, 2, 5]);
        assert_eq!(c.threads, 3);
        // Blank means the default for a tuning knob.
        assert_eq!(with(&[("PARALLEL_THREADS", " ")]).unwrap().threads, 0);
        let c = with(&[("PARALLEL_SECRET", "s3")]).unwrap();
        assert_eq!(c.secret.as_deref(), Some(&b"s3"[..]));
        assert!(
            c.effective
                .iter()
                .any(|(n, v)| *n == "PARALLEL_SECRET" && v == "<set>")
        );
    }

    fn temp_file(tag: &str, contents: Option<&[u8]>) -> std::path::PathBuf {
        let p =
            std::env::temp_dir().join(format!("parallel-config-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        if let Some(c) = contents {
            std::fs::write(&p, c).unwrap();
        }
        p
    }

    #[test]
    fn config_5_only_unsetting_the_secret_turns_authentication_off() {
        // Blank secret: an error, not "no secret".
        for blank in ["", "  "] {
            let e = err(&[("PARALLEL_SECRET", blank)]);
            assert!(
                e.contains("PARALLEL_SECRET='") && e.contains("non-empty"),
                "{e}"
            );
        }
        // Unreadable secret file.
        let missing = temp_file("missing", None);
        let m = missing.to_str().unwrap();
        let e = err(&[("PARALLEL_SECRET_FILE", m), ("PARALLEL_SECRET", "s")]);
        assert!(
            e.contains(&format!("PARALLEL_SECRET_FILE='{m}' is not valid"))
                && e.contains("reading it failed"),
            "{e}"
        );
        // A directory cannot be read as a file either.
        let dir = std::env::temp_dir();
        let e = err(&[("PARALLEL_SECRET_FILE", dir.to_str().unwrap())]);
        assert!(e.contains("reading it failed"), "{e}");
        // Empty file (a newline only is empty too).
        let empty = temp_file("empty", Some(b"\n"));
        let e = err(&[("PARALLEL_SECRET_FILE", empty.to_str().unwrap())]);
        assert!(e.contains("it is empty"), "{e}");
        // Blank path.
        assert!(err(&[("PARALLEL_SECRET_FILE", "")]).contains("PARALLEL_SECRET_FILE=''"));
        // A good file wins over PARALLEL_SECRET; its trailing newline is dropped.
        let good = temp_file("good", Some(b"from-file\r\n"));
        let c = with(&[
            ("PARALLEL_SECRET_FILE", good.to_str().unwrap()),
            ("PARALLEL_SECRET", "other"),
        ])
        .unwrap();
        assert_eq!(c.secret.as_deref(), Some(&b"from-file"[..]));
        // Both unset: authentication off.
        assert!(with(&[]).unwrap().secret.is_none());
        for p in [empty, good] {
            let _ = std::fs::remove_file(p);
        }
    }

    #[test]
    fn config_2_launcher_rows_validate_their_kind() {
        assert!(find("MASTER_PORT").is_ok() && find("SLURM_NODELIST").is_ok());
        assert!(find("NOT_A_VARIABLE").is_err());
        let port = find("MASTER_PORT").unwrap();
        let e = parse_var(port, "99999").err().unwrap().to_string();
        assert!(
            e.contains("MASTER_PORT='99999' is not valid: expected a whole number from 1 to 65535"),
            "{e}"
        );
        let rank = find("RANK").unwrap();
        assert!(parse_var(rank, "x").is_err());
        assert!(matches!(parse_var(rank, " 7 ").unwrap(), Parsed::U(7)));
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

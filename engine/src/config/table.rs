//! The configuration table: every environment variable Parallel reads, one row each.
//!
//! A row is `field: Type = NAME, kind, "default", "doc";` (the process section, read once into
//! [`Settings`]`.field`) or `Type = NAME, kind, "default", "doc";` (the tree and launcher
//! sections, read when a tree is created through the typed handle `var::NAME`). The macro makes
//! from the rows: the row statics in [`var`], [`TABLE`] and [`LAUNCHER`] (documentation, the
//! Python `config()`), the typed [`Settings`] and its parser. Adding a variable is adding a row
//! here (and a test fails until `docs/environment.md` is regenerated).

use super::parse::{CmaChoice, GIB, IoChoice, KIB, MIB, Secret};
use super::{Key, Lookup, Section, Var, VarKind, parse_row};
use crate::error::Result;
use std::marker::PhantomData;
use std::time::Duration;

/// The most ranks a tree may have (bounds rank and world-size variables).
const MAX_RANKS: u64 = 1 << 24;

const fn row(
    name: &'static str,
    kind: VarKind,
    default: &'static str,
    doc: &'static str,
    section: Section,
) -> Var {
    Var {
        name,
        kind,
        default,
        doc,
        section,
        _only_the_table: (),
    }
}

const fn key<T>(var: Var) -> Key<T> {
    Key {
        var,
        _type: PhantomData,
    }
}

macro_rules! config_table {
    (
        process { $( $field:ident: $ty:ty = $name:ident, $kind:expr, $default:literal, $doc:literal; )* }
        tree { $( $tty:ty = $tname:ident, $tkind:expr, $tdefault:literal, $tdoc:literal; )* }
        launcher { $( $lty:ty = $lname:ident, $lkind:expr, $ldefault:literal, $ldoc:literal; )* }
    ) => {
        /// Every row by its variable's name: the row of a process variable (its value is the
        /// field of [`Settings`]), or the typed handle of a variable read when it is used.
        pub mod var {
            #[allow(unused_imports)]
            use super::{
                CmaChoice, GIB, IoChoice, KIB, Key, MAX_RANKS, MIB, Section, Var, VarKind::*, key,
                row,
            };
            $(
                #[doc = $doc]
                pub static $name: Var =
                    row(stringify!($name), $kind, $default, $doc, Section::Process);
            )*
            $(
                #[doc = $tdoc]
                pub static $tname: Key<$tty> =
                    key(row(stringify!($tname), $tkind, $tdefault, $tdoc, Section::Tree));
            )*
            $(
                #[doc = $ldoc]
                pub static $lname: Key<$lty> =
                    key(row(stringify!($lname), $lkind, $ldefault, $ldoc, Section::Launcher));
            )*
        }

        /// The `PARALLEL_*` variables, in documentation order.
        pub static TABLE: &[&Var] = &[$(&var::$name,)* $(&var::$tname.var,)*];

        /// The launcher variables (torchrun, SLURM, Open MPI, PMI/PMIx) a tree's rendezvous
        /// reads when PARALLEL_RANK, PARALLEL_WORLD_SIZE or PARALLEL_ROOT are unset; not tuning
        /// knobs, so a malformed one fails only the tree that needs it.
        pub static LAUNCHER: &[&Var] = &[$(&var::$lname.var,)*];

        /// The process variables, typed: one field per row of the process section.
        #[derive(Debug, Clone)]
        pub struct Settings {
            $( #[doc = $doc] pub $field: $ty, )*
        }

        impl Settings {
            pub(super) fn from_lookup(lookup: Lookup<'_>) -> Result<Settings> {
                Ok(Settings { $( $field: parse_row(&var::$name, lookup)?, )* })
            }
        }

        /// Checks the tree's variables with the process ones (CONFIG-4).
        pub(super) fn check_tree_section(lookup: Lookup<'_>) -> Result<()> {
            $( parse_row::<$tty>(&var::$tname.var, lookup)?; )*
            Ok(())
        }

        /// Parses one row into its declared type (for the table's tests).
        #[cfg(test)]
        pub(super) fn check_row(v: &'static Var, lookup: Lookup<'_>) -> Result<()> {
            $( if std::ptr::eq(v, &var::$name) { return parse_row::<$ty>(v, lookup).map(drop); } )*
            $( if std::ptr::eq(v, &var::$tname.var) { return parse_row::<$tty>(v, lookup).map(drop); } )*
            $( if std::ptr::eq(v, &var::$lname.var) { return parse_row::<$lty>(v, lookup).map(drop); } )*
            Err(super::internal(v))
        }
    };
}

config_table! {
    process {
        io: IoChoice = PARALLEL_IO, Choice(IoChoice::WORDS), "auto",
            "I/O backend. `auto` uses io_uring when the kernel and the container allow it (a probe ring is set up once) and falls back to epoll otherwise (ENOSYS, EPERM from seccomp). `uring` fails with a clear error when io_uring is unavailable.";
        log: String = PARALLEL_LOG, LogFilter, "",
            "Log filter, in tracing's EnvFilter syntax: a level (`error`, `warn`, `info`, `debug`, `trace`), optionally per module (`parallel_collectives=debug,warn`). Unset: no log. Lines go to stderr with the UTC time, level, tree rank, host and module; in Python each record also goes to the `logging` logger `torch_parallel` (child loggers by module). At `info`: rendezvous (who joined, from where), the plan and its link kinds, fallbacks (io_uring to epoll, CUDA IPC to staging), peers lost. The shared secret is never logged.";
        threads: usize = PARALLEL_THREADS, Int { min: 0, max: 1024 }, "0",
            "Reactor threads for asynchronous operations and accepting connections. 0: one per usable core, at most 4.";
        cpus: Vec<usize> = PARALLEL_CPUS, CpuList, "",
            "Cores the reactor threads are pinned to, as a list like `0-3,6`. Empty: this process's share of the host's cores (see PARALLEL_PIN), round-robin. Pinning failures are logged, not fatal.";
        pin: bool = PARALLEL_PIN, Bool, "1",
            "Pin each reactor thread to one core. With PARALLEL_CPUS unset, processes of one host (torchrun's LOCAL_RANK and LOCAL_WORLD_SIZE) get disjoint cores, physical cores before SMT siblings, each preferring the NUMA node of its GPU (the LOCAL_RANK-th GPU in PCI order) when the topology shows one; a process whose affinity mask is narrower than the machine keeps that mask. 0: no pinning. A refused pin is logged, never fatal.";
        timeout: Duration = PARALLEL_TIMEOUT, Seconds, "600",
            "Deadline in seconds for every blocking call that is given no timeout (recv, send, accept, handshake). No call waits forever.";
        connect_timeout: Duration = PARALLEL_CONNECT_TIMEOUT, Seconds, "30",
            "Default time a client keeps retrying to connect before it gives up, in seconds.";
        handshake_timeout: Duration = PARALLEL_HANDSHAKE_TIMEOUT, Seconds, "10",
            "Time a freshly accepted connection has to complete the hello (and authentication) before the server drops it, in seconds.";
        frame_timeout: Duration = PARALLEL_FRAME_TIMEOUT, Seconds, "30",
            "Time a message has to arrive completely once its first byte arrived, when a server reads it for `recv_any`, in seconds. A client that sends part of a message and stalls is dropped (with a warning) after this long, and never delays messages from other clients. Raise it for very large messages over slow networks.";
        max_frame: u64 = PARALLEL_MAX_FRAME, Bytes { min: KIB, max: 1 << 50 }, "64G",
            "Largest payload (sum of all tensor and bytes segments) one message may declare. Larger declarations are refused before anything is allocated.";
        max_descriptor: u64 = PARALLEL_MAX_DESCRIPTOR, Bytes { min: KIB, max: 4 * GIB }, "64M",
            "Largest descriptor (the value tree: strings, numbers, shapes) of one message.";
        max_value_depth: usize = PARALLEL_MAX_VALUE_DEPTH, Int { min: 1, max: 10_000 }, "64",
            "Deepest nesting of lists, tuples and dicts accepted in a message (and produced by a sender).";
        max_segments: usize = PARALLEL_MAX_SEGMENTS, Int { min: 1, max: 1 << 24 }, "65536",
            "Most payload segments (tensors plus bytes objects) in one message.";
        shm: bool = PARALLEL_SHM, Bool, "1",
            "Use a shared-memory ring instead of TCP when both ends are on the same host (same kernel boot and network namespace). 0 keeps every link on TCP.";
        shm_ring: usize = PARALLEL_SHM_RING, Bytes { min: 64 * KIB, max: GIB }, "4M",
            "Bytes of each direction's shared-memory ring, rounded up to a multiple of 4096 (so the ring's control words stay page aligned: 100000 gives 102400 bytes).";
        shm_cma: CmaChoice = PARALLEL_SHM_CMA, Choice(CmaChoice::WORDS), "auto",
            "On shared-memory links, copy large segments once, straight from the sender's memory into the receiver's (process_vm_readv), instead of twice through the ring. `auto`: where that copy costs less than one memory copy, measured once per process (4 MiB each way, a few milliseconds, at the first shared-memory connection; `python -m torch_parallel info` shows the figures): the ring's two copies run on both ends' cores at once, so a slower single copy saves CPU but not time. Measured on two 2-vCPU VMs: the single copy took 2.2-3.6x a memory copy on one (256 MiB messages at 4.7-5.8 GB/s by it against 10.8-14.7 GB/s through the ring) and 1.34x on the other (4.6-5.2 against 8.7-9.8 GB/s; 4 MiB messages even, at three quarters of the CPU). `1` (or on/true/yes): whenever the kernel allows it (where CPU is scarcer than time). `0` (or off/false/no): never. The receiving end decides for what it receives; either way the kernel is probed at connect time and the ring is used when it refuses.";
        shm_cma_threshold: u64 = PARALLEL_SHM_CMA_THRESHOLD, Bytes { min: 4 * KIB, max: 1 << 40 }, "1M",
            "Segments at least this large take the single-copy path on shared-memory links (each process announces its own at connect time; the receiver reads by the sender's). Below it, two copies through the ring pipelined over both cores are faster (measured: 1 MiB all-reduces 0.25 ms against 0.35 ms with 256K). The ring all-reduce never takes it: its receiver combines each piece where it lies in the ring, and the single copy costs about twice a memory copy's time for pinning the sender's pages (measured, 2 ranks, 64 MiB: 9-12 ms through the ring against 12-16 ms).";
        shm_flat_max: u64 = PARALLEL_SHM_FLAT_MAX, Bytes { min: 0, max: 16 * MIB }, "16K",
            "Shared-memory fast path: when every rank of a tree runs on this host (and PARALLEL_SHM=1), all-reduces (built-in ops), broadcasts and barriers of at most this many bytes go through one shared-memory region (each rank writes its slot, waits for the others' and reduces them itself, in rank order) instead of the control pass and the ring. 0 turns it off. The smallest value of all ranks applies; the region holds 2 x this x ranks bytes. Measured with 2 ranks from Python on a 2-core VM: 4 KiB 8.7 us against 14.7 us by the pass. Larger buffers gain only while the waiters spin instead of sleeping (1 MiB: 0.10 ms spinning, 0.53 ms when the waits end in the kernel, against 0.27-0.31 ms by the ring), so the default stops at 16K.";
        spin: Duration = PARALLEL_SPIN_US, Micros { min: 0, max: 1_000_000 }, "250",
            "Longest spin, in microseconds, of a waiting thread before it sleeps in the kernel. A waiter spins only while a core is free for it (runnable threads no more than cores) and spins less after spins that did not pay, so a loaded machine does not pay for it; a process with no CPU to spare beside the waiter (a rank bound to one CPU) spins giving its CPU away at every check (sched_yield); 0 never spins. The default covers what a kernel sleep and wake-up costs on a virtual machine (about 0.25 ms here): ranks that arrive up to that far apart meet without a wake-up (measured, 2 ranks, 1 MiB all-reduces 1 ms apart: 123-138 us per launch against 207-363 us with 50; back to back and under load no change beyond noise, CPU per op the same).";
        spread: bool = PARALLEL_SPREAD, Bool, "1",
            "Move a waiting thread off the CPU of the process it waits for when both share one CPU, spinning did not serve the wait (its spin ran out, or was skipped after spins that did) and a core is free (shared-memory rings and the small-message fast path): for an instant its affinity leaves out that CPU, preferring its NUMA node, then the mask it had is set back. At most one try per 10 ms per thread; a thread that may run on one CPU only never moves. Two ranks that hand messages back and forth can otherwise stay together on one CPU while another idles: measured, 2 ranks forced onto one CPU, 4 KiB all-reduces at 12-141 us instead of 4-5 us in half the launches. Where every core is busy the opposite: on the Tree's small-message fast path between two ranks, a waiter moves onto the CPU the other rank last published from (the two then hand off on one CPU without preempting compute threads; measured, 2 ranks each with a busy compute thread, 2000 4 KiB all-reduces per launch: a p99 of 1.2-4.1 ms in 5 of 16 launches without it, in 2 of 30 with it). 0: never move a thread.";
        secret_env: Option<Secret> = PARALLEL_SECRET, Secret, "",
            "Shared secret. When set (here or through PARALLEL_SECRET_FILE), every connection is authenticated by HMAC-SHA256 challenge-response in both directions; the secret never crosses the wire.";
        secret_file: Option<String> = PARALLEL_SECRET_FILE, SecretFile, "",
            "Path of a file whose contents (trailing newline removed) are the shared secret. Takes precedence over PARALLEL_SECRET.";
        pool_bytes: u64 = PARALLEL_POOL_BYTES, Bytes { min: 0, max: 1 << 44 }, "1G",
            "Most bytes of idle receive buffers the pool keeps for reuse (pre-faulted, huge-page advised, locked where allowed).";
        mlock: bool = PARALLEL_MLOCK, Bool, "1",
            "Try to mlock pooled buffers. Failures (RLIMIT_MEMLOCK) are ignored after one log line.";
        chunk: usize = PARALLEL_CHUNK, Bytes { min: 4 * KIB, max: GIB }, "4M",
            "Largest single socket read or write; bounds the time one operation holds a link.";
        algo: String = PARALLEL_ALGO, Choice(&["auto", "tree", "ring"]), "auto",
            "All-reduce algorithm: `tree` (reduce up the topology tree, result back down; fewest hops), `ring` (pipelined reduce-scatter + all-gather; least data per link), `auto` (ring from PARALLEL_RING_THRESHOLD bytes on). Must be the same on every rank.";
        ring_threshold: u64 = PARALLEL_RING_THRESHOLD, Bytes { min: 0, max: 1 << 50 }, "256K",
            "With PARALLEL_ALGO=auto, all-reduces of at least this many bytes take the ring. Must be the same on every rank.";
        collective_chunk: u64 = PARALLEL_COLLECTIVE_CHUNK, Bytes { min: 4 * KIB, max: GIB }, "8M",
            "Largest pipeline chunk of the ring all-reduce (the ring cuts each rank's segment in about 4 chunks, at least 256 KiB, at most this) and the chunk of the hierarchical all-reduce inside a host. Measured over shared memory, 2 ranks, 64 MiB, alternating launches: 9.1-11.7 ms with 8M, 9.6-12.8 ms with 4M, 10.3-10.5 ms with 2M (no size clearly better; before the ring's chunks went through the link's ring, 14.7-15.5 ms with 8M against 14.9-25.5 ms with 1M).";
        workqueue_capacity: usize = PARALLEL_WORKQUEUE_CAPACITY, Int { min: 2, max: 1 << 24 }, "1024",
            "Items each direction of a work queue (and a pool's job queue) holds before writers wait for readers (back-pressure).";
        workqueue_arena: u64 = PARALLEL_WORKQUEUE_ARENA, Bytes { min: MIB, max: 1 << 44 }, "16G",
            "Address space of the shared-memory arena behind a work queue that other processes open. Only the pages items use are committed; freed blocks are reused (and stay faulted in). Writers wait for readers to free blocks when it is full.";
        cuda: bool = PARALLEL_CUDA, Bool, "1",
            "Use CUDA when a driver (libcuda) is found. 0: behave as on a machine without a GPU (CUDA tensors are refused with a clear error). The library is looked for once, with dlopen, before any CUDA call.";
        cuda_ipc: bool = PARALLEL_CUDA_IPC, Bool, "1",
            "Send CUDA tensors between processes of one host by CUDA IPC (memory and event handles; the receiver copies device to device) when both ends have CUDA and share a shared-memory link. 0: stage them through pinned host memory like across hosts.";
        cuda_ipc_threshold: u64 = PARALLEL_CUDA_IPC_THRESHOLD, Bytes { min: 0, max: 1 << 40 }, "1M",
            "Messages whose CUDA tensors add up to at least this many bytes go by CUDA IPC (when the link allows it); smaller ones are staged through the shared-memory ring, which is faster for them (no mapping to open) and lets `send` return before the peer receives.";
        cuda_ipc_cache: usize = PARALLEL_CUDA_IPC_CACHE, Int { min: 0, max: 4096 }, "0",
            "Peer allocations a receiver keeps mapped after a CUDA IPC copy (least recently used are closed first). 0: every mapping is closed right after its copy, as CUDA requires before the sender may free the memory. More saves the mapping cost (about 0.1-1 ms) on repeated transfers from the same allocation, but then a sender must not return that memory to the driver (torch.cuda.empty_cache) while a peer may hold it mapped.";
        cuda_chunk: usize = PARALLEL_CUDA_CHUNK, Bytes { min: 64 * KIB, max: GIB }, "4M",
            "Pipeline chunk of staged CUDA transfers: the device-to-host copy of chunk k+1 overlaps the send of chunk k (and the host-to-device copy of chunk k the receive of chunk k+1).";
        cuda_staging: usize = PARALLEL_CUDA_STAGING, Int { min: 2, max: 64 }, "4",
            "Pinned host buffers of PARALLEL_CUDA_CHUNK bytes each staged transfer cycles through (per direction, per thread; allocated on first use and kept).";
        nvrtc_lib: String = PARALLEL_NVRTC_LIB, Text, "",
            "Path of libnvrtc for the GPU reduction kernels. Empty: the loader's path (libnvrtc.so.13, .12), then the NVIDIA wheels next to torch (`nvidia/*/lib`), found by torch_parallel.";
    }
    tree {
        Option<u64> = PARALLEL_RANK, Int { min: 0, max: MAX_RANKS }, "",
            "This process's rank in a tree (else RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK, PMI_RANK, PMIX_RANK; unset everywhere: the root assigns ranks in arrival order).";
        Option<u64> = PARALLEL_WORLD_SIZE, Int { min: 1, max: MAX_RANKS }, "",
            "Number of ranks in a tree (else WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE, PMI_SIZE).";
        Option<String> = PARALLEL_ROOT, Text, "",
            "host:port where rank 0 listens for the rendezvous (else MASTER_ADDR:MASTER_PORT outside torchrun, or the first host of SLURM_JOB_NODELIST with MASTER_PORT, default port 29500). Not used by a tree that meets through a store (under torchrun from Python, or given one).";
        Option<String> = PARALLEL_IFNAME, Text, "",
            "Network interface whose IPv4 address a rank listens on for its tree links (and rank 0 for a rendezvous through a store). Empty: the interface that routes to the root (rank 0 through a store: every interface, its addresses published best first).";
    }
    launcher {
        Option<u64> = RANK, Int { min: 0, max: MAX_RANKS }, "",
            "torchrun: this process's rank (after PARALLEL_RANK).";
        Option<u64> = WORLD_SIZE, Int { min: 1, max: MAX_RANKS }, "",
            "torchrun: the number of ranks (after PARALLEL_WORLD_SIZE).";
        Option<String> = MASTER_ADDR, Text, "",
            "torchrun: the root's host, with MASTER_PORT (after PARALLEL_ROOT).";
        u64 = MASTER_PORT, Int { min: 1, max: 65535 }, "29500",
            "torchrun: the root's port, with MASTER_ADDR or SLURM_NODELIST. Under torchrun (TORCHELASTIC_RUN_ID set) it is the launcher's TCPStore: a tree never binds it, but meets through that store (Python) or fails with a Config error (Rust without a store).";
        Option<String> = TORCHELASTIC_RUN_ID, Text, "",
            "torchrun: set in every worker; marks MASTER_ADDR:MASTER_PORT as the launcher's store, not a free port.";
        Option<bool> = TORCHELASTIC_USE_AGENT_STORE, Bool, "",
            "torchrun: `True` when the agent hosts the TCPStore at MASTER_ADDR:MASTER_PORT (every worker is a client of it; torch_parallel.tree() then uses it as a client).";
        Option<u64> = LOCAL_RANK, Int { min: 0, max: MAX_RANKS }, "",
            "torchrun: this process's index among the processes of its node; with LOCAL_WORLD_SIZE it picks the reactors' share of the cores (PARALLEL_PIN).";
        Option<u64> = LOCAL_WORLD_SIZE, Int { min: 1, max: MAX_RANKS }, "",
            "torchrun: processes per node; with GROUP_RANK it names the node of a rank that never arrives.";
        Option<u64> = GROUP_RANK, Int { min: 0, max: MAX_RANKS }, "",
            "torchrun: this node's index among the nodes (see LOCAL_WORLD_SIZE).";
        Option<u64> = SLURM_PROCID, Int { min: 0, max: MAX_RANKS }, "",
            "SLURM: this process's rank (after PARALLEL_RANK, RANK).";
        Option<u64> = SLURM_NTASKS, Int { min: 1, max: MAX_RANKS }, "",
            "SLURM: the number of ranks (after PARALLEL_WORLD_SIZE, WORLD_SIZE).";
        Option<String> = SLURM_JOB_NODELIST, Text, "",
            "SLURM: the job's hosts in hostlist syntax (`node[01-04,07],gpu-a[1-2]`); its first host is the root (after PARALLEL_ROOT, MASTER_ADDR), with MASTER_PORT; with SLURM_TASKS_PER_NODE it names the host of a rank that never arrives.";
        Option<String> = SLURM_NODELIST, Text, "",
            "SLURM: the older name of SLURM_JOB_NODELIST (read when that is unset).";
        Option<String> = SLURM_TASKS_PER_NODE, Text, "",
            "SLURM: tasks on each host of the node list (`2(x3),1`); ranks are mapped to hosts in blocks (SLURM's default distribution), for error messages only.";
        Option<u64> = OMPI_COMM_WORLD_RANK, Int { min: 0, max: MAX_RANKS }, "",
            "Open MPI: this process's rank (after PARALLEL_RANK, RANK, SLURM_PROCID).";
        Option<u64> = OMPI_COMM_WORLD_SIZE, Int { min: 1, max: MAX_RANKS }, "",
            "Open MPI: the number of ranks (after PARALLEL_WORLD_SIZE, WORLD_SIZE, SLURM_NTASKS).";
        Option<u64> = PMI_RANK, Int { min: 0, max: MAX_RANKS }, "",
            "PMI (MPICH, Intel MPI): this process's rank (after the above).";
        Option<u64> = PMI_SIZE, Int { min: 1, max: MAX_RANKS }, "",
            "PMI: the number of ranks (after the above).";
        Option<u64> = PMIX_RANK, Int { min: 0, max: MAX_RANKS }, "",
            "PMIx: this process's rank (after the above).";
    }
}

"""All-reduce benchmark: Parallel's Tree (torch_parallel) against gloo and Open MPI, in one run.

All-reduce (sum, float32, every rank ends with the sum) with p ranks on this machine (default p=2):
    gloo       torch.distributed gloo, dist.all_reduce(t) in place, init_method tcp://127.0.0.1:PORT
    mpi        Open MPI via mpi4py, comm.Allreduce(src, dst, op=MPI.SUM) on numpy buffers, launched
               as `mpirun --allow-run-as-root --oversubscribe -np P python ...` (default BTLs: the
               shared-memory one between ranks of one host), as MPI's own benchmarks do
    ours_shm   tree = torch_parallel.tree(rank=r, world_size=p, root="127.0.0.1:PORT");
               tree.all_reduce(t) in place; links: shared memory (the default on one host)
    ours_tcp   the same with PARALLEL_SHM=0 in every rank (set before torch_parallel is imported)
    floor      the memory-traffic floor of our shm ring: p NumPy processes doing exactly the reads
               and writes of their rank in the ring, nothing else (below), at the sizes that run
               as a ring (>= 256 KiB); and per size its one-process variant
    tcp_raw    our TCP ring's traffic over plain sockets: p Python processes, each sending its
               segment of every ring step to its right neighbour (socket.sendall, in a thread)
               while it receives its left neighbour's (recv_into, 256 KiB pieces) and adds it with
               NumPy (reduce-scatter) or receives it in place (all-gather); the same segments, in
               the same order, as ours, without framing, at 4 MiB and above: what the kernel's TCP
               costs for the bytes our ring moves, the reference for ours_tcp
Sizes: 4 KiB, 1 MiB and 64 MiB (the figures the targets speak of), and for the plot the sweep
4 KiB .. 64 MiB in powers of 4.

The memory-traffic floor. Our shm all-reduce at 64 MiB is the ring (collectives/src/algorithms/
ring.rs): the buffer is cut into p segments of s = n/p bytes; in each of the p-1 reduce-scatter
steps a rank receives one segment of its left neighbour in chunks (up to 8 MiB) and reduces it
into its tensor, in each of the p-1 all-gather steps it receives one reduced segment into its
tensor. Every chunk crosses the shm link through its ring (PARALLEL_SHM_RING, 4 MiB): the
sender copies it in, and the receiver combines (or copies) each piece where it lies in the ring,
so per rank and all-reduce our ring
    reduce-scatter step: reads s of its tensor, writes s into the ring (the send); reads s of
                         the ring and s of its tensor, writes s to its tensor (the receive)
    all-gather step:     reads s of its tensor, writes s into the ring; reads s of the ring,
                         writes s to its tensor
    total: reads 5(p-1)s, writes 4(p-1)s   (64 MiB, p=2: 160 + 128 MiB per rank)
of which the ring's 2(p-1)s + 2(p-1)s stay in the caches (the ring is smaller than the L3). The
minimum of this algorithm reads the neighbour's memory where it lies and writes each result once:
    reduce-scatter step: own[g] += left[g]   reads 2s, writes s
    all-gather step:     own[g]  = left[g]   reads s, writes s
    total: reads 3(p-1)s, writes 2(p-1)s   (64 MiB, p=2: 96 + 64 MiB per rank)
which is the same memory traffic as ours: what ours adds is the copies through the ring, in
cache, and the work of its two threads' hand-offs. (A cross-memory copy, process_vm_readv from the
sender's tensor, saves the sender's copy but costs the receiver about twice a memory copy's time
on this VM, for pinning the sender's pages: our ring used it for chunks of 1 MiB or more until
it measured 1.5-1.7x the floor at 64 MiB.) (A different
algorithm could do less for p > 2: reducing all p inputs of a segment in one pass reads n and
writes s instead of the ring's 2(p-1)s and (p-1)s; the floor is our ring's.) The floor system
does exactly that: p processes, started like the other systems' ranks, each with its float32
buffer in a file in /dev/shm (mapped by its neighbour too), run per reduce-scatter step
np.add(own, left, out=own) and per all-gather step np.copyto(own, left) over the same segments
and chunks as our ring, with a barrier (a generation counter per rank on a shared page, waited
for by spinning with sched_yield) before each step and one at the end. It is measured like the
others (checked sum, warm-up, timed ops on rank 0, reps interleaved with the other systems). Per
size, after the timed ops, rank 0 then does its share alone, without barriers, while the other
ranks sleep: the one-process floor (one core's memory traffic without the others'). The report
gives both, ours_shm / floor (also per rep: the floor is launched right after ours_shm in every
rep), and the target: 64 MiB within 1.2x the floor of the same run. On the 2-vCPU VM this was
written on, the floor itself moves from launch to launch: at 64 MiB 7.2-8.9 ms in 14 of 17
launches and 15.8-18.5 ms in 3, at 1 MiB 80-90 us in most and 380-450 us in 4 of 16, steady
inside a launch, while the one-process floor stayed at 5.6-7.4 ms in every launch: what changes
is what the two ranks cost each other when both stream at once: where the host has the two
vCPUs. The core-to-core probe (benches/probes/core_rtt.c) measures that right before and right
after every launch of every system: a cache line's round trip of about 50 ns while they share a
last-level cache ("near"), 310-345 ns while not ("apart"); 1 MiB all-reduces of every system
(ours, Open MPI, the floor) take several times longer apart. The report gives each launch's
state. Hence the per-rep ratios: ours/floor means most where adjacent launches agree.

Method (as research/peer-baselines/gloo_bench.py): per size, one all-reduce of rank-dependent
data checked on every rank (each element must equal p(p+1)/2), then the buffer is zeroed (so the
repeated in-place sums stay finite), warm-up ops (at least 8 MiB of traffic), a barrier, then
the timed ops, each timed alone on rank 0 (time.perf_counter around the call; the collective
itself synchronises). Per size: median, p10 and p90 of the per-op times; algbw = n/t,
busbw = algbw * 2(p-1)/p (nccl-tests), 1 GB/s = 1e9 B/s. --reps fresh sets of processes per
system, systems interleaved; the figure is the median of the per-rep medians (range = min..max
of them), p10/p90 pool every timed op of rank 0.

Every rank is a separate process started with subprocess (mpirun for mpi; this orchestrating
process imports neither torch_parallel nor torch), each in its own session; every launch has a
deadline after which its process group and every rank (by the pid it wrote) is terminated, then
killed; every rank also arms SIGALRM a little after that deadline, and mpirun gets --timeout.

Usage:
  .venv/bin/python benches/allreduce.py                      # full run (1-2 minutes)
  .venv/bin/python benches/allreduce.py --quick              # smoke run, < 90 s
  .venv/bin/python benches/allreduce.py --only ours_shm,gloo --world 3
  .venv/bin/python benches/allreduce.py --only ours_shm,floor --sizes 1MiB,64MiB   # ours vs the floor
  .venv/bin/python benches/allreduce.py --load 1             # under load: see benches/_load.py
Peers and the plot need `bash scripts/bench-setup.sh` (Open MPI, mpi4py, matplotlib); a missing
peer is reported as skipped. Writes --json (default bench-out/allreduce.json), --md (default
bench-out/allreduce.md) and --png (default bench-out/allreduce.png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import _load
from _common import (
    CORE_RTT_NEAR_NS,
    HOST,
    cmd,
    core_probe,
    core_record,
    cpu_seconds,
    cpu_stall_us,
    fmt_core,
    free_port,
    pct,
    read_text,
    run_probe,
    stop_ranks,
    tail,
)
from _common import machine_info as base_machine_info

KiB = 1 << 10
MiB = 1 << 20
SCRIPT = os.path.abspath(__file__)

# The sweep: 4 KiB .. 64 MiB in powers of 4. HEADLINE: the sizes of the targets.
SIZES = {
    "4KiB": 4 * KiB,
    "16KiB": 16 * KiB,
    "64KiB": 64 * KiB,
    "256KiB": 256 * KiB,
    "1MiB": MiB,
    "4MiB": 4 * MiB,
    "16MiB": 16 * MiB,
    "64MiB": 64 * MiB,
}
HEADLINE = ("4KiB", "1MiB", "64MiB")
# Timed ops per size (the peers' scripts: 500 / 100 / 15 for 4 KiB / 1 MiB / 64 MiB).
ITERS = {
    "4KiB": 500,
    "16KiB": 400,
    "64KiB": 300,
    "256KiB": 200,
    "1MiB": 100,
    "4MiB": 50,
    "16MiB": 25,
    "64MiB": 15,
}
ITERS_QUICK = {
    "4KiB": 200,
    "16KiB": 100,
    "64KiB": 100,
    "256KiB": 50,
    "1MiB": 40,
    "4MiB": 15,
    "16MiB": 8,
    "64MiB": 5,
}

WARM_BYTES = 8 * MiB

# The floor right after ours_shm: in every rep the two launches run back to back.
# tcp_raw likewise right after ours_tcp.
SYSTEMS = ("gloo", "mpi", "ours_shm", "floor", "ours_tcp", "tcp_raw")
OURS = ("ours_shm", "ours_tcp")
PEERS = ("gloo", "mpi")
ALIASES = {"ours": list(OURS), "peers": list(PEERS), "shm": ["ours_shm"], "tcp": ["ours_tcp"]}
LABEL = {
    "gloo": "torch.distributed gloo (TCP)",
    "mpi": "Open MPI (mpi4py, shared memory)",
    "ours_shm": "ours, shared memory",
    "ours_tcp": "ours, TCP",
    "floor": "memory-traffic floor of our ring (NumPy, one process per rank, shared memory)",
    "tcp_raw": "our ring's TCP traffic over plain sockets (sendall in a thread, recv_into + NumPy add)",
}
# The floor is measured at the sizes our shm all-reduce runs as a ring (PARALLEL_RING_THRESHOLD's
# default; below it the control pass or the flat region carry the data, not the ring).
FLOOR_MIN = 256 * KiB
TARGET_VS_FLOOR = 1.2
# tcp_raw from 4 MiB: below it, its Python thread hand-off per step (tens of us) is what it measures.
TCP_RAW_MIN = 4 * MiB
# The pieces tcp_raw receives and adds, as our streamed receive's (engine/src/link/recv.rs PIECE).
PIECE = 256 * KiB

# The targets of our issue (p=2) and the anchors measured on this machine
# (research/performance-anchors.md, section 0).
TARGET_64M_VS_GLOO = 0.45
TARGET_64M_TCP_VS_GLOO = 0.6
ANCHOR_GLOO_64M_S = 65.8e-3
ANCHOR_MPI_4K_S = 8.4e-6
TARGET_4K_ABS_S = 10e-6


# ----------------------------------------------------------------------------------------------
# children: one rank each


def warmup(nbytes, iters):
    """Warm-up ops: a tenth of the timed ones as the peers' scripts, and at least WARM_BYTES of
    traffic (at most 2000 ops), so that one-time costs are out of the timed loop: our shared-memory
    ring (PARALLEL_SHM_RING, 4 MiB) is faulted in page by page during its first pass, which costs
    about 8 us per 4 KiB all-reduce for the first ~1000 of them."""
    return max(3, iters // 10, min(2000, WARM_BYTES // nbytes))


def bench_sizes(rank, world, cfg, alloc, fill, op, check, barrier, counters=None):
    """The measurement loop every system shares. alloc(nbytes) -> buffer; fill(buf, value);
    op(buf) = one all-reduce; check(buf, expected) -> bool (the result, every element);
    barrier(); counters() -> {name: count} (optional), whose growth over the timed ops is kept.
    Returns {size label: stats} with this rank's samples."""
    out = {}
    expected = float(world * (world + 1) // 2)
    for label in cfg["sizes"]:
        nbytes = SIZES[label]
        iters = cfg["iters"][label]
        warm = warmup(nbytes, iters)
        buf = alloc(nbytes)
        fill(buf, float(rank + 1))
        op(buf)
        ok = bool(check(buf, expected))
        fill(buf, 0.0)
        for _ in range(warm):
            op(buf)
        barrier()
        pc = time.perf_counter
        lat = []
        c0 = counters() if counters else {}
        cpu0 = cpu_seconds()
        for _ in range(iters):
            t0 = pc()
            op(buf)
            lat.append(pc() - t0)
        cpu = cpu_seconds() - cpu0
        c1 = counters() if counters else {}
        s = sorted(lat)
        out[label] = {
            "bytes": nbytes,
            "iters": iters,
            "warmup": warm,
            "verified": ok,
            "samples_s": lat,
            "median_s": statistics.median(s),
            "p10_s": pct(s, 0.1),
            "p90_s": pct(s, 0.9),
            "min_s": s[0],
            "cpu_s_per_op": cpu / iters,
            "counters": {k: c1[k] - c0.get(k, 0) for k in c1},
        }
        del buf
    return out


def child_gloo(rank, world, cfg):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{HOST}:{cfg['port']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=cfg["t_op"]),
    )
    res = bench_sizes(
        rank,
        world,
        cfg,
        alloc=lambda n: torch.empty(n // 4, dtype=torch.float32),
        fill=lambda t, v: t.fill_(v),
        op=lambda t: dist.all_reduce(t),
        check=lambda t, e: torch.all(t == e).item(),
        barrier=dist.barrier,
    )
    dist.barrier()
    dist.destroy_process_group()
    return {"sizes": res, "version": torch.__version__}


def child_mpi(rank, world, cfg):
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD

    def alloc(n):
        return (np.empty(n // 4, dtype=np.float32), np.empty(n // 4, dtype=np.float32))

    def fill(b, v):
        b[0].fill(v)
        b[1].fill(-1.0)

    res = bench_sizes(
        rank,
        world,
        cfg,
        alloc=alloc,
        fill=fill,
        op=lambda b: comm.Allreduce(b[0], b[1], op=MPI.SUM),
        check=lambda b, e: np.all(b[1] == e),
        barrier=comm.Barrier,
    )
    comm.Barrier()
    import mpi4py

    return {
        "sizes": res,
        "version": f"mpi4py {mpi4py.__version__}; {MPI.Get_library_version().splitlines()[0]}",
    }


def child_ours(rank, world, cfg):
    import torch

    import torch_parallel as parallel

    torch.set_num_threads(1)
    tree = parallel.tree(rank=rank, world_size=world, root=f"{HOST}:{cfg['port']}", timeout=cfg["t_op"])
    res = bench_sizes(
        rank,
        world,
        cfg,
        alloc=lambda n: torch.empty(n // 4, dtype=torch.float32),
        fill=lambda t, v: t.fill_(v),
        op=lambda t: tree.all_reduce(t),
        check=lambda t, e: torch.all(t == e).item(),
        barrier=tree.barrier,
        # How the waits went (spun and paid, or slept in the kernel): what tells a fast launch
        # from a slow one.
        counters=parallel.wait_stats,
    )
    tree.barrier()
    links = sorted({str(s.get("link")) for s in tree.stats()})
    return {
        "sizes": res,
        "links": links,
        "plan": tree.plan(),
        "stats": tree.stats(),
        "version": getattr(parallel, "__version__", None),
        "config": {
            k: v
            for k, v in parallel.config().items()
            if k
            in (
                "PARALLEL_SHM",
                "PARALLEL_SHM_CMA",
                "PARALLEL_SPIN_US",
                "PARALLEL_SPREAD",
                "PARALLEL_ALGO",
                "PARALLEL_RING_THRESHOLD",
                "PARALLEL_COLLECTIVE_CHUNK",
                "PARALLEL_SHM_RING",
            )
        },
        "io_backend": parallel.io_backend(),
    }


# The memory-traffic floor: our ring's minimal reads and writes, done by NumPy in shared memory.
# Our ring's chunking (collectives/src/algorithms/ring.rs, Chunking::Host) with the default
# PARALLEL_COLLECTIVE_CHUNK (8 MiB): at least ~4 chunks per segment, 256 KiB .. 8 MiB each.
RING_CHUNK_MAX = 8 * MiB
RING_CHUNK_MIN = 256 * KiB


def ring_segments(count, p):
    """Element ranges of the ring's p segments (the first count % p one element longer)."""
    base, extra = divmod(count, p)
    return [(s * base + min(s, extra), s * base + min(s, extra) + base + (s < extra)) for s in range(p)]


def ring_chunk_elems(nbytes, p, item=4):
    return max(1, max(RING_CHUNK_MIN, min(nbytes // p // 4, RING_CHUNK_MAX)) // item)


class SpinBarrier:
    """A barrier of the floor's ranks on a shared counter page: each rank stores its generation
    in its own 64-byte slot and waits until every slot holds it (spinning with sched_yield, or
    sleeping 1 ms between looks when spin=False), for at most `timeout` seconds."""

    def __init__(self, ctl, rank, world, timeout):
        self.ctl, self.rank, self.world, self.timeout, self.gen = ctl, rank, world, timeout, 0

    def wait(self, spin=True):
        self.gen += 1
        g, ctl = self.gen, self.ctl
        ctl[self.rank * 8] = g
        t_end = time.monotonic() + self.timeout
        for i in range(self.world):
            while ctl[i * 8] < g:
                if time.monotonic() > t_end:
                    raise TimeoutError(
                        f"floor rank {self.rank}: rank {i} did not reach barrier {g} within "
                        f"{self.timeout:.0f} s (did it fail? see its log)"
                    )
                if spin:
                    os.sched_yield()
                else:
                    time.sleep(0.001)


def child_floor(rank, world, cfg):
    """One rank of the floor: the reads and writes of its rank in our ring all-reduce, and
    nothing else, with NumPy on float32 buffers in shared memory (files in /dev/shm, one per
    rank and size). Reduce-scatter step s: own[g] += left[g] for g = segment (rank - s - 1) mod
    p; all-gather step s: own[g] = left[g] for g = segment (rank - s) mod p; chunk by chunk as
    our ring cuts them; a barrier before each step and one at the end, so the sum is exact and
    checked like the others'. Then, per size, the one-process variant: rank 0 alone does its
    share (no barriers) while the others sleep."""
    import mmap

    import numpy as np

    d = cfg["shm_dir"]
    with open(os.path.join(d, "ctl"), "r+b") as f:
        ctl_map = mmap.mmap(f.fileno(), 64 * world)
    bar = SpinBarrier(np.frombuffer(ctl_map, dtype=np.int64), rank, world, cfg["t_op"])
    left = (rank - 1) % world

    def path(r, nbytes):
        return os.path.join(d, f"buf-{r}-{nbytes}")

    class Buffers:
        def __init__(self, nbytes):
            self.nbytes = nbytes
            with open(path(rank, nbytes), "w+b") as f:
                f.truncate(nbytes)
                self.own_map = mmap.mmap(f.fileno(), nbytes)
            self.own = np.frombuffer(self.own_map, dtype=np.float32)
            self.steps = None

        def plan(self):
            """The (destination, source, reduce) chunks of each step; the left neighbour's
            buffer exists once a barrier has passed after every rank's alloc."""
            with open(path(left, self.nbytes), "rb") as f:
                self.left_map = mmap.mmap(f.fileno(), self.nbytes, prot=mmap.PROT_READ)
            peer = np.frombuffer(self.left_map, dtype=np.float32)
            segs = ring_segments(self.own.size, world)
            ce = ring_chunk_elems(self.nbytes, world)
            steps = []
            for phase, shift in ((True, 1), (False, 0)):
                for s in range(world - 1):
                    a, b = segs[(rank - s - shift) % world]
                    cuts = [(x, min(x + ce, b)) for x in range(a, b, ce)]
                    steps.append([(self.own[x:y], peer[x:y], phase) for x, y in cuts])
            self.steps = steps

    def run_steps(steps, sync):
        for step in steps:
            if sync:
                bar.wait()
            for dst, src, reduce in step:
                if reduce:
                    np.add(dst, src, out=dst)
                else:
                    np.copyto(dst, src)
        if sync:
            bar.wait()

    def op(b):
        if b.steps is None:
            bar.wait()
            b.plan()
        run_steps(b.steps, True)

    out = {}
    for label in cfg["sizes"]:
        bufs = []

        def alloc(n, bufs=bufs):
            bufs.append(Buffers(n))
            return bufs[-1]

        res = bench_sizes(
            rank,
            world,
            dict(cfg, sizes=[label]),
            alloc=alloc,
            fill=lambda b, v: b.own.fill(v),
            op=op,
            check=lambda b, e: np.all(b.own == e),
            barrier=bar.wait,
        )[label]
        # The one-process variant: rank 0 does its share alone; the others sleep in the barrier.
        b = bufs[0]
        iters = cfg["iters"][label]
        bar.wait()
        if rank == 0:
            pc, lat = time.perf_counter, []
            for _ in range(res["warmup"]):
                run_steps(b.steps, False)
            for _ in range(iters):
                t0 = pc()
                run_steps(b.steps, False)
                lat.append(pc() - t0)
            s = sorted(lat)
            res["solo"] = {"iters": iters, "median_s": statistics.median(s), "p10_s": pct(s, 0.1)}
            res["solo"] |= {"p90_s": pct(s, 0.9), "min_s": s[0]}
        bar.wait(spin=rank == 0)
        os.unlink(path(rank, b.nbytes))  # the others' mappings stay valid
        out[label] = res
    bar.wait()
    return {"sizes": out, "version": f"numpy {np.__version__}"}


def child_tcp_raw(rank, world, cfg):
    """One rank of tcp_raw: our ring's TCP traffic over plain sockets, nothing else. A socket to
    the right neighbour and one from the left (ports published as files next to the barrier
    page); per step of our ring, a sender thread sends this rank's segment (one sendall) while
    this thread receives the left neighbour's segment: in 256 KiB pieces (recv_into) added into
    the buffer with NumPy in the reduce-scatter, straight into the buffer in the all-gather.
    Barriers as the floor's; the sum is checked like the others'."""
    import mmap
    import queue
    import socket
    import threading

    import numpy as np

    d, t_op = cfg["shm_dir"], cfg["t_op"]
    with open(os.path.join(d, "ctl"), "r+b") as f:
        ctl_map = mmap.mmap(f.fileno(), 64 * world)
    bar = SpinBarrier(np.frombuffer(ctl_map, dtype=np.int64), rank, world, t_op)
    ls = socket.create_server((HOST, 0))
    with open(os.path.join(d, f".port-{rank}"), "w") as f:
        f.write(str(ls.getsockname()[1]))
    os.replace(os.path.join(d, f".port-{rank}"), os.path.join(d, f"port-{rank}"))
    bar.wait()
    with open(os.path.join(d, f"port-{(rank + 1) % world}")) as f:
        tx = socket.create_connection((HOST, int(f.read())), timeout=t_op)
    ls.settimeout(t_op)
    rx, _ = ls.accept()
    for sk in (tx, rx):
        sk.settimeout(t_op)
        sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    done: queue.SimpleQueue = queue.SimpleQueue()

    def sender():
        while (mv := jobs.get()) is not None:
            try:
                tx.sendall(mv)
                done.put(None)
            except Exception as e:  # reported by the step that waits for it
                done.put(e)

    threading.Thread(target=sender, daemon=True).start()
    piece = np.empty(PIECE // 4, dtype=np.float32)
    pv = memoryview(piece).cast("B")

    def recv_full(mv):
        got = 0
        while got < len(mv):
            k = rx.recv_into(mv[got:])
            if k == 0:
                raise ConnectionError(f"tcp_raw rank {rank}: the left neighbour closed its socket")
            got += k

    def op(own):
        ob = memoryview(own).cast("B")
        segs = ring_segments(own.size, world)
        for reduce, shift in ((True, 1), (False, 0)):
            for s in range(world - 1):
                ra, rb = segs[(rank - s - shift) % world]
                sa, sb = segs[(rank - s - shift + 1) % world]
                jobs.put(ob[sa * 4 : sb * 4])
                if reduce:
                    for x in range(ra, rb, piece.size):
                        n = min(piece.size, rb - x)
                        recv_full(pv[: n * 4])
                        np.add(own[x : x + n], piece[:n], out=own[x : x + n])
                else:
                    recv_full(ob[ra * 4 : rb * 4])
                if (e := done.get(timeout=t_op)) is not None:
                    raise e

    res = bench_sizes(
        rank,
        world,
        cfg,
        alloc=lambda n: np.empty(n // 4, dtype=np.float32),
        fill=lambda b, v: b.fill(v),
        op=op,
        check=lambda b, e: np.all(b == e),
        barrier=bar.wait,
    )
    bar.wait()
    jobs.put(None)
    return {"sizes": res, "version": f"numpy {np.__version__}"}


def child_main(system, rank_arg, cfg):
    # Belt and braces: the parent kills us at its deadline; if the parent is gone, SIGALRM does.
    signal.alarm(max(1, int(cfg["alarm_s"])))
    rank = rank_arg
    if system == "mpi":
        from mpi4py import MPI

        rank = MPI.COMM_WORLD.Get_rank()
        world = MPI.COMM_WORLD.Get_size()
    else:
        world = cfg["world"]
    d = cfg["out_dir"]
    with open(os.path.join(d, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    fn = {
        "gloo": child_gloo,
        "mpi": child_mpi,
        "ours_shm": child_ours,
        "ours_tcp": child_ours,
        "floor": child_floor,
        "tcp_raw": child_tcp_raw,
    }[system]
    stop_load, t_load = _load.start_load(cfg.get("load", 0), cfg.get("load_kind")), time.monotonic()
    res = fn(rank, world, cfg)
    if cfg.get("load"):
        res["load_ops_per_s"] = stop_load() / (time.monotonic() - t_load)
    res["world"] = world
    res["rank"] = rank
    tmp = os.path.join(d, f".rank-{rank}.json")
    with open(tmp, "w") as f:
        json.dump(res, f, default=str)
    os.replace(tmp, os.path.join(d, f"rank-{rank}.json"))


# ----------------------------------------------------------------------------------------------
# orchestration (parent process)


def launch(system, world, cfg, tmpdir, tag, deadline):
    """Runs one set of ranks of `system`. Returns ({rank: result}, error or None, command,
    CPU pressure: the share of the launch's wall time in which some task waited for a CPU)."""
    out_dir = os.path.join(tmpdir, tag)
    os.makedirs(out_dir)
    cfg = dict(cfg, port=free_port(), out_dir=out_dir, world=world, alarm_s=deadline + 15)
    shm_dir = None
    if system in ("floor", "tcp_raw"):  # buffers, ports, barrier page: removed after the launch
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        shm_dir = tempfile.mkdtemp(prefix=f"parallel-{system}-", dir=where)
        with open(os.path.join(shm_dir, "ctl"), "wb") as f:
            f.write(bytes(64 * world))
        cfg = dict(cfg, shm_dir=shm_dir, sizes=floor_sizes(cfg["sizes"], system))
    env = dict(os.environ)
    env.pop("PARALLEL_SHM", None)
    if system == "ours_tcp":
        env["PARALLEL_SHM"] = "0"
    elif system == "ours_shm":
        env["PARALLEL_SHM"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")
    child = [sys.executable, SCRIPT, "--child", system, "--cfg", json.dumps(cfg)]
    # --bind: rank r on the r-th CPU this process may use (taskset), Open MPI's ranks on one
    # hardware thread each (as ours; its default binds a whole core, two threads with SMT).
    cpus = sorted(os.sched_getaffinity(0))
    if system == "mpi":
        cmds = [
            [
                shutil.which("mpirun") or "mpirun",
                "--allow-run-as-root",
                *(
                    ["--use-hwthread-cpus", "--map-by", "hwthread", "--bind-to", "hwthread"]
                    if cfg.get("bind")
                    else ["--oversubscribe"]
                ),
                "--timeout",
                str(int(deadline) + 5),
                "-np",
                str(world),
                *child,
            ]
        ]
    elif cfg.get("bind"):
        taskset = shutil.which("taskset") or "taskset"
        cmds = [[taskset, "-c", str(cpus[r % len(cpus)]), *child, "--rank", str(r)] for r in range(world)]
    else:
        cmds = [[*child, "--rank", str(r)] for r in range(world)]
    shown = " ".join(c if " " not in c and "{" not in c else "'...'" for c in cmds[0])
    procs, logs = [], []
    stall0, w0 = cpu_stall_us(), time.monotonic()
    try:
        for i, argv in enumerate(cmds):
            log = os.path.join(out_dir, f"log-{i}.txt")
            logs.append(log)
            with open(log, "w") as lf:
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=lf,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        err = None
        t_end = time.monotonic() + deadline
        failed_at = None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now >= t_end:
                err = f"timed out after {deadline:.0f} s"
                break
            bad = [p for p in procs if p.poll() not in (None, 0)]
            if bad:
                failed_at = failed_at or now
                if now - failed_at > 3.0:  # the others would only wait for their timeout
                    break
            time.sleep(0.05)
    finally:
        stop_ranks(procs, out_dir, SCRIPT)
        if shm_dir:
            shutil.rmtree(shm_dir, ignore_errors=True)
    stall1, w1 = cpu_stall_us(), time.monotonic()
    pressure = (stall1 - stall0) / 1e6 / (w1 - w0) if stall0 is not None and stall1 is not None else None
    results = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank-{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[r] = json.load(f)
    codes = [p.returncode for p in procs]
    if err is None and (any(codes) or len(results) < world):
        missing = [r for r in range(world) if r not in results]
        err = f"exit codes {codes}, no result from rank(s) {missing}"
    if err:
        tails = [t for t in (tail(x) for x in logs) if t]
        if tails:
            err += ": " + " | ".join(tails)[-600:]
    return results, err, shown, pressure


def bound_name(path):
    """The --bind report's file next to `path`: its stem with "-bound" ("" stays "")."""
    if not path:
        return path
    head, tail = os.path.split(path)
    stem, ext = os.path.splitext(tail)
    return os.path.join(head, f"{stem}-bound{ext}")


def floor_sizes(sizes, system="floor"):
    least = TCP_RAW_MIN if system == "tcp_raw" else FLOOR_MIN
    return [s for s in sizes if SIZES[s] >= least]


def availability(system, probe, sizes=()):
    if system == "floor":
        if not _has_module("numpy"):
            return "numpy not installed"
        if not floor_sizes(sizes):
            return f"no size of at least {FLOOR_MIN // KiB} KiB selected (the floor is the ring's)"
    if system == "tcp_raw":
        if not _has_module("numpy"):
            return "numpy not installed"
        if not floor_sizes(sizes, system):
            return f"no size of at least {TCP_RAW_MIN // MiB} MiB selected"
    if system == "mpi":
        if not shutil.which("mpirun"):
            return "mpirun not installed (bash scripts/bench-setup.sh)"
        if not _has_module("mpi4py"):
            return "mpi4py not installed (bash scripts/bench-setup.sh)"
    if system == "gloo" and not _has_module("torch"):
        return "torch not installed"
    if system in OURS and "error" in probe:
        return f"torch_parallel not built ({probe['error']})"
    return None


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def summarize(runs, world):
    """Per size: the median of the per-rep medians of rank 0, pooled p10/p90, rates, check."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        last = runs[-1] if runs else {"status": "skipped"}
        return {"status": last.get("status"), "note": last.get("note", "")}
    out = {"status": "ok", "reps_ok": len(ok), "reps": len(runs), "sizes": {}}
    # Where the two CPUs were in each launch (the core-to-core probe right before and after it).
    out["rep_core"] = [r.get("core", {}) for r in ok]
    near = [c.get("state") == "near" for c in out["rep_core"]]
    notes = []
    if len(ok) < len(runs):
        notes.append(f"{len(runs) - len(ok)} of {len(runs)} rep(s) failed: {runs[-1].get('note', '')}"[:300])
    for label in SIZES:
        per = [r["ranks"][0]["sizes"][label] for r in ok if label in r["ranks"][0]["sizes"]]
        if not per:
            continue
        meds = [x["median_s"] for x in per]
        pooled = sorted(s for x in per for s in x["samples_s"])
        nbytes = SIZES[label]
        med = statistics.median(meds)
        algbw = nbytes / med / 1e9
        verified = all(
            rr["sizes"][label]["verified"] for r in ok for rr in r["ranks"].values() if label in rr["sizes"]
        )
        cpu = [
            sum(rr["sizes"][label]["cpu_s_per_op"] for rr in r["ranks"].values() if label in rr["sizes"])
            for r in ok
        ]
        out["sizes"][label] = {
            "bytes": nbytes,
            "iters_per_rep": per[0]["iters"],
            "warmup_per_rep": per[0]["warmup"],
            "median_s": med,
            "rep_medians_s": meds,
            "p10_s": pct(pooled, 0.1),
            "p90_s": pct(pooled, 0.9),
            "min_s": pooled[0],
            "algbw_GBps": algbw,
            "busbw_GBps": algbw * 2 * (world - 1) / world,
            "cpu_s_per_op_all_ranks": statistics.median(cpu),
            "other_ranks_median_s": {
                str(rk): statistics.median(r["ranks"][rk]["sizes"][label]["median_s"] for r in ok)
                for rk in sorted(ok[0]["ranks"])
                if rk != 0
            },
            "verified": verified,
        }
        near_meds = [m for m, n in zip(meds, near, strict=False) if n]
        if near_meds and len(meds) == len(near):
            out["sizes"][label]["near_median_s"] = statistics.median(near_meds)
            out["sizes"][label]["near_reps"] = len(near_meds)
        if any(x.get("counters") for x in per):  # per rep: how rank 0's waits went
            out["sizes"][label]["rep_counters"] = [x.get("counters", {}) for x in per]
        solo = [x["solo"]["median_s"] for x in per if "solo" in x]
        if solo:  # the floor's one-process variant
            out["sizes"][label]["solo_median_s"] = statistics.median(solo)
            out["sizes"][label]["solo_rep_medians_s"] = solo
        if not verified:
            notes.append(f"{label}: WRONG RESULT on some rank")
    last = ok[-1]["ranks"][0]
    for k in ("version", "links", "plan", "config", "io_backend"):
        if k in last:
            out[k] = last[k]
    out["command"] = ok[-1].get("command")
    out["cpu_pressure"] = [r.get("cpu_pressure") for r in ok]
    if notes:
        out["note"] = "; ".join(notes)
    return out


def ratios(rows):
    """Per size, ours / peer of the median times (< 1: ours faster), and ours_shm / floor."""
    out = {}
    for label in SIZES:
        d = {}
        for o in OURS:
            for p in PEERS:
                a, b = _med(rows, o, label), _med(rows, p, label)
                if a is not None and b is not None:
                    d[f"{o}/{p}"] = a / b
        a, f = _med(rows, "ours_shm", label), _med(rows, "floor", label)
        if a is not None and f is not None:
            d["ours_shm/floor"] = a / f
        a, f = _med(rows, "ours_tcp", label), _med(rows, "tcp_raw", label)
        if a is not None and f is not None:
            d["ours_tcp/tcp_raw"] = a / f
        if d:
            out[label] = d
    return out


def _med(rows, name, label):
    r = rows.get(name) or {}
    if r.get("status") != "ok":
        return None
    s = r["sizes"].get(label)
    return s["median_s"] if s else None


def floor_target(rows, world):
    """#14: the 64 MiB shm all-reduce within TARGET_VS_FLOOR of the memory-traffic floor measured
    in this run (at the run's p: the floor is measured with as many processes as ours has ranks)."""
    t, f = _med(rows, "ours_shm", "64MiB"), _med(rows, "floor", "64MiB")
    floor_row = rows.get("floor") or {}
    solo = (floor_row.get("sizes") or {}).get("64MiB", {}).get("solo_median_s")
    item = {
        "target": f"64 MiB, p={world}: ours_shm time <= {TARGET_VS_FLOOR}x the memory-traffic floor"
        " of this run",
        "primary": True,
        "ours_s": t,
        "floor_s": f,
        "floor_one_process_s": solo,
        "limit_this_run_s": f * TARGET_VS_FLOOR if f else None,
    }
    if t is None:
        item["verdict"] = "not measured"
    elif f is None:
        item["verdict"] = "not measured (the floor did not run: add floor to --only)"
    else:
        item["ratio"] = t / f
        item["verdict"] = "met" if t <= item["limit_this_run_s"] else "missed"
        if solo:
            item["ratio_one_process"] = t / solo
        # Each rep launches ours_shm and then the floor: their ratio per rep compares launches
        # seconds apart (this VM's memory traffic changes from launch to launch).
        ours_reps = rows["ours_shm"]["sizes"]["64MiB"]["rep_medians_s"]
        floor_reps = floor_row["sizes"]["64MiB"]["rep_medians_s"]
        if len(ours_reps) == len(floor_reps) > 1:
            item["ratio_per_rep"] = [a / b for a, b in zip(ours_reps, floor_reps, strict=True)]
    return item


def targets(rows, world):
    """The issue's targets: ours_shm against the memory-traffic floor (any p), and the two
    targets for p=2 judged against the peers measured in this run."""
    out = [floor_target(rows, world)] if "ours_shm" in rows or "floor" in rows else []
    if world != 2:
        return out + [
            {
                "target": "peers",
                "verdict": f"n/a (the targets against peers are for p=2; this run: p={world})",
            }
        ]
    g = _med(rows, "gloo", "64MiB")
    for o in OURS:
        t = _med(rows, o, "64MiB")
        # #14's target for TCP is its own (0.6x gloo); the 0.45x one is for the default link.
        bound = TARGET_64M_TCP_VS_GLOO if o == "ours_tcp" else TARGET_64M_VS_GLOO
        item = {
            "target": f"64 MiB, p=2: {o} time <= {bound}x gloo's",
            "primary": True,
            "ours_s": t,
            "gloo_s": g,
            "limit_this_run_s": g * bound if g else None,
            "limit_anchor_s": ANCHOR_GLOO_64M_S * bound,
        }
        if o == "ours_tcp":
            item["tcp_raw_s"] = _med(rows, "tcp_raw", "64MiB")
        if t is None:
            item["verdict"] = "not measured"
        elif g is None:
            item["verdict"] = (
                "met" if t <= item["limit_anchor_s"] else "missed"
            ) + " (vs the anchor; gloo not run)"
        else:
            item["ratio"] = t / g
            item["verdict"] = "met" if t <= item["limit_this_run_s"] else "missed"
        out.append(item)
    m = _med(rows, "mpi", "4KiB")
    for o in OURS:
        t = _med(rows, o, "4KiB")
        item = {
            "target": f"4 KiB, p=2: {o} time <= Open MPI's over shared memory (~10 us)",
            "primary": o == "ours_shm",
            "ours_s": t,
            "mpi_s": m,
            "limit_this_run_s": m,
            "limit_anchor_s": ANCHOR_MPI_4K_S,
        }
        if t is None:
            item["verdict"] = "not measured"
        elif m is None:
            item["verdict"] = ("met" if t <= TARGET_4K_ABS_S else "missed") + " (vs ~10 us; MPI not run)"
        else:
            item["ratio"] = t / m
            item["verdict"] = "met" if t <= m else "missed"
            tn, mn = _near_med(rows, o, "4KiB"), _near_med(rows, "mpi", "4KiB")
            if tn and mn:  # the launches that the core probe found on CPUs sharing a cache
                item["near_ratio"] = tn / mn
        out.append(item)
    return out


def _near_med(rows, system, label):
    r = rows.get(system) or {}
    return ((r.get("sizes") or {}).get(label) or {}).get("near_median_s")


def core_lines(report):
    """Per system, launch by launch: where the two CPUs were, and the headline sizes' medians."""
    L = []
    for n in report["order"]:
        r = report["systems"].get(n) or {}
        reps = r.get("rep_core") or []
        if not reps:
            continue
        cells = []
        for i, c in enumerate(reps):
            # Only sizes every rep measured: rep_medians_s skips reps that lack a size.
            figs = ", ".join(
                f"{k} {fmt_t(r['sizes'][k]['rep_medians_s'][i])}"
                for k in HEADLINE
                if k in r["sizes"] and len(r["sizes"][k]["rep_medians_s"]) == len(reps)
            )
            cells.append(f"{fmt_core(c)}: {figs}")
        L.append(f"- `{n}`: " + "; ".join(cells))
    return L


# ----------------------------------------------------------------------------------------------
# machine description, probe of torch_parallel

PROBE = r"""
import json
out = {}
try:
    import torch_parallel as p
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
else:
    out["version"] = getattr(p, "__version__", None)
    try:
        out["io_backend"] = str(p.io_backend())
    except Exception as e:
        out["io_backend_error"] = f"{type(e).__name__}: {e}"
print("PROBE" + json.dumps(out, default=str))
"""


def probe_ours(timeout=90):
    return run_probe(PROBE, timeout, "import torch_parallel")


def _version(dist):
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info():
    info = base_machine_info()
    for d in ("torch", "numpy", "mpi4py", "matplotlib"):
        info[d] = _version(d)
    mpirun = shutil.which("mpirun")
    info["mpirun"] = (cmd([mpirun, "--version"]).splitlines() or ["?"])[0] if mpirun else "not installed"
    info["cpu_pressure_start"] = (read_text("/proc/pressure/cpu").splitlines() or [""])[0]
    return info


# ----------------------------------------------------------------------------------------------
# report


def fmt_t(s):
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 0.1 else f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def _avg60(line):
    for f in (line or "").split():
        if f.startswith("avg60="):
            return f[6:]
    return "?"


def fmt_pct(x):
    return "?" if x is None else f"{x * 100:.0f} %"


def fmt_r(x):
    return "-" if x is None else f"{x:.2f}x"


def headline_table(report):
    rows, rt = report["systems"], report["ratios"]
    lines = [
        "| size | system | median | p10 | p90 | rep medians | algbw GB/s | busbw GB/s | CPU/op (all ranks) "
        "| ours/gloo | ours/MPI | ours/floor (tcp: /tcp_raw) | check |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    sizes = [s for s in HEADLINE if s in report["args"]["sizes"]]
    for label in sizes:
        for name in report["order"]:
            r = rows.get(name)
            if r is None or (name == "floor" and SIZES[label] < FLOOR_MIN):
                continue
            if name == "tcp_raw" and SIZES[label] < TCP_RAW_MIN:
                continue
            if r.get("status") != "ok" or label not in r.get("sizes", {}):
                lines.append(f"| {label} | {name} |" + " - |" * 10 + f" {r.get('status')} |")
                continue
            s = r["sizes"][label]
            rm = s["rep_medians_s"]
            rng = fmt_t(rm[0]) if len(rm) == 1 else f"{fmt_t(min(rm))} - {fmt_t(max(rm))}"
            vs_g = rt.get(label, {}).get(f"{name}/gloo") if name in OURS else None
            vs_m = rt.get(label, {}).get(f"{name}/mpi") if name in OURS else None
            vs_f = rt.get(label, {}).get(f"{name}/floor", rt.get(label, {}).get(f"{name}/tcp_raw"))
            lines.append(
                f"| {label} | {name} | **{fmt_t(s['median_s'])}** | {fmt_t(s['p10_s'])} "
                f"| {fmt_t(s['p90_s'])} | {rng} | {s['algbw_GBps']:.3f} | {s['busbw_GBps']:.3f} "
                f"| {fmt_t(s['cpu_s_per_op_all_ranks'])} | {fmt_r(vs_g)} | {fmt_r(vs_m)} | {fmt_r(vs_f)} "
                f"| {'ok' if s['verified'] else 'WRONG'} |"
            )
    return lines


def sweep_table(report):
    rows = report["systems"]
    names = [n for n in report["order"] if rows.get(n, {}).get("status") == "ok"]
    ratio_keys = (
        "ours_shm/gloo",
        "ours_shm/mpi",
        "ours_tcp/gloo",
        "ours_tcp/mpi",
        "ours_shm/floor",
        "ours_tcp/tcp_raw",
    )
    ratio_heads = [k.replace("mpi", "MPI") for k in ratio_keys]
    head = "| " + " | ".join(["size", *(f"{n} median (busbw GB/s)" for n in names), *ratio_heads]) + " |"
    lines = [head, "|---" * (len(names) + 1 + len(ratio_heads)) + "|"]
    for label in report["args"]["sizes"]:
        cells = []
        for n in names:
            s = rows[n]["sizes"].get(label)
            cells.append(f"{fmt_t(s['median_s'])} ({s['busbw_GBps']:.3f})" if s else "-")
        rt = report["ratios"].get(label, {})
        cells += [fmt_r(rt.get(k)) for k in ratio_keys]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def ring_traffic(nbytes, p):
    """Bytes each rank reads and writes in one all-reduce of `nbytes`: our ring as it runs on shm
    links, and its floor (see the module docstring). s = nbytes / p, k = p - 1 steps per phase."""
    s, k = nbytes / p, p - 1
    ours = (5 * k * s, 4 * k * s)
    floor = (3 * k * s, 2 * k * s)
    return {
        "floor_read": floor[0],
        "floor_write": floor[1],
        "ours_read": ours[0],
        "ours_write": ours[1],
    }


def fmt_mib(b):
    return f"{b / MiB:.3g} MiB"


FLOOR_TEXT = (
    "The floor: {p} processes (one per rank, started like the ranks above) each do exactly the "
    "memory reads and writes of its rank in our ring, and nothing else, with NumPy on float32 "
    "buffers in shared memory (files in /dev/shm): per reduce-scatter step `np.add(own, left, "
    "out=own)` over the segment it receives, per all-gather step `np.copyto(own, left)`, chunked as "
    "our ring chunks, a barrier (a spinning counter in shared memory) before each step and one at "
    "the end; the sum is checked like the others'. With s = n/p and p - 1 steps per phase, each rank "
    "reads 3(p-1)s and writes 2(p-1)s bytes (64 MiB, p=2: 96 + 64 MiB). Our ring moves the same "
    "bytes to and from memory, plus copies through the link's ring (4 MiB, in cache): the sender "
    "copies each chunk into it, and the receiver combines (or copies) each piece where it lies in "
    "the ring (5(p-1)s read + 4(p-1)s written, of which 2(p-1)s + 2(p-1)s in the ring). "
    "The one-process floor is rank 0's share done alone while "
    "the other ranks sleep: what one core's memory traffic costs without the others'. "
    "Memory traffic GB/s = the floor's bytes (reads + writes) of all ranks per second; buffers "
    "that fit the caches (up to a few MiB) make it cache traffic, so the floor is a memory-traffic "
    "floor at the large sizes."
)

TCP_RAW_TEXT = (
    "tcp_raw: p Python processes, started like the ranks above, each with a socket to its right "
    "neighbour and one from its left (loopback, Nagle off, kernel-tuned buffers). Per step of our "
    "ring, a sender thread sends this rank's segment in one `sendall` while the main thread "
    "receives the left neighbour's: in 256 KiB pieces (`recv_into`) added into the buffer with "
    "NumPy in the reduce-scatter, straight into the buffer in the all-gather; the same segments in "
    "the same order as our ring, without framing, a barrier as the floor's. Both socket calls "
    "block in the kernel (no spinning). What it shows: the cost of the kernel's TCP for exactly "
    "the bytes our ring moves, so that ours_tcp / tcp_raw says what our engine adds to it or saves "
    "(above 1: it adds) and tcp_raw / gloo what is left for any TCP all-reduce of this algorithm "
    "to win against gloo. From 4 MiB: below, its thread hand-off per step is what it measures."
)


def floor_table(report):
    rows, world = report["systems"], report["args"]["world"]
    fr = rows.get("floor") or {}
    if fr.get("status") != "ok":
        return []
    lines = [
        "| size | floor traffic per rank (read + write) | our ring's, modelled | floor, one process per rank "
        "| memory traffic GB/s (all ranks) | floor, one process alone (one rank's share) | GB/s "
        "| ours_shm | ours_shm / floor | ours_shm / one-process floor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label in report["args"]["sizes"]:
        f = fr["sizes"].get(label)
        if not f:
            continue
        tr = ring_traffic(SIZES[label], world)
        per_rank = tr["floor_read"] + tr["floor_write"]
        solo = f.get("solo_median_s")
        ours = _med(rows, "ours_shm", label)
        lines.append(
            f"| {label} | {fmt_mib(tr['floor_read'])} + {fmt_mib(tr['floor_write'])} "
            f"| {fmt_mib(tr['ours_read'])} + {fmt_mib(tr['ours_write'])} "
            "(through the link's ring; the ring's share in cache) "
            f"| **{fmt_t(f['median_s'])}** | {per_rank * world / f['median_s'] / 1e9:.1f} "
            f"| {fmt_t(solo)} | {per_rank / solo / 1e9 if solo else 0:.1f} | {fmt_t(ours)} "
            f"| {fmt_r(ours / f['median_s'] if ours else None)} "
            f"| {fmt_r(ours / solo if ours and solo else None)} |"
        )
    return lines


def target_lines(report):
    out = []
    for t in report["targets"]:
        if "ours_s" not in t:
            out.append(f"- {t['verdict']}")
            continue
        if t["ours_s"] is None:
            out.append(f"- {t['target']}: {t['verdict']}")
            continue
        extra = ""
        if "floor_s" in t:
            if t["floor_s"] is None:
                out.append(f"- {t['target']}: {t['verdict']} (ours {fmt_t(t['ours_s'])})")
                continue
            extra = (
                f"ours {fmt_t(t['ours_s'])}, floor {fmt_t(t['floor_s'])} (one process per rank), "
                f"ratio {t['ratio']:.2f} -> limit {fmt_t(t['limit_this_run_s'])}"
            )
            if t.get("ratio_per_rep"):
                extra += f" (per rep: {', '.join(f'{x:.2f}' for x in t['ratio_per_rep'])})"
            if t.get("floor_one_process_s"):
                extra += (
                    f"; one process alone doing one rank's share: {fmt_t(t['floor_one_process_s'])} "
                    f"(ours / that {t['ratio_one_process']:.2f})"
                )
        elif "gloo_s" in t:
            extra = (
                f"ours {fmt_t(t['ours_s'])}, gloo {fmt_t(t['gloo_s'])} "
                f"-> limit {fmt_t(t['limit_this_run_s'])} this run "
                f"(limit from the anchor 65.8 ms: {fmt_t(t['limit_anchor_s'])})"
            )
            if t.get("tcp_raw_s"):
                extra += (
                    f"; plain sockets moving the same bytes (tcp_raw): {fmt_t(t['tcp_raw_s'])}, "
                    f"ours / that {t['ours_s'] / t['tcp_raw_s']:.2f}, that / gloo "
                    f"{t['tcp_raw_s'] / t['gloo_s']:.2f}"
                    if t.get("gloo_s")
                    else f"; tcp_raw {fmt_t(t['tcp_raw_s'])}"
                )
        else:
            extra = (
                f"ours {fmt_t(t['ours_s'])}, Open MPI {fmt_t(t['mpi_s'])} this run "
                f"(anchor {fmt_t(t['limit_anchor_s'])})"
            )
        ratio = f", ratio {t['ratio']:.2f}" if "ratio" in t and "floor_s" not in t else ""
        if t.get("near_ratio"):
            ratio += f" (launches with the CPUs near: {t['near_ratio']:.2f})"
        prim = "" if t["primary"] else " (information: the target is for the default link, shm)"
        out.append(f"- {t['target']}: **{t['verdict'].upper()}**{prim}: {extra}{ratio}")
    return out


def render(report):
    m, a = report["machine"], report["args"]
    bound = a.get("bind")
    title = "All-reduce, every rank bound to a CPU of its own" if bound else "All-reduce benchmark"
    L = [f"## {title} (p={a['world']})", ""]
    if bound:
        L.append(
            "Each rank of ours, gloo, the floor and tcp_raw started with `taskset -c <CPU>`, rank r on the "
            "r-th CPU the bench may use; Open MPI's with `mpirun --use-hwthread-cpus --map-by hwthread "
            "--bind-to hwthread`, one hardware thread each too (its default binding, which its rows in "
            "the other sections have, is a core per rank): ranks as `taskset`, `srun --cpu-bind=threads` "
            "or `mpirun` on a machine without SMT leave them. A rank bound "
            "to one CPU has no CPU to spare beside its waiting thread; its waits spin yielding the CPU "
            "(SPIN-5; `spins_yielding` in `wait_stats()`). Otherwise as the section above."
        )
        L.append("")
    L.append(f"Run {report['started']} ({report['elapsed_s']:.0f} s), `{report['command']}`.")
    L.append("")
    L.append("Machine:")
    L.append(
        f"- {m.get('nproc')} CPUs ({m.get('usable_cpus')} usable), {m.get('mem_GiB')} GiB, "
        f"kernel {m.get('kernel')}, THP {m.get('thp', '?')}; CPU: {m.get('cpu_model', '?')}"
    )
    L.append(
        f"- Python {m.get('python')}, torch {m.get('torch')}, numpy {m.get('numpy')}, {m.get('mpirun')}, "
        f"mpi4py {m.get('mpi4py')}, matplotlib {m.get('matplotlib')}"
    )
    ours = report["torch_parallel"]
    if "error" in ours:
        L.append(f"- torch_parallel: not built ({ours['error']})")
    else:
        cfg = next(
            (report["systems"][n].get("config") for n in OURS if report["systems"].get(n, {}).get("config")),
            None,
        )
        L.append(
            f"- torch_parallel {ours.get('version')}, io backend {ours.get('io_backend', '?')}, "
            f"git {m.get('git')}"
            + (f"; {', '.join(f'{k}={v}' for k, v in cfg.items())} (ours_tcp: PARALLEL_SHM=0)" if cfg else "")
        )
    L.append(
        f"- load average at start / end: {' '.join(m.get('loadavg_start', []))} / "
        f"{' '.join(m.get('loadavg_end', []))}; CPU pressure (PSI some, avg60 %) at start / end: "
        f"{_avg60(m.get('cpu_pressure_start'))} / {_avg60(m.get('cpu_pressure_end'))}"
        + (
            f"; p={a['world']} on {m.get('nproc')} CPUs is oversubscribed"
            if a["world"] > (m.get("nproc") or 2)
            else ""
        )
    )
    L.append("")
    L.append("Systems:")
    for n in report["order"]:
        r = report["systems"][n]
        st = "ok" if r.get("status") == "ok" else f"{r.get('status')}: {r.get('note', '')}"
        links = f", links {'/'.join(r['links'])}" if r.get("links") else ""
        extra = "; " + r["note"] if r.get("status") == "ok" and r.get("note") else ""
        psi = [x for x in r.get("cpu_pressure") or [] if x is not None]
        if psi:
            extra += f"; CPU pressure {fmt_pct(min(psi))}" + (f"-{fmt_pct(max(psi))}" if len(psi) > 1 else "")
        L.append(f"- `{n}`: {LABEL[n]}{links} ({st}{extra})")
    L.append("")
    L.append(
        f"### Headline sizes (float32, sum; median of {a['reps']} rep(s) of rank 0's per-op medians; "
        f"ratios are time ours / peer, < 1 = ours faster)"
    )
    L.append("")
    L += headline_table(report)
    L.append("")
    if bound:
        L.append("How rank 0's waits went over the timed ops (`parallel.wait_stats()`), launch by launch:")
        L.append("")
        for name in OURS:
            r = report["systems"].get(name) or {}
            for label in HEADLINE:
                per = (r.get("sizes") or {}).get(label, {}).get("rep_counters")
                if not per:
                    continue
                runs = "; ".join(
                    f"{i + 1}: {c.get('spins_started', 0)} spun ({c.get('spins_yielding', 0)} yielding, "
                    f"{c.get('spins_paid', 0)} paid), {c.get('spins_declined', 0)} to the kernel"
                    for i, c in enumerate(per)
                )
                L.append(f"- {name} {label}: {runs}")
        L.append("")
    else:  # the targets are for ranks as torchrun starts them (unbound)
        L.append("### Targets (from our issue)")
        L.append("")
        L += target_lines(report)
        L.append("")
    cl = core_lines(report)
    if cl:
        L.append("### Where the two CPUs were, launch by launch")
        L.append("")
        L.append(
            "The core-to-core probe (`benches/probes/core_rtt.c`: a cache line passed between the two "
            "CPUs) right before and right after each launch: near = both round trips under "
            f"{CORE_RTT_NEAR_NS:.0f} ns (the CPUs share a last-level cache), apart = neither, changed = "
            "one of each. On a VM the host decides this, and every 2-rank figure that moves data "
            "between the cores follows it."
        )
        L.append("")
        L += cl
        L.append("")
    ft = floor_table(report)
    if ft:
        L.append("### Memory-traffic floor (our ring's minimal reads and writes, measured in this run)")
        L.append("")
        L.append(FLOOR_TEXT.format(p=a["world"]))
        L.append("")
        L += ft
        L.append("")
    if (report["systems"].get("tcp_raw") or {}).get("status") == "ok":
        L.append("### What plain sockets take for our TCP ring's bytes (tcp_raw)")
        L.append("")
        L.append(TCP_RAW_TEXT)
        L.append("")
    L.append(
        "### Sweep (time vs message size; plot: "
        + (f"`{report['png']}`" if report.get("png") else "none")
        + ")"
    )
    L.append("")
    L += sweep_table(report)
    L.append("")
    its = ", ".join(f"{k} {v}" for k, v in a["iters"].items() if k in a["sizes"])
    L.append(
        "Method: every rank is a fresh process (mpi: under mpirun with its default binding and BTLs); "
        "per size one checked all-reduce of rank-dependent data (every element on every rank must be "
        "p(p+1)/2), then the buffer is zeroed, warm-up ops (max(3, iters/10, min(2000, 8 MiB / n)): "
        f"{', '.join(str(warmup(SIZES[k], v)) for k, v in a['iters'].items())}), a barrier, "
        "and the timed ops, each timed alone on rank 0 "
        f"(timed ops per rep: {its}). Ours and gloo reduce in place; MPI out of place (src, dst), as "
        "the peer baselines' mpi4py benchmark. algbw = n/t, busbw = algbw * 2(p-1)/p, 1 GB/s = 1e9 B/s. "
        "CPU/op = user + system time of all ranks over the timed loop, per op (shows what spinning costs). "
        "CPU pressure = share of a launch's wall time in which some task waited for a CPU "
        "(/proc/pressure/cpu 'some', our own threads included): well above ~20 % means other work "
        "competed for the CPUs and the figures of that system are noisy. "
        "Anchors (baselines measured earlier on a 2-vCPU AMD EPYC VM of this kind): "
        "gloo p=2 0.75 ms / 1.47 ms / 65.8 ms, "
        "Open MPI shm p=2 8.4 us / 0.56 ms / 69.4 ms for 4 KiB / 1 MiB / 64 MiB."
    )
    return "\n".join(L) + "\n"


def print_console(report):
    for title, lines in (
        ("Headline sizes (ratios: time ours / peer, < 1 = ours faster)", headline_table(report)),
        ("Sweep: median (busbw GB/s)", sweep_table(report)),
        ("Memory-traffic floor (medians)", floor_table(report)),
    ):
        rows = [
            [c.strip().replace("**", "") for c in ln.strip("|").split("|")]
            for ln in lines
            if not ln.startswith("|---")
        ]
        if len(rows) <= 1:
            continue
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"\n{title}")
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("\nTargets")
    for ln in target_lines(report):
        print("  " + ln.replace("**", ""))


def plot(report, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed (bash scripts/bench-setup.sh)"
    rows, world = report["systems"], report["args"]["world"]
    style = {
        "gloo": ("tab:orange", "s"),
        "mpi": ("tab:green", "^"),
        "ours_shm": ("tab:blue", "o"),
        "ours_tcp": ("tab:purple", "D"),
        "floor": ("black", "x"),
        "tcp_raw": ("gray", "+"),
    }
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.2))
    drawn = 0
    for n in report["order"]:
        r = rows.get(n, {})
        if r.get("status") != "ok":
            continue
        labels = [s for s in report["args"]["sizes"] if s in r["sizes"]]
        x = [SIZES[s] for s in labels]
        med = [r["sizes"][s]["median_s"] for s in labels]
        lo = [r["sizes"][s]["p10_s"] for s in labels]
        hi = [r["sizes"][s]["p90_s"] for s in labels]
        bus = [r["sizes"][s]["busbw_GBps"] for s in labels]
        c, mk = style[n]
        ls = "--" if n in ("floor", "tcp_raw") else "-"
        ax.plot(x, med, marker=mk, color=c, ls=ls, label=LABEL[n])
        ax.fill_between(x, lo, hi, color=c, alpha=0.15, linewidth=0)
        bx.plot(x, bus, marker=mk, color=c, ls=ls, label=LABEL[n])
        drawn += 1
    tx, ty = [], []
    if world == 2:
        g = _med(rows, "gloo", "64MiB")
        if g and "64MiB" in report["args"]["sizes"]:
            tx.append(64 * MiB)
            ty.append(g * TARGET_64M_VS_GLOO)
        mp = _med(rows, "mpi", "4KiB")
        if mp and "4KiB" in report["args"]["sizes"]:
            tx.append(4 * KiB)
            ty.append(mp)
    if tx:
        ax.plot(
            tx,
            ty,
            marker="_",
            markersize=22,
            mew=2.5,
            color="red",
            ls="none",
            label=f"target of ours (p=2): 4 KiB <= MPI, 64 MiB <= {TARGET_64M_VS_GLOO}x gloo",
        )
    sizes = [SIZES[s] for s in report["args"]["sizes"]]
    ticks = [s.replace("iB", "") for s in report["args"]["sizes"]]
    for axis in (ax, bx):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sizes)
        axis.set_xticklabels(ticks)
        axis.minorticks_off()
        axis.grid(True, which="major", alpha=0.3)
        axis.set_xlabel("message size (float32 bytes per rank)")
    ax.set_yscale("log")
    ax.set_ylabel("time per all-reduce, median (band: p10-p90), s")
    ax.set_title(f"All-reduce time, p={world}")
    bx.set_ylabel("busbw = 2(p-1)/p * n / t, GB/s")
    bx.set_title(f"All-reduce bus bandwidth, p={world}")
    if drawn:
        ax.legend(fontsize=8, loc="upper left")
    m = report["machine"]
    fig.suptitle(
        f"{m.get('nproc')} CPUs ({m.get('cpu_model', '?')}), {report['started']}"
        + (" - quick run" if report["args"]["quick"] else ""),
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ----------------------------------------------------------------------------------------------


def parse_only(spec):
    keys = []
    for k in filter(None, (x.strip() for x in spec.split(","))):
        if k in ALIASES:
            keys += ALIASES[k]
        elif k in SYSTEMS:
            keys.append(k)
        else:
            raise SystemExit(f"--only: unknown key {k!r} (use {', '.join([*SYSTEMS, *ALIASES])})")
    return [s for s in SYSTEMS if s in keys]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer ops, 1 rep, < 90 s")
    ap.add_argument(
        "--only", default="", help="comma list of: gloo mpi ours_shm floor ours_tcp tcp_raw | ours | peers"
    )
    ap.add_argument("--world", type=int, default=2, help="ranks (default 2; 3 or 4 oversubscribe 2 CPUs)")
    ap.add_argument(
        "--reps", type=int, default=None, help="fresh process sets per system (default 3; quick 1)"
    )
    ap.add_argument("--sizes", default="", help=f"comma list of sizes (default all: {','.join(SIZES)})")
    ap.add_argument(
        "--timeout", type=float, default=None, help="deadline per launch, s (default: from sizes)"
    )
    ap.add_argument(
        "--load",
        type=int,
        default=0,
        help="under-load mode: N busy compute threads per rank (benches/_load.py)",
    )
    ap.add_argument(
        "--bind",
        action="store_true",
        help="every rank bound to a CPU of its own (taskset -c; mpirun --bind-to hwthread), as "
        "srun --cpu-bind=threads and mpirun leave ranks; writes allreduce-bound.{md,json}, no plot",
    )
    ap.add_argument("--json", default="bench-out/allreduce.json")
    ap.add_argument("--md", default="bench-out/allreduce.md")
    ap.add_argument("--png", default="bench-out/allreduce.png")
    # internal: one rank
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main(a.child, a.rank, json.loads(a.cfg))
        return

    a.reps = a.reps or (1 if a.quick else 3)
    if a.bind and a.load > 0:
        raise SystemExit("--bind and --load: run one or the other (the under-load mode does not bind)")
    if a.load > 0:
        load_main(a)
        return
    if a.world < 2 or a.reps < 1:
        raise SystemExit("--world must be >= 2 and --reps >= 1")
    if a.bind:
        ncpu = len(os.sched_getaffinity(0))
        if a.world > ncpu:
            raise SystemExit(f"--bind: {a.world} ranks need as many CPUs; this process may use {ncpu}")
        a.json, a.md = (bound_name(x) for x in (a.json, a.md))
        a.png = ""
    sizes = [s.strip() for s in a.sizes.split(",") if s.strip()] or list(SIZES)
    bad = [s for s in sizes if s not in SIZES]
    if bad:
        raise SystemExit(f"--sizes: unknown {bad} (use {','.join(SIZES)})")
    a.sizes = [s for s in SIZES if s in sizes]
    a.iters = {k: v for k, v in (ITERS_QUICK if a.quick else ITERS).items() if k in a.sizes}
    systems = parse_only(a.only) if a.only else list(SYSTEMS)

    # Deadlines: a blocking call in a rank gives up after t_op; a whole launch after `deadline`
    # (startup, then every op at a pathological 20 ms or 50 MB/s, times the oversubscription).
    t_op = 60.0
    over = max(1.0, a.world / (os.cpu_count() or 2))
    work = sum((a.iters[s] + warmup(SIZES[s], a.iters[s]) + 1) * max(0.02, SIZES[s] / 50e6) for s in a.sizes)
    deadline = a.timeout or (60 + work * over * a.world / 2)

    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    t_start = time.monotonic()
    machine = machine_info()
    probe = probe_ours() if any(s in OURS for s in systems) else {"error": "not selected"}
    cfg = {"sizes": a.sizes, "iters": a.iters, "t_op": t_op, "bind": a.bind}
    runs = {s: [] for s in systems}
    unavailable = {s: availability(s, probe, a.sizes) for s in systems}
    for s, why in unavailable.items():
        if why:
            print(f"{s}: skipped ({why})", flush=True)
    tmpdir = tempfile.mkdtemp(prefix="parallel-allreduce-")
    try:
        for rep in range(a.reps):
            for s in systems:
                if unavailable[s]:
                    if rep == 0:
                        runs[s].append({"status": "skipped", "note": unavailable[s]})
                    continue
                print(f"[rep {rep + 1}/{a.reps}] {s} (p={a.world}) ...", end=" ", flush=True)
                t0 = time.monotonic()
                before = core_probe()
                res, err, command, psi = launch(s, a.world, cfg, tmpdir, f"{s}-{rep}", deadline)
                after = core_probe()
                core = core_record(before, after)
                if err:
                    runs[s].append({"status": "error", "note": err, "command": command})
                    print(f"error: {err}", flush=True)
                    continue
                runs[s].append(
                    {"status": "ok", "ranks": res, "command": command, "cpu_pressure": psi, "core": core}
                )
                r0 = res[0]["sizes"]
                brief = ", ".join(f"{k} {fmt_t(r0[k]['median_s'])}" for k in HEADLINE if k in r0)
                bad = [k for k in r0 if not all(rr["sizes"][k]["verified"] for rr in res.values())]
                print(
                    f"{brief} ({time.monotonic() - t0:.1f} s, CPU pressure {fmt_pct(psi)}; "
                    f"CPUs {fmt_core(core)})" + (f"  WRONG RESULT at {bad}" if bad else ""),
                    flush=True,
                )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    rows = {s: summarize(runs[s], a.world) for s in systems}
    for n in OURS:  # say so when a row did not get the link kind it is named after
        r = rows.get(n)
        if r and r.get("status") == "ok" and r.get("links"):
            want = "shm" if n == "ours_shm" else "tcp"
            if r["links"] != [want]:
                r["note"] = (r.get("note", "") + f"; links are {r['links']}, not [{want!r}]").lstrip("; ")
    machine["loadavg_end"] = read_text("/proc/loadavg").split()[:3]
    machine["cpu_pressure_end"] = (read_text("/proc/pressure/cpu").splitlines() or [""])[0]
    report = {
        "started": started,
        "elapsed_s": time.monotonic() - t_start,
        "command": " ".join(
            [
                os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                *sys.argv,
            ]
        ),
        "args": vars(a) | {"deadline_s": deadline, "t_op_s": t_op},
        "machine": machine,
        "torch_parallel": probe,
        "units": {"time": "seconds", "bandwidth": "GB/s, 1e9 B/s"},
        "order": systems,
        "systems": rows,
        "ratios": ratios(rows),
    }
    report["targets"] = targets(rows, a.world)
    report["png"] = a.png or None
    if a.png:
        why = plot(report, a.png)
        if why:
            print(f"no plot: {why}")
            report["png"] = None
            report["png_note"] = why
    print_console(report)
    for path, text in ((a.json, json.dumps(report, indent=1, default=str)), (a.md, render(report))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + ("\n" if not text.endswith("\n") else ""))
    print(f"\nwrote {', '.join(p for p in (a.json, a.md, report['png']) if p)} ({report['elapsed_s']:.0f} s)")


def load_main(a):
    """--load N: the headline sizes under N busy compute threads per rank, p50/p99 per launch."""
    sizes = [s for s in HEADLINE if not a.sizes or s in a.sizes.split(",")]
    iters = {k: v for k, v in (_load.ITERS_QUICK if a.quick else _load.ITERS).items() if k in sizes}
    systems = parse_only(a.only) if a.only else ["ours_shm", "gloo", "mpi"]
    if "floor" in systems:
        print("floor: not measured under load (it is the unloaded memory-traffic floor)", flush=True)
        systems.remove("floor")
    kind = _load.load_kind()
    cfg = {"sizes": sizes, "iters": iters, "t_op": 60.0, "load": a.load, "load_kind": kind}
    over = max(1.0, a.world * (1 + a.load) / (os.cpu_count() or 2))
    work = sum((iters[s] + warmup(SIZES[s], iters[s]) + 1) * max(0.02, SIZES[s] / 50e6) for s in sizes)
    deadline = a.timeout or (60 + work * over)
    started, t_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.monotonic()
    loadavg_start = read_text("/proc/loadavg").split()[:3]
    probe = probe_ours() if any(s in OURS for s in systems) else {"error": "not selected"}
    runs = {s: [] for s in systems}
    unavailable = {s: availability(s, probe) for s in systems}
    tmpdir = tempfile.mkdtemp(prefix="parallel-allreduce-load-")
    try:
        for rep in range(a.reps):
            for s in systems:
                if unavailable[s]:
                    if rep == 0:
                        print(f"{s}: skipped ({unavailable[s]})", flush=True)
                        runs[s].append({"status": "skipped", "note": unavailable[s]})
                    continue
                print(
                    f"[launch {rep + 1}/{a.reps}] {s} (p={a.world}, load {a.load}) ...", end=" ", flush=True
                )
                before = core_probe()
                res, err, command, psi = launch(s, a.world, cfg, tmpdir, f"{s}-{rep}", deadline)
                after = core_probe()
                if err:
                    runs[s].append({"status": "error", "note": err, "command": command})
                    print(f"error: {err}", flush=True)
                    continue
                run = {"status": "ok", "ranks": res, "command": command, "cpu_pressure": psi}
                run["core"] = core_record(before, after)
                run["load_ops_per_s"] = sum(r.get("load_ops_per_s", 0) for r in res.values())
                runs[s].append(run)
                brief = [_load.per_launch(run, k) for k in sizes]
                print(
                    ", ".join(
                        f"{k} p50 {fmt_t(b['p50_s'])} p99 {fmt_t(b['p99_s'])}"
                        for k, b in zip(sizes, brief, strict=True)
                        if b
                    )
                    + f" (CPUs {fmt_core(run['core'])})",
                    flush=True,
                )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    rows = {s: _load.summarize(runs[s], sizes) for s in systems}
    ours = next((s for s in systems if s in OURS), None)
    peers = [s for s in systems if s in PEERS]
    report = {
        "started": started,
        "elapsed_s": time.monotonic() - t_start,
        "command": " ".join(
            [
                os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                *sys.argv,
            ]
        ),
        "args": vars(a),
        "load_kind": kind,
        "loadavg_start": loadavg_start,
        "loadavg_end": read_text("/proc/loadavg").split()[:3],
        "torch_parallel": probe,
        "sizes": sizes,
        "order": systems,
        "ours": ours,
        "peers": peers,
        "systems": rows,
        "ratios": _load.ratios(rows, ours, peers, sizes) if ours else {},
    }
    _load.print_console(report)
    base = {"json": a.json, "md": a.md}
    for key, text in (("json", json.dumps(report, indent=1, default=str)), ("md", _load.render(report))):
        path = base[key]
        if path:
            path = path.replace("allreduce.", "allreduce-load.") if "allreduce." in path else path
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Demo: a multi-process all-reduce on this machine, with its figures.

Starts N rank processes (default 2) that join a tree (`torch_parallel.tree`), run the seed's
example (`tree.all_reduce(grads, lambda a, b: a.add_(b))`), check the result, and time
all-reduces of 4 KiB, 1 MiB and 64 MiB float32 tensors, over shared memory and over TCP.

    python examples/allreduce_demo.py [--ranks 2] [--iters 20]

Each size's line ends with how the ranks' waits went (`parallel.wait_stats()`): spins, those
that paid, and waits sent to the kernel (a kernel wait costs a wake-up; a slow launch with many
of them was waiting, not computing).

Like torchrun, it gives each rank one OpenMP thread (OMP_NUM_THREADS=1) unless the environment
sets another number: with torch's default (one thread per core in every rank), each `fill_`
leaves OpenMP threads spinning (libgomp's default wait policy) on cores the ranks need, and a
rank's wake-up then waits for the scheduler tick (measured here, 2 ranks on 2 cores: 1 MiB
medians of 2-4 ms in about half the launches, 0.08-0.5 ms with one thread per rank).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

SIZES = [("4 KiB", 1 << 10), ("1 MiB", 1 << 18), ("64 MiB", 1 << 24)]


def rank_main(rank: int, world: int, port: int, shm: str, iters: int, q: mp.Queue) -> None:
    os.environ["PARALLEL_SHM"] = shm
    import torch

    import torch_parallel as parallel

    tree = parallel.tree(rank, world, f"127.0.0.1:{port}", timeout=60)
    # The seed's example, as written.
    grads = [torch.full((1000,), float(rank + 1)), {"w": torch.ones(10, 10)}]
    tree.all_reduce(grads, lambda a, b: a.add_(b))
    assert torch.all(grads[0] == world * (world + 1) / 2) and torch.all(grads[1]["w"] == world)
    times, waits = {}, {}
    for name, n in SIZES:
        before = parallel.wait_stats()
        t = torch.ones(n)
        reps = iters if n < (1 << 20) else max(3, iters // 4)
        samples = []
        for _ in range(3):
            tree.all_reduce(t)  # warm-up
        for _ in range(reps):
            t.fill_(1.0)
            tree.barrier()
            t0 = time.perf_counter()
            tree.all_reduce(t)
            samples.append(time.perf_counter() - t0)
        assert torch.all(t == world), name
        times[name] = statistics.median(samples)
        after = parallel.wait_stats()
        waits[name] = {k: after[k] - before[k] for k in after}
    q.put({"rank": rank, "times": times, "waits": waits, "plan": tree.plan() if rank == 0 else ""})


def waits_line(res: list[dict], label: str) -> str:
    """How the ranks' waits at this size went (parallel.wait_stats(), all ranks): spins and the
    ones that paid, waits sent to the kernel (for busy cores, or skipped after spins that did
    not pay) and moves off a peer's CPU. Many kernel waits is what a slow run looks like."""
    w = {k: sum(r["waits"][label][k] for r in res) for k in res[0]["waits"][label]}
    line = f"{w['spins_started']} spun ({w['spins_paid']} paid), {w['spins_declined']} to the kernel"
    if w["spins_declined_busy"]:
        line += f" ({w['spins_declined_busy']} for busy cores)"
    if w["spread_moves"]:
        line += f", {w['spread_moves']} moved off a peer's CPU"
    return line


def run(world: int, shm: str, iters: int) -> list[dict]:
    # As torchrun does for several processes per host (see the module's docstring); the spawned
    # ranks inherit it, and torch reads it when it starts.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, shm, iters, q)) for r in range(world)]
    for p in procs:
        p.start()
    res = [q.get(timeout=300) for _ in range(world)]
    for p in procs:
        p.join(30)
    return sorted(res, key=lambda r: r["rank"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    print(
        f"all-reduce (sum, float32) across {a.ranks} processes on this machine ({os.cpu_count()} cores; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')} per rank)"
    )
    for shm, name in (("1", "shared memory"), ("0", "TCP loopback")):
        res = run(a.ranks, shm, a.iters)
        print(f"\n{name}:")
        if shm == "1":
            print(res[0]["plan"].rstrip())
        for label, n in SIZES:
            t = max(r["times"][label] for r in res)
            nbytes = 4 * n
            busbw = 2 * (a.ranks - 1) / a.ranks * nbytes / t / 1e9
            waits = waits_line(res, label)
            print(f"  {label:>7}: {t * 1e6:10.1f} us   busbw {busbw:6.2f} GB/s   waits: {waits}")
    print("\nseed example (tree.all_reduce(grads, lambda a, b: a.add_(b))) verified on every rank")
    return 0


if __name__ == "__main__":
    sys.exit(main())

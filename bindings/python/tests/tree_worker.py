"""One rank of a test tree: runs a battery of collectives and checks them; exits 0 when all pass.

Usage: tree_worker.py SCENARIO [RANK WORLD ROOT]; without RANK.. the launcher variables are used.
"""

from __future__ import annotations

import os
import sys
import time

import torch

import torch_parallel as parallel


def battery(tree: parallel.Tree) -> None:
    r, n = tree.rank, tree.world_size
    # The seed's example, as written, on a nested structure of gradients.
    grads = [torch.full((10,), float(r + 1)), {"w": torch.ones(3, 3) * r, "b": torch.arange(5.0)}]
    tree.all_reduce(grads, lambda a, b: a.add_(b))
    assert torch.equal(grads[0], torch.full((10,), n * (n + 1) / 2)), grads[0]
    assert torch.equal(grads[1]["w"], torch.ones(3, 3) * (n * (n - 1) / 2))
    assert torch.equal(grads[1]["b"], torch.arange(5.0) * n)
    assert tree.contributors == n
    assert tree.last_algorithm == "tree", tree.last_algorithm  # small: with the control pass
    # Built-in ops, several dtypes, a large (ring) buffer and a strided view.
    big = torch.full((1 << 20,), float(r))
    tree.all_reduce(big, "max")
    assert torch.all(big == n - 1)
    assert tree.last_algorithm == "ring", tree.last_algorithm  # 4 MiB: over the ring threshold
    x = torch.tensor([r + 1, 2 * r], dtype=torch.int64)
    tree.all_reduce(x, "prod" if n <= 5 else "sum")
    h = torch.full((7,), 1.0, dtype=torch.bfloat16)
    tree.all_reduce(h, "avg")
    assert torch.equal(h, torch.ones(7, dtype=torch.bfloat16)), h
    m = torch.zeros(4, 6)
    view = m.t()
    view += r
    tree.all_reduce(view)
    assert torch.equal(m, torch.full((4, 6), n * (n - 1) / 2))
    # Broadcast, reduce, all_gather of unequal sizes, barrier.
    b = torch.full((3,), float(r))
    tree.broadcast(b, root=n - 1)
    assert torch.equal(b, torch.full((3,), float(n - 1)))
    red = torch.ones(2) * r
    tree.reduce(red, "sum", root=0)
    assert torch.equal(red, torch.ones(2) * (n * (n - 1) / 2) if r == 0 else torch.ones(2) * r)
    parts = tree.all_gather(torch.arange(r + 1, dtype=torch.int32))
    assert [p.tolist() for p in parts] == [list(range(k + 1)) for k in range(n)]
    part = tree.reduce_scatter(torch.arange(10.0) * (r + 1))
    assert torch.equal(part, torch.tensor_split(torch.arange(10.0) * (n * (n + 1) / 2), n)[r])
    tree.barrier()
    assert "ring" in tree.plan() and len(tree.stats()) >= 1
    # Asynchronous collectives complete in submission order; a blocking one queues behind them.
    a, c = torch.ones(100), torch.ones(300_000)
    wa = tree.all_reduce_async(a)
    wc = tree.all_reduce_async(c, "max")
    wb = tree.barrier_async()
    tree.all_reduce(torch.zeros(3))
    assert wa.wait(30) is a and torch.all(a == n) and wc.wait(30) is c and torch.all(c == 1)
    wb.wait(30)
    assert wa.done() and wb.done()


def uneven(tree: parallel.Tree) -> None:
    r, n = tree.rank, tree.world_size
    for step in range(r + 1):
        g = torch.ones(1000)
        tree.all_reduce(g)
        assert tree.contributors == n - step, (step, tree.contributors)
        assert torch.all(g == n - step)
    tree.done()


def mismatch(tree: parallel.Tree) -> None:
    t = torch.zeros(10 if tree.rank != 1 else 11)
    try:
        tree.all_reduce(t)
    except parallel.Mismatch as e:
        assert "rank 1" in str(e), e
        print("mismatch named rank 1")
        return
    raise AssertionError("no mismatch error")


def victim(tree: parallel.Tree) -> None:
    import time

    tree.all_reduce(torch.ones(4))
    print("ready", flush=True)
    if tree.rank == 1:
        time.sleep(60)
        return
    t0 = time.monotonic()
    try:
        tree.all_reduce(torch.ones(4))
    except parallel.ParallelError as e:
        print(f"failed after {time.monotonic() - t0:.2f}s: {e}", flush=True)
        return
    raise AssertionError("the collective succeeded without rank 1")


def a2a_victim(tree: parallel.Tree) -> None:
    """All-to-alls of 8 MiB pieces in a loop until one fails (rank 1 is killed meanwhile)."""
    n, me = tree.world_size, tree.rank
    ins = [torch.full((2 << 20,), float(me * n + d)) for d in range(n)]
    outs = [torch.empty(2 << 20) for _ in range(n)]
    tree.all_to_all(ins, outs)
    assert all(torch.all(outs[s] == float(s * n + me)) for s in range(n))
    print("ready", flush=True)
    while True:
        try:
            tree.all_to_all(ins, outs)
        except parallel.ParallelError as e:
            print(f"failed at {time.monotonic():.3f}: {e}", flush=True)
            return


def a2a_edges(tree: parallel.Tree) -> None:
    """all_to_all's refusals: a size disagreement is a Mismatch on every rank with no output
    changed, bad local input is a ValueError, and the tree stays usable."""
    n, me = tree.world_size, tree.rank
    ins = [torch.full((d + 1,), me * 10 + d, dtype=torch.int32) for d in range(n)]
    # Rank 1's output for rank 2's piece is one element short.
    outs = [torch.full((me + 1 - (me == 1 and s == 2),), -1, dtype=torch.int32) for s in range(n)]
    try:
        tree.all_to_all(ins, outs)
        raise AssertionError("no mismatch error")
    except parallel.Mismatch as e:
        assert "rank 2 sends 8 bytes to rank 1, whose output for it has 4 bytes" in str(e), e
    assert all(torch.all(o == -1) for o in outs), outs
    for bad, what in (
        (lambda: tree.all_to_all(ins[:-1]), "tensors for a world"),
        (lambda: tree.all_to_all([t.double() if i == 0 else t for i, t in enumerate(ins)]), "dtype"),
        (lambda: tree.all_to_all(ins, [outs[0]] * n), "share memory"),
    ):
        try:
            bad()
            raise AssertionError(f"no error for {what}")
        except ValueError as e:
            assert what in str(e), e
    # Still usable; non-contiguous outputs are filled in place.
    base = torch.full((me + 1, 2), -1, dtype=torch.int32)
    outs = [torch.full((me + 1,), -1, dtype=torch.int32) for _ in range(n)]
    outs[0] = base[:, 1]
    got = tree.all_to_all(ins, outs)
    assert all(g is o for g, o in zip(got, outs, strict=True)), got
    for s in range(n):
        assert torch.all(outs[s] == s * 10 + me), (s, outs[s])
    assert torch.all(base[:, 0] == -1), base
    # The asynchronous form, queued behind an asynchronous all-reduce (one order on every rank).
    outs = [torch.full((me + 1,), -1, dtype=torch.int32) for _ in range(n)]
    first = tree.all_reduce_async(torch.ones(3))
    work = tree.all_to_all_async(ins, outs)
    got = work.wait(30)
    assert torch.all(first.wait(30) == n)
    assert isinstance(got, list) and all(g is o for g, o in zip(got, outs, strict=True)), got
    assert all(torch.all(outs[s] == s * 10 + me) for s in range(n)), outs
    print("a2a edges ok", flush=True)


def scatter_gather(tree: parallel.Tree) -> None:
    """reduce_scatter, reduce_scatter_in_place and all_gather_into against a reference computed
    from every rank's input (each rank can make any rank's input from the shared seed): small
    (an all-reduce), large (the ring), rows that do not cut into equal parts, several dtypes and
    ops, in place; the inputs of reduce_scatter are left as they were."""
    r, n = tree.rank, tree.world_size

    def inp(q: int, rows: int, cols: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1000 + q)
        return torch.randint(-20, 20, (rows, cols), generator=g).to(dtype)

    checked = by_ring = 0
    for seed, (rows, cols) in enumerate(
        [(n, 1), (3 * n, 5), (n + 1, 7), (4 * n, 1 << 16), (n * 3 + 2, 1 << 15)]
    ):
        for dtype in (torch.float32, torch.int64, torch.float64):
            for op in ("sum", "max", "min", "avg"):
                if op == "avg" and not dtype.is_floating_point:
                    continue
                xs = [inp(q, rows, cols, dtype, seed) for q in range(n)]
                whole = torch.stack(xs)
                ref = {"sum": whole.sum(0), "max": whole.amax(0), "min": whole.amin(0)}.get(op)
                if ref is None:
                    ref = whole.sum(0) / n
                want = torch.tensor_split(ref.to(dtype), n)[r]
                x = xs[r].clone()
                got = tree.reduce_scatter(x, op)
                assert torch.equal(x, xs[r]), "reduce_scatter changed its input"
                assert got.dtype == dtype and torch.equal(got, want), (rows, cols, dtype, op)
                y = xs[r].clone()
                got = tree.reduce_scatter_in_place(y, op)
                assert torch.equal(got, want), ("in place", rows, cols, dtype, op)
                assert got.data_ptr() == torch.tensor_split(y, n)[r].data_ptr(), "not a view of the input"
                if rows % n == 0 and tree.ring_for(y.numel() * y.element_size()):
                    assert tree.last_algorithm == "ring", (tree.last_algorithm, rows, cols)
                    by_ring += 1
                checked += 1
            # all_gather_into: separate output, and in place (the input is this rank's part).
            xs = [inp(q, 2, cols, dtype, seed + 50) for q in range(n)]
            out = torch.full((2 * n, cols), 99).to(dtype)
            assert tree.all_gather_into(out, xs[r]) is out
            assert torch.equal(out, torch.cat(xs)), ("all_gather_into", cols, dtype)
            assert tree.last_algorithm == "ring", tree.last_algorithm
            out = torch.zeros((2 * n, cols), dtype=dtype)
            out[2 * r : 2 * r + 2] = xs[r]
            tree.all_gather_into(out, out[2 * r : 2 * r + 2])
            assert torch.equal(out, torch.cat(xs)), ("all_gather_into in place", cols, dtype)
            checked += 2
    # Bad input: a ValueError on this rank before anything is sent.
    for bad_out, bad_in, words in [
        (torch.zeros(3 * n), torch.zeros(2), "world_size x"),
        (torch.zeros(2 * n, dtype=torch.int32), torch.zeros(2), "must match"),
        (torch.zeros(2, 2 * n).t(), torch.zeros(2, 2), "contiguous"),
    ]:
        try:
            tree.all_gather_into(bad_out, bad_in)
        except ValueError as e:
            assert words in str(e), e
        else:
            raise AssertionError(f"all_gather_into({bad_out.shape}, {bad_in.shape}) did not raise")
    assert by_ring >= 6, by_ring  # the large sizes that cut evenly took the ring
    tree.barrier()
    print(f"rank {r}: {checked} scatter/gather checks, {by_ring} reduce-scatters by the ring")


def peer_on_my_cpu(tree: parallel.Tree) -> None:
    """Rank 1 runs on one CPU only and last published from it; rank 0 is put on that CPU and
    waits for rank 1, which sleeps 50 ms first, in a 4 KiB all-reduce (fast path) and a 1 MiB
    one (shm links). Rank 0 prints, per size, the CPU it was put on, where it ended and how
    many moves it made (SPREAD-2); up to 5 tries each, as a wait declined for busy cores (other
    work on the machine) never moves, nor one the scheduler already moved elsewhere."""
    allowed = os.sched_getaffinity(0)
    cpu = min(allowed)
    for count in (1 << 10, 1 << 18):
        t = torch.ones(count)
        for _ in range(5):
            if tree.rank == 1:
                os.sched_setaffinity(0, {cpu})
            tree.all_reduce(t)  # rank 1 publishes from `cpu` (SPREAD-1)
            tree.barrier()
            before = parallel.wait_stats()["spread_moves"]
            if tree.rank == 0:
                # After the barrier: its own wait there could have moved rank 0 already.
                os.sched_setaffinity(0, {cpu})
                os.sched_setaffinity(0, allowed)
            else:
                time.sleep(0.05)
            tree.all_reduce(t)
            moves = parallel.wait_stats()["spread_moves"] - before
            with open("/proc/thread-self/stat") as f:
                now = int(f.read().rsplit(")", 1)[1].split()[36])
            assert os.sched_getaffinity(0) == ({cpu} if tree.rank == 1 else allowed)
            os.sched_setaffinity(0, allowed)
            done = torch.tensor([float(moves > 0)])
            tree.all_reduce(done, "max")
            if tree.rank == 0:
                print(f"size {count * 4} put {cpu} ended {now} moves {moves}")
            if done.item() > 0:
                break


def apart_under_load(tree: parallel.Tree) -> None:
    """Every CPU busy (each rank runs torch matmul threads, half the CPUs' worth), and the two
    ranks' main threads on different CPUs: rank r is put on the r-th CPU for a first all-reduce,
    then may run anywhere again. Then checked 4 KiB all-reduces (the fast path) for at least
    0.2 s, so that a waiter gets several tries (one per 10 ms, SPREAD-3). Prints how many times
    this rank joined the other's CPU (SPREAD-4, `spread_pairs`) and how many of its waits SPIN-2
    declined for busy cores (none: the machine did not look busy)."""
    import threading

    r, n = tree.rank, tree.world_size
    allowed = os.sched_getaffinity(0)
    cpus = sorted(allowed)
    stop = threading.Event()

    def work() -> None:
        a, b = torch.rand(128, 128), torch.rand(128, 128)
        while not stop.is_set():
            torch.mm(a, b)

    torch.set_num_threads(1)
    busy = [threading.Thread(target=work, daemon=True) for _ in range((len(cpus) + n - 1) // n)]
    try:
        for b in busy:
            b.start()
        time.sleep(0.1)  # the load sample sees them (SPIN-2 samples every 2 ms)
        t = torch.ones(1024)
        try:
            os.sched_setaffinity(0, {cpus[r % len(cpus)]})
            tree.all_reduce(t)  # apart, each publishing its CPU (SPREAD-1)
        finally:
            os.sched_setaffinity(0, allowed)
        # A try the pinned mask refused counts too (SPREAD-3): past its period before the loop.
        time.sleep(0.02)
        before = parallel.wait_stats()
        started, i, go = time.monotonic(), 0, True
        while go:  # every rank runs as many all-reduces: rank 0 says when to stop
            t = torch.full((1024,), float(r + i))
            tree.all_reduce(t)
            want = float(n * i + n * (n - 1) // 2)
            assert torch.all(t == want), (i, t[:4], want)
            i += 1
            if i % 100 == 0:
                flag = torch.tensor([float(r == 0 and time.monotonic() - started < 0.2)])
                tree.all_reduce(flag, "max")
                go = flag.item() > 0
        after = parallel.wait_stats()
    finally:
        stop.set()
        for b in busy:
            b.join()
    assert os.sched_getaffinity(0) == allowed, "a move left the mask changed"
    pairs = after["spread_pairs"] - before["spread_pairs"]
    busy_waits = after["spins_declined_busy"] - before["spins_declined_busy"]
    print(f"apart rank {r} pairs {pairs} declined_busy {busy_waits}")


def bound(tree: parallel.Tree) -> None:
    """Run with TEST_BIND=1: this rank is bound to one CPU (main, before the engine's first
    wait). 4 KiB and 1 MiB all-reduces of rank-dependent values, each checked; prints the CPUs
    it may use and how its waits went (SPIN-5: spins that yield the CPU, not kernel waits)."""
    r, n = tree.rank, tree.world_size
    before = parallel.wait_stats()
    for count, reps in ((1 << 10, 300), (1 << 18, 20)):
        for i in range(reps):
            t = torch.full((count,), float(r + i))
            tree.all_reduce(t)
            want = float(n * i + n * (n - 1) // 2)
            assert torch.all(t == want), (count, i, t[:4], want)
    after = parallel.wait_stats()
    d = {k: after[k] - before[k] for k in after}
    cpus = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    print(f"bound cpus {cpus} " + " ".join(f"{k} {v}" for k, v in sorted(d.items())))


def main() -> int:
    scenario = sys.argv[1]
    if os.environ.get("TEST_BIND") == "1" and len(sys.argv) > 2:
        # Like srun --cpu-bind=threads or taskset: bound before anything of the engine runs.
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[int(sys.argv[2]) % len(cpus)]})
    if len(sys.argv) > 2:
        rank = None if sys.argv[2] == "-" else int(sys.argv[2])
        tree = parallel.tree(rank, int(sys.argv[3]), sys.argv[4], timeout=60)
    else:
        tree = parallel.tree(timeout=60)
    scenarios = {"battery": battery, "uneven": uneven, "mismatch": mismatch, "victim": victim}
    scenarios["a2a_victim"] = a2a_victim
    scenarios["a2a_edges"] = a2a_edges
    scenarios["scatter_gather"] = scatter_gather
    scenarios["peer_on_my_cpu"] = peer_on_my_cpu
    scenarios["bound"] = bound
    scenarios["apart_under_load"] = apart_under_load
    scenarios[scenario](tree)
    print(f"rank {tree.rank} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

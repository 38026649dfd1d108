"""One rank of a test tree: runs a battery of collectives and checks them; exits 0 when all pass.

Usage: tree_worker.py SCENARIO [RANK WORLD ROOT]; without RANK.. the launcher variables are used.
"""

from __future__ import annotations

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


def main() -> int:
    scenario = sys.argv[1]
    if len(sys.argv) > 2:
        rank = None if sys.argv[2] == "-" else int(sys.argv[2])
        tree = parallel.tree(rank, int(sys.argv[3]), sys.argv[4], timeout=60)
    else:
        tree = parallel.tree(timeout=60)
    scenarios = {"battery": battery, "uneven": uneven, "mismatch": mismatch, "victim": victim}
    scenarios["a2a_victim"] = a2a_victim
    scenarios["a2a_edges"] = a2a_edges
    scenarios[scenario](tree)
    print(f"rank {tree.rank} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())

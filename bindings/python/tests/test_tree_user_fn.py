"""A Python reduce function that raises, or returns the wrong shape or dtype, on any rank: every
rank's call raises promptly (the raising rank with its exception as the cause, the others naming
that rank), no tensor changes, and the next call on the same Tree gives the right result.

Sizes: SMALL takes the tree path, where only ranks with children apply the function (rank 0 and,
with 4 ranks, rank 2); LARGE takes the ring, where every rank applies it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

SMALL = 1000
LARGE = 200_003  # float32 elements, over the ring threshold (256 KiB)


def check_all_raise(tree, case: str, bad_rank: int, size: int, f, cause_type: type, text: str) -> None:  # type: ignore[no-untyped-def]
    """Runs all_reduce(x, f) where f misbehaves on `bad_rank`; checks this rank's error."""
    import torch

    import torch_parallel as parallel

    r, n = tree.rank, tree.world_size
    x = torch.arange(size, dtype=torch.float32) * (r + 1)
    before = x.clone()
    t0 = time.monotonic()
    try:
        tree.all_reduce(x, f)
    except parallel.WorkerError as e:
        took = time.monotonic() - t0
        assert took < 30, (case, took)
        msg = str(e)
        # A function raising on one rank is named everywhere; a wrong result is produced on every
        # rank that applies the function (rank 0 and interior ranks): each names one of them.
        named = f"raised on rank {bad_rank}" if cause_type is ValueError else "raised on rank"
        assert named in msg, (case, r, msg)
        assert text in msg, (case, r, msg)
        assert "stays usable" in msg, (case, msg)
        if r == bad_rank:
            assert f"raised on rank {r}" in msg, (case, r, msg)
            assert isinstance(e.__cause__, cause_type), (case, repr(e.__cause__))
            assert text in str(e.__cause__), (case, str(e.__cause__))
        elif cause_type is ValueError:
            assert e.__cause__ is None, (case, r, repr(e.__cause__))
        print(f"{case}: rank {r} raised {type(e).__name__} naming {msg.split('raised on ')[1][:6]}")
    else:
        raise AssertionError(f"{case}: rank {r}: all_reduce did not raise")
    assert torch.equal(x, before), f"{case}: rank {r}: the tensor changed"
    # The Tree stays usable: the next call gives the right result, with a callable and a name.
    y = torch.arange(size, dtype=torch.float32) * (r + 1)
    tree.all_reduce(y, lambda a, b: a.add_(b))
    assert torch.equal(y, torch.arange(size, dtype=torch.float32) * (n * (n + 1) // 2)), case
    z = torch.full((5,), float(r))
    tree.all_reduce(z, "max")
    assert torch.equal(z, torch.full((5,), float(n - 1))), case


def worker(n: int, rank: int, port: int) -> int:
    import torch

    import torch_parallel as parallel

    tree = parallel.tree(rank, n, f"127.0.0.1:{port}", timeout=60)
    r = tree.rank

    def raising_on(k: int):  # type: ignore[no-untyped-def]
        def f(a, b):  # type: ignore[no-untyped-def]
            if r == k:
                raise ValueError(f"boom on {k}")
            return a.add_(b)

        return f

    def wrong_shape(a, b):  # type: ignore[no-untyped-def]
        return (a + b)[:1]

    def wrong_dtype(a, b):  # type: ignore[no-untyped-def]
        return (a + b).double()

    interior = 1 if n >= 4 else 0  # a rank with a child that is not rank 0 (binomial: 3 -> 1)
    cases = [
        ("raise on rank 0, tree path", 0, SMALL, raising_on(0), ValueError, "boom on 0"),
        ("raise on rank 0, ring", 0, LARGE, raising_on(0), ValueError, "boom on 0"),
        (
            "raise on an interior rank, tree path",
            interior,
            SMALL,
            raising_on(interior),
            ValueError,
            f"boom on {interior}",
        ),
        ("raise on rank 1, ring", 1, LARGE, raising_on(1), ValueError, "boom on 1"),
        ("raise on the last rank, ring", n - 1, LARGE, raising_on(n - 1), ValueError, f"boom on {n - 1}"),
        ("wrong shape, tree path", 0, SMALL, wrong_shape, TypeError, "shape (1,)"),
        ("wrong dtype, tree path", 0, SMALL, wrong_dtype, TypeError, "torch.float64"),
    ]
    for case, bad, size, f, cause, text in cases:
        check_all_raise(tree, case, bad, size, f, cause, text)
    # In the ring every rank applies the function: each raising rank has its own cause.
    x = torch.ones(LARGE)
    try:
        tree.all_reduce(x, wrong_dtype)
    except parallel.WorkerError as e:
        assert isinstance(e.__cause__, TypeError) and "torch.float64" in str(e), e
    else:
        raise AssertionError("wrong dtype on every rank did not raise")
    assert torch.equal(x, torch.ones(LARGE))
    # reduce and the asynchronous form fail the same way.
    red = torch.ones(7) * r
    try:
        tree.reduce(red, raising_on(0), root=0)
    except parallel.WorkerError as e:
        assert "raised on rank 0" in str(e), e
        assert (r == 0) == isinstance(e.__cause__, ValueError), repr(e.__cause__)
    else:
        raise AssertionError("reduce did not raise")
    assert torch.equal(red, torch.ones(7) * r)
    w = tree.all_reduce_async(torch.ones(LARGE), raising_on(n - 1))
    try:
        w.wait(60)
    except parallel.WorkerError as e:
        assert f"raised on rank {n - 1}" in str(e), e
        assert (r == n - 1) == isinstance(e.__cause__, ValueError), repr(e.__cause__)
    else:
        raise AssertionError("all_reduce_async did not raise")
    s = torch.ones(3)
    tree.all_reduce(s)
    assert torch.equal(s, torch.full((3,), float(n)))
    print(f"rank {r} ok", flush=True)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("n", [3, 4])
def test_a_failing_reduce_function_raises_on_every_rank_and_the_tree_stays_usable(n: int) -> None:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(n), str(r), str(port)],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    end = time.monotonic() + 240
    res = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a rank did not finish") from None
        res.append((p.returncode, o, e))
    for r, (rc, out, err) in enumerate(res):
        assert rc == 0, f"rank {r}:\n{out}\n{err}"
        assert f"rank {r} ok" in out
        # Every case raised on this rank (none was skipped).
        assert sum(" raised WorkerError naming" in line for line in out.splitlines()) == 7, out


if __name__ == "__main__":
    sys.exit(worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))

"""What a rank that called done() does while it serves the others, across real processes.

Three ranks; rank 0 (the root of the tree, so the rank that combines its children's data) calls
done(op=add) at once; ranks 1 and 2 run a fixed list of collectives, then call done(). Checked:
- the done rank applies done's function only to collectives called with a user function: a
  built-in op (bor, max) keeps its own reduction, never turned into done's sum;
- done() returns the number of collectives as the others called them: a nested value of several
  dtypes (several internal passes) counts once, an empty value counts once;
- a user function is never called on an empty value.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

# What ranks 1 and 2 call while rank 0 is done (each is one collective).
CALLS = ["bor", "max", "nested", "empty_user", "user_add", "all_gather", "barrier"]


def worker(rank: int, port: int) -> int:
    import torch

    import torch_parallel as parallel

    tree = parallel.tree(rank, 3, f"127.0.0.1:{port}", timeout=60)

    def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a.add_(b)

    def refuse_floats(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dtype.is_floating_point:
            raise AssertionError(f"called on {a.dtype} {tuple(a.shape)}: the value has no tensors")
        return a.add_(b)

    if rank == 0:
        served = tree.done(op=add, timeout=60)
        assert served == len(CALLS), f"done() returned {served}, expected {len(CALLS)}"
        print(f"rank {rank} ok served {served}", flush=True)
        return 0
    # 0b011 | 0b110 = 7, where a sum (done's function applied to a built-in op) gives 9.
    bits = {1: 0b011, 2: 0b110}[rank]
    x = torch.full((7,), bits, dtype=torch.int16)
    tree.all_reduce(x, "bor")
    assert x.tolist() == [0b111] * 7, f"bor while rank 0 is done: {x.tolist()}"
    assert tree.contributors == 2
    m = torch.full((5,), float(rank * 10), dtype=torch.float32)
    tree.all_reduce(m, "max")
    assert m.tolist() == [20.0] * 5, f"max while rank 0 is done: {m.tolist()}"
    nested = {
        "i": torch.full((3,), rank, dtype=torch.int64),
        "f": torch.full((2,), 0.5 * rank, dtype=torch.float32),
        "h": torch.ones(4, dtype=torch.float16),
        "n": rank,
    }
    out = tree.all_reduce(nested, "sum")
    assert nested["i"].tolist() == [3] * 3 and nested["f"].tolist() == [1.5] * 2, nested
    assert nested["h"].tolist() == [2.0] * 4 and out["n"] == 3, (nested, out)
    assert tree.all_reduce([], refuse_floats) == []
    assert tree.contributors == 2
    u = torch.full((6,), float(rank), dtype=torch.float64)
    tree.all_reduce(u, add)
    assert u.tolist() == [3.0] * 6, f"user add while rank 0 is done: {u.tolist()}"
    parts = tree.all_gather(torch.tensor([rank]))
    assert parts[0] is None and [p.item() for p in parts[1:]] == [1, 2], parts
    tree.barrier()
    served = tree.done(timeout=60)
    assert served == 0, served
    print(f"rank {rank} ok", flush=True)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_done_rank_keeps_builtin_ops_and_counts_collectives_as_called() -> None:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port)],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(3)
    ]
    end = time.monotonic() + 120
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
        assert rc == 0 and f"rank {r} ok" in out, f"rank {r} (rc {rc}):\n{out}\n{err}"


if __name__ == "__main__":
    sys.exit(worker(int(sys.argv[1]), int(sys.argv[2])))

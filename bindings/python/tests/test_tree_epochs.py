"""Uneven endings across real processes: done() ends a rank's part in the current epoch, the
epoch ends when every rank is done, and the next one starts with every rank on the same Tree.

Each worker runs 5 epochs with different done() orders. At every step it runs each collective
while some ranks are done and checks it against a NumPy reference computed here from every
rank's (seeded) data; broadcast and reduce from a done root must raise the same error on every
rank. Then a fresh Tree per epoch replays it: the results must be bitwise identical.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

# Steps each rank runs in each epoch (then it calls done()); 0 = done at once.
ORDERS = {
    3: [[1, 2, 3], [3, 2, 1], [2, 2, 2], [0, 2, 1], [2, 0, 3]],
    4: [[1, 2, 3, 4], [4, 1, 3, 2], [0, 3, 3, 1], [2, 2, 2, 2], [3, 0, 1, 0]],
}
LARGE = 100_003  # float32 elements: over the ring threshold (256 KiB)


def data(epoch: int, step: int, rank: int, n: int, what: str):  # type: ignore[no-untyped-def]
    import numpy as np

    g = np.random.default_rng([epoch, step, rank, n, sum(map(ord, what))])
    if what == "int":
        return g.integers(-1000, 1000, size=37, dtype=np.int64)
    if what == "large":
        return g.standard_normal(LARGE).astype(np.float32)
    return g.standard_normal(13).astype(np.float32)


def run_epoch(tree, epoch: int, steps: list[int], out: list[bytes], log: list[str]) -> None:  # type: ignore[no-untyped-def]
    import numpy as np
    import torch

    import torch_parallel as parallel

    r, n = tree.rank, tree.world_size
    for s in range(steps[r]):
        active = [k for k in range(n) if steps[k] > s]
        done = [k for k in range(n) if steps[k] <= s]

        def mine(what: str, s: int = s) -> torch.Tensor:
            return torch.from_numpy(data(epoch, s, r, n, what).copy())

        def ref(what: str, s: int = s, active: list[int] = active):  # type: ignore[no-untyped-def]
            return sum(data(epoch, s, k, n, what).astype(np.float64) for k in active)

        where = f"epoch {epoch} step {s} rank {r} (active {active})"
        # all_reduce: exact on integers, the done ranks count as zeros; contributors = active.
        x = mine("int")
        tree.all_reduce(x)
        assert np.array_equal(x.numpy(), ref("int")), where
        assert tree.contributors == len(active), (where, tree.contributors)
        out.append(x.numpy().tobytes())
        # Floats, the tree path and the ring, with a built-in op and a Python callable.
        for what in ("small", "large"):
            for op in ("sum", lambda a, b: a.add_(b)):
                y = mine(what)
                tree.all_reduce(y, op)
                assert np.allclose(y.numpy(), ref(what), rtol=1e-5, atol=1e-4), (where, what, op)
                out.append(y.numpy().tobytes())
            # A callable max over negative numbers: a done rank's zero would win.
            m = -mine(what).abs() - 1
            tree.all_reduce(m, lambda a, b: torch.maximum(a, b, out=a))
            want_max = np.max([-np.abs(data(epoch, s, k, n, what)) - 1 for k in active], axis=0)
            assert np.array_equal(m.numpy(), want_max), (where, what, "max")
            out.append(m.numpy().tobytes())
        z = mine("small")
        tree.all_reduce(z, "avg")
        assert np.allclose(z.numpy(), ref("small") / len(active), rtol=1e-5, atol=1e-5), where
        out.append(z.numpy().tobytes())
        # all_gather: the contributing ranks' tensors at their ranks, None for the done ones.
        parts = tree.all_gather(torch.arange(r + 1, dtype=torch.int32) + 10 * epoch)
        assert len(parts) == n, where
        for k in range(n):
            if k in done:
                assert parts[k] is None, (where, k)
            else:
                assert parts[k].tolist() == [i + 10 * epoch for i in range(k + 1)], (where, k)
        # reduce_scatter: this rank's part of the reduction over the active ranks.
        part = tree.reduce_scatter(mine("small"))
        want = np.array_split(ref("small"), n)[r]
        assert np.allclose(part.numpy(), want, rtol=1e-5, atol=1e-4), where
        out.append(part.numpy().tobytes())
        # barrier among the remaining ranks.
        tree.barrier()
        assert tree.contributors == len(active), where
        # broadcast and reduce from a root that still has data.
        root = active[-1]
        b = mine("small")
        tree.broadcast(b, root=root)
        assert np.array_equal(b.numpy(), data(epoch, s, root, n, "small")), where
        red = mine("int")
        tree.reduce(red, "sum", root=active[0])
        want_red = ref("int") if r == active[0] else data(epoch, s, r, n, "int")
        assert np.array_equal(red.numpy(), want_red), where
        # broadcast and reduce from a done root: the same error on every rank, nothing changed.
        if done:
            for call in ("broadcast", "reduce"):
                t = mine("small")
                before = t.clone()
                try:
                    if call == "broadcast":
                        tree.broadcast(t, root=done[0])
                    else:
                        tree.reduce(t, "sum", root=done[0])
                except parallel.ConfigError as e:
                    assert f"rank {done[0]}" in str(e), (where, e)
                    log.append(f"{epoch}/{s}/{call}: {e}")
                else:
                    raise AssertionError(f"{where}: {call} from done root {done[0]} did not raise")
                assert torch.equal(t, before), where
    tree.done()
    assert tree.contributors == 0


def worker(n: int, rank: int, ports: list[int]) -> int:
    import torch_parallel as parallel

    orders = ORDERS[n]
    tree = parallel.tree(rank, n, f"127.0.0.1:{ports[0]}", timeout=60)
    same_tree: list[list[bytes]] = []
    for e, steps in enumerate(orders):
        out: list[bytes] = []
        log: list[str] = []
        run_epoch(tree, e, steps, out, log)
        same_tree.append(out)
        for line in log:
            print("refused", line, flush=True)
    # A fresh Tree per epoch replays it: bitwise the same results.
    for e, steps in enumerate(orders):
        fresh = parallel.tree(rank, n, f"127.0.0.1:{ports[1 + e]}", timeout=60)
        out = []
        run_epoch(fresh, e, steps, out, [])
        assert out == same_tree[e], f"rank {rank}: epoch {e} differs from a fresh Tree"
        del fresh
    print(f"rank {rank} ok {sum(len(o) for o in same_tree)} results", flush=True)
    return 0


def free_ports(k: int) -> list[int]:
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.mark.parametrize("n", [3, 4])
def test_epochs_of_uneven_endings_on_one_tree_match_the_reference_and_a_fresh_tree(n: int) -> None:
    ports = free_ports(1 + len(ORDERS[n]))
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, str(n), str(r), ",".join(map(str, ports))],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    end = time.monotonic() + 300
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
    # A done root is the same error on every rank that called the collective.
    refused = [sorted(x for x in out.splitlines() if x.startswith("refused")) for _, out, _ in res]
    keys: dict[str, set[str]] = {}
    for lines in refused:
        for line in lines:
            key, msg = line.split(": ", 1)
            keys.setdefault(key, set()).add(msg)
    assert keys, "no collective with a done root was tried"
    for key, msgs in keys.items():
        assert len(msgs) == 1, (key, msgs)


if __name__ == "__main__":
    sys.exit(worker(int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]))

"""One rank of a multi-host test tree, started by test_multihost.py inside a namespace "host".

Usage: multihost_worker.py SCENARIO RANK WORLD ROOT
Runs every check of SCENARIO in this one process (importing torch is the slow part), then prints
one line ``RESULT {json}`` with the plan, this rank's link stats and what it checked; exits 0 only
when every check passed.
"""

from __future__ import annotations

import json
import sys

import torch

import torch_parallel as parallel


def check_small(tree: parallel.Tree) -> None:
    r, n = tree.rank, tree.world_size
    x = torch.full((10,), float(r + 1))
    tree.all_reduce(x)  # below PARALLEL_RING_THRESHOLD: the tree path
    assert torch.equal(x, torch.full((10,), n * (n + 1) / 2)), x
    i = torch.tensor([r + 1, -r, 7], dtype=torch.int64)
    tree.all_reduce(i, "max")
    assert i.tolist() == [n, 0, 7], i
    assert tree.contributors == n


def check_large(tree: parallel.Tree, count: int) -> None:
    """A ring-sized buffer with element-dependent values (a misplaced segment shows), exact in f32."""
    r, n = tree.rank, tree.world_size
    base = torch.arange(count, dtype=torch.float32).remainder_(4093.0)
    t = base + r
    tree.all_reduce(t)
    expected = base * n + n * (n - 1) / 2
    bad = (t != expected).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} wrong elements, first at {bad[0].item()}"
    m = torch.full((count,), float(-r))
    m[r::n] = float(r * 10)
    tree.all_reduce(m, "max")
    exp_m = torch.zeros(count)
    for k in range(n):
        exp_m[k::n] = float(k * 10)
    assert torch.equal(m, exp_m)


def main() -> int:
    scenario, rank, world, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    tree = parallel.tree(rank, world, root, timeout=60)
    checked = []
    check_small(tree)
    checked.append("small")
    if scenario == "hosts2x2":
        check_large(tree, (4 << 20) // 4 + 3)  # just over 4 MiB, not divisible by the world
        checked.append("large")
    elif scenario == "shaped4":
        check_large(tree, (4 << 20) // 4)  # 4 MiB of float32
        checked.append("4MiB")
    else:
        raise SystemExit(f"unknown scenario {scenario}")
    tree.barrier()
    result = {
        "rank": tree.rank,
        "world": tree.world_size,
        "plan": tree.plan(),
        "stats": [{"peer_rank": s["peer_rank"], "link": s["link"]} for s in tree.stats()],
        "checked": checked,
    }
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run by the real torchrun (test_launchers.py, tests/netns): trees from the launcher's
environment, then torch.distributed beside them, proving no port conflict.

argv: OUT_DIR [--no-dist | --dist=parallel]. With --dist=parallel the torch.distributed part runs
on our backend instead of gloo, with cross-host checks (broadcast, all_gather, send/recv between
every pair of ranks). Writes OUT_DIR/rank<r>.json with what each step computed; any failure
raises (a non-zero exit that torchrun reports).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist

import torch_parallel as parallel


def summed(t: parallel.Tree, rank: int) -> float:
    x = torch.full((1000,), float(rank + 1))
    t.all_reduce(x)
    if not bool(torch.all(x == x[0])):
        raise AssertionError(f"rank {rank}: elements differ after all_reduce: {x}")
    return float(x[0])


def backend_checks(rank: int, world: int) -> dict[str, object]:
    """Collectives and point-to-point on the backend "parallel", each checked on this rank."""
    b = torch.full((5,), float(rank)) if rank == 1 else torch.zeros(5)
    dist.broadcast(b, src=1)
    if not bool(torch.all(b == 1.0)):
        raise AssertionError(f"rank {rank}: broadcast from rank 1 gave {b}")
    mine = torch.arange(4, dtype=torch.int64) + 100 * rank
    got = [torch.empty(4, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(got, mine)
    for r, g in enumerate(got):
        if not torch.equal(g, torch.arange(4, dtype=torch.int64) + 100 * r):
            raise AssertionError(f"rank {rank}: all_gather entry {r} is {g}")
    # Every ordered pair exchanges a message: across hosts and inside one.
    pairs = 0
    for src in range(world):
        for dst in range(world):
            if src == dst or rank not in (src, dst):
                continue
            if rank == src:
                dist.send(torch.full((7,), float(10 * src + dst)), dst=dst)
            else:
                r = torch.empty(7)
                dist.recv(r, src=src)
                if not bool(torch.all(r == float(10 * src + dst))):
                    raise AssertionError(f"rank {rank}: message from {src} is {r}")
            pairs += 1
        dist.barrier()
    return {"broadcast": True, "all_gather": True, "pairs": pairs}


def main() -> None:
    out_dir = sys.argv[1]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    result: dict[str, object] = {"rank": rank, "world": world}
    t0 = time.monotonic()
    tree = parallel.tree(timeout=60)  # from the launcher's environment
    result["tree_rank"] = (tree.rank, tree.world_size)
    result["sum"] = summed(tree, rank)
    result["plan"] = tree.plan()
    result["stats"] = tree.stats()
    result["second_tree_before_dist"] = summed(parallel.tree(timeout=60), rank)
    backend = "parallel" if "--dist=parallel" in sys.argv else "gloo"
    if "--no-dist" not in sys.argv:
        # torch's env:// after ours: it must find the launcher's store as it left it.
        dist.init_process_group(backend, timeout=__import__("datetime").timedelta(seconds=60))
        y = torch.full((3,), float(rank + 1))
        dist.all_reduce(y)
        result["gloo_sum" if backend == "gloo" else "dist_sum"] = float(y[0])
        if backend == "parallel":
            result["dist_checks"] = backend_checks(rank, world)
        result["tree_after_dist"] = summed(parallel.tree(timeout=60), rank)
        result["tree_group_world"] = summed(parallel.tree(group=dist.group.WORLD, timeout=60), rank)
        sub = dist.new_group([0, 1])
        if rank in (0, 1):
            g = parallel.tree(group=sub, timeout=60)
            result["tree_group_sub"] = (g.rank, g.world_size, summed(g, rank))
        dist.barrier()
        dist.destroy_process_group()
    result["seconds"] = time.monotonic() - t0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()

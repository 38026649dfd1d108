"""Run by the real torchrun (test_launchers.py, tests/netns): trees from the launcher's
environment, then torch.distributed beside them, proving no port conflict.

argv: OUT_DIR [--no-dist]. Writes OUT_DIR/rank<r>.json with what each step computed; any failure
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
    if "--no-dist" not in sys.argv:
        # torch's env:// after ours: it must find the launcher's store as it left it.
        dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=60))
        y = torch.full((3,), float(rank + 1))
        dist.all_reduce(y)
        result["gloo_sum"] = float(y[0])
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

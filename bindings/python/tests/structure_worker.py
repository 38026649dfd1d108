"""One rank of a test tree for nested values: matching by key, numbers, mismatches, op checks.

Usage: structure_worker.py SCENARIO RANK WORLD ROOT. Prints "rank R ok" when its checks pass.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import torch_parallel as parallel


def shuffled(d: dict[Any, Any], rank: int) -> dict[Any, Any]:
    """The same dict built in a rank-dependent insertion order."""
    keys = list(d)
    k = rank % len(keys)
    order = keys[k:] + keys[:k]
    if rank % 2:
        order.reverse()
    return {key: d[key] for key in order}


def value_of(r: int) -> dict[Any, Any]:
    # Distinct values per key, so that leaves matched by position would give wrong sums.
    inner = {
        "weight": torch.full((3, 4), 1.0 * (r + 1)),
        "bias": torch.full((4,), 10.0 * (r + 1)),
        7: torch.full((2,), 100 * (r + 1), dtype=torch.int64),
        "count": r + 1,
    }
    return shuffled(
        {
            "layer1": shuffled(inner, r + 1),
            "layer0": [torch.full((5,), 1000.0 * (r + 1), dtype=torch.float64), (r * 0.5, True)],
            "loss": 1.5 * (r + 1),
            3: torch.full((1,), 3.0 * (r + 1), dtype=torch.bfloat16),
        },
        r,
    )


def match_by_key(tree: parallel.Tree) -> None:
    r, n = tree.rank, tree.world_size
    s = n * (n + 1) // 2  # sum of (r + 1) over ranks
    v = value_of(r)
    w = v["layer1"]["weight"]
    out = tree.all_reduce(v)
    # Tensors are reduced in place, matched by key whatever the insertion order.
    assert out["layer1"]["weight"] is w
    assert torch.equal(w, torch.full((3, 4), 1.0 * s)), w
    assert torch.equal(v["layer1"]["bias"], torch.full((4,), 10.0 * s))
    assert torch.equal(v["layer1"][7], torch.full((2,), 100 * s, dtype=torch.int64))
    assert torch.equal(v["layer0"][0], torch.full((5,), 1000.0 * s, dtype=torch.float64))
    assert torch.equal(v[3], torch.full((1,), 3.0 * s, dtype=torch.bfloat16))
    # Numbers come back in the returned value (same container types and order), as int/float.
    assert out["loss"] == 1.5 * s and isinstance(out["loss"], float), out["loss"]
    assert out["layer1"]["count"] == s and type(out["layer1"]["count"]) is int
    assert out["layer0"][1] == (sum(k * 0.5 for k in range(n)), n), out["layer0"][1]
    assert isinstance(out["layer0"], list) and isinstance(out["layer0"][1], tuple)
    assert list(out) == list(v) and list(out["layer1"]) == list(v["layer1"])
    # The caller's own numbers are untouched (numbers are immutable).
    assert v["loss"] == 1.5 * (r + 1)
    # The seed's form: a bare number, and a user function over numbers.
    assert tree.all_reduce(2.5) == 2.5 * n
    assert tree.all_reduce({"m": r}, "max") == {"m": n - 1}
    assert tree.all_reduce({"p": float(r + 1)}, lambda a, b: a.mul_(b))["p"] == float(
        torch.arange(1, n + 1).prod()
    )
    # broadcast and reduce match by key too.
    b = shuffled({"x": torch.full((2,), float(r)), "y": torch.full((3,), -float(r)), "z": r}, r)
    got = tree.broadcast(b, root=n - 1)
    assert torch.equal(b["x"], torch.full((2,), float(n - 1)))
    assert torch.equal(b["y"], torch.full((3,), -float(n - 1)))
    assert got["z"] == n - 1
    red = shuffled({"x": torch.full((2,), float(r)), "y": torch.full((3,), 2.0 * r), "z": r}, r)
    got = tree.reduce(red, root=0)
    total = n * (n - 1) // 2
    if r == 0:
        assert torch.equal(red["x"], torch.full((2,), float(total)))
        assert torch.equal(red["y"], torch.full((3,), 2.0 * total))
        assert got["z"] == total
    else:
        assert torch.equal(red["y"], torch.full((3,), 2.0 * r)) and got["z"] == r
    # A value without leaves still takes part (and matches).
    assert tree.all_reduce({}) == {}


def expect_mismatch(tree: parallel.Tree, v: Any) -> None:
    try:
        tree.all_reduce(v)
    except parallel.Mismatch as e:
        print(f"mismatch: {e}", flush=True)
    else:
        raise AssertionError("no mismatch")
    # The tree stays usable.
    t = torch.ones(3)
    tree.all_reduce(t)
    assert torch.equal(t, torch.full((3,), float(tree.world_size)))


def mismatch_shape(tree: parallel.Tree) -> None:
    w = torch.zeros((4, 3) if tree.rank == 2 else (3, 4))
    expect_mismatch(tree, {"layer1": {"weight": w, "bias": torch.zeros(4)}, "a": torch.zeros(1)})


def mismatch_key(tree: parallel.Tree) -> None:
    v: dict[str, Any] = {"a": torch.zeros(2), "c": torch.zeros(2)}
    if tree.rank == 1:
        v["b"] = torch.zeros(2)
    expect_mismatch(tree, v)


def mismatch_dtype(tree: parallel.Tree) -> None:
    dt = torch.float64 if tree.rank == 1 else torch.float32
    expect_mismatch(tree, [torch.zeros(2), {"g": torch.zeros(2, dtype=dt)}])


def mismatch_number(tree: parallel.Tree) -> None:
    expect_mismatch(tree, {"loss": 1 if tree.rank == 2 else 1.0, "t": torch.zeros(2)})


def avg_int(tree: parallel.Tree) -> None:
    t = torch.full((4,), tree.rank + 1, dtype=torch.int32)
    f = torch.full((4,), 1.0)
    try:
        tree.all_reduce({"f": f, "i": t}, "avg")
    except parallel.Unsupported as e:
        print(f"refused: {e}", flush=True)
    else:
        raise AssertionError("avg on int32 was accepted")
    # Nothing moved, and the tree is usable.
    assert torch.equal(t, torch.full((4,), tree.rank + 1, dtype=torch.int32))
    assert torch.equal(f, torch.ones(4))
    tree.all_reduce(f, "avg")
    assert torch.equal(f, torch.ones(4))


def mixed_imports(tree: parallel.Tree) -> None:
    """A bare tensor in the forms each rank may hold it: a plain contiguous CPU tensor (read by
    its attributes), a transposed view, a Parameter that requires grad, an offset slice (taken
    through DLPack); the same structure, reduced together in place."""
    r, n = tree.rank, tree.world_size
    base = torch.arange(12.0).reshape(3, 4) * (r + 1)
    if r % 4 == 0:
        t = base.clone()
        target = t
    elif r % 4 == 1:
        target = base.t().contiguous().clone()
        t = target.t()  # non-contiguous (4, 3) -> (3, 4) view of target
        assert not t.is_contiguous()
    elif r % 4 == 2:
        t = torch.nn.Parameter(base.clone())
        target = t
    else:
        store = torch.zeros(20)
        t = store[8:20].view(3, 4)
        t.copy_(base)
        target = t
    got = tree.all_reduce(t)
    assert got is t
    want = torch.arange(12.0).reshape(3, 4) * (n * (n + 1) // 2)
    assert torch.equal(t.detach(), want), (r, t)
    # The reduced values are in the rank's own memory (a view writes through to its base).
    assert torch.equal((target.t() if r % 4 == 1 else target).detach(), want)
    # Bare tensors that differ: named at the root path on every rank.
    expect_mismatch(tree, torch.zeros(5 if r == 2 else 4))
    expect_mismatch(tree, torch.zeros(4, dtype=torch.float64 if r == 1 else torch.float32))
    # A bare tensor against the same tensor in a list is another structure.
    expect_mismatch(tree, [torch.zeros(4)] if r == 0 else torch.zeros(4))


def main() -> int:
    scenario, rank, world, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    tree = parallel.tree(rank, world, root, timeout=60)
    {
        "match_by_key": match_by_key,
        "mismatch_shape": mismatch_shape,
        "mismatch_key": mismatch_key,
        "mismatch_dtype": mismatch_dtype,
        "mismatch_number": mismatch_number,
        "avg_int": avg_int,
        "mixed_imports": mixed_imports,
    }[scenario](tree)
    print(f"rank {tree.rank} ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

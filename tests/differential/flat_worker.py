"""One rank of the shared-memory fast path tests (tests/differential/test_flat_fastpath.py).

    flat_worker.py MODE SEED RANK WORLD ROOT OUT FLAT_MAX

MODE: `agree` (random all-reduces, broadcasts and barriers around the cut-over FLAT_MAX, checked
against a NumPy reference and, through digests, across ranks; then mismatches and uneven
endings), or `kill` (the last rank kills itself with SIGKILL while the others wait for it in a
small all-reduce). FLAT_MAX: the cut-over every rank expects (the smallest PARALLEL_SHM_FLAT_MAX
of all ranks), 0 when the fast path must be off (PARALLEL_SHM=0 or PARALLEL_SHM_FLAT_MAX=0).
Writes a JSON report to OUT: failures, digests per case, facts the test checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time
import traceback
from typing import Any

import numpy as np
import torch

import torch_parallel as parallel

DTYPES = {
    "float32": (torch.float32, np.float32),
    "float64": (torch.float64, np.float64),
    "int32": (torch.int32, np.int32),
    "int64": (torch.int64, np.int64),
    "uint8": (torch.uint8, np.uint8),
    "float16": (torch.float16, np.float16),
}
OPS = ["sum", "prod", "min", "max", "avg"]


def msgs(tree: parallel.Tree) -> int:
    """Messages this rank sent on its tree links so far."""
    return sum(int(s["msgs_sent"]) for s in tree.stats())


def inputs(seed: int, case: int, rank: int, n: int, dtype: str, op: str) -> np.ndarray:
    """Rank `rank`'s data for a case: exact small integers (for prod: 1s and 2s), or random
    floats for sum/avg of float dtypes (then the order of the reduction shows in the bits)."""
    rng = np.random.default_rng([seed, case, rank])
    npt = DTYPES[dtype][1]
    if op == "prod":
        return rng.integers(1, 3, n).astype(npt)
    if op in ("sum", "avg") and dtype in ("float32", "float64"):
        return rng.standard_normal(n).astype(npt)
    return rng.integers(0, 5, n).astype(npt)


def reference(seed: int, case: int, world: int, n: int, dtype: str, op: str) -> np.ndarray:
    """The result in rank order (FLAT-3), in float64 for floats."""
    xs = [inputs(seed, case, r, n, dtype, op).astype(np.float64) for r in range(world)]
    acc = xs[0].copy()
    for x in xs[1:]:
        acc = {
            "sum": acc + x,
            "avg": acc + x,
            "prod": acc * x,
            "min": np.minimum(acc, x),
            "max": np.maximum(acc, x),
        }[op]
    return acc / world if op == "avg" else acc


class Run:
    def __init__(self, tree: parallel.Tree, seed: int, flat_max: int) -> None:
        self.tree, self.seed, self.flat_max = tree, seed, flat_max
        self.rank, self.world = tree.rank, tree.world_size
        self.failures: list[str] = []
        self.digests: dict[str, str] = {}
        self.facts: dict[str, Any] = {}

    def fail(self, what: str) -> None:
        self.failures.append(f"rank {self.rank}: {what}")

    def traffic(self, case: str, nbytes: int, before: int) -> None:
        """The fast path sends nothing on the links; the control pass does (FLAT-1)."""
        sent = msgs(self.tree) - before
        fast = 0 < self.flat_max and nbytes <= self.flat_max
        if fast and sent != 0:
            self.fail(f"{case}: {nbytes} bytes <= cut-over {self.flat_max} sent {sent} messages")
        if not fast and sent == 0:
            self.fail(f"{case}: {nbytes} bytes (cut-over {self.flat_max}) sent no message")

    def all_reduces(self, ncases: int) -> None:
        rng = random.Random(self.seed)
        for case in range(ncases):
            dtype, op = rng.choice(list(DTYPES)), rng.choice(OPS)
            if op == "avg" and dtype not in ("float32", "float64", "float16"):
                op = "sum"
            item = np.dtype(DTYPES[dtype][1]).itemsize
            # Sizes around the cut-over (in elements of this dtype), and 0 and 1 elements.
            edge = max(1, self.flat_max // item) if self.flat_max else 256
            n = rng.choice([0, 1, edge - 1, edge, edge + 1, rng.randint(1, 2 * edge), rng.randint(1, 64)])
            n = max(n, 0)
            x = inputs(self.seed, case, self.rank, n, dtype, op)
            t = torch.from_numpy(x.copy())
            before = msgs(self.tree)
            self.tree.all_reduce(t, op=op)
            if n > 0:  # (an empty tensor may need no collective at all)
                self.traffic(f"all_reduce #{case} ({n} x {dtype}, {op})", n * item, before)
            got = t.numpy().astype(np.float64)
            want = reference(self.seed, case, self.world, n, dtype, op)
            exact = not (op in ("sum", "avg") and dtype in ("float32", "float64")) and op != "avg"
            if exact and not np.array_equal(got, want.astype(DTYPES[dtype][1]).astype(np.float64)):
                self.fail(f"all_reduce #{case} ({n} x {dtype}, {op}) differs from the reference")
            if not exact and not np.allclose(got, want, rtol=1e-2 if dtype == "float16" else 1e-5, atol=1e-3):
                self.fail(f"all_reduce #{case} ({n} x {dtype}, {op}) is not close to the reference")
            if self.tree.contributors != self.world:
                self.fail(f"all_reduce #{case}: {self.tree.contributors} contributors")
            self.digests[f"ar{case}"] = hashlib.sha256(t.numpy().tobytes()).hexdigest()

    def broadcasts(self, ncases: int) -> None:
        rng = random.Random(self.seed + 1)
        for case in range(ncases):
            root = rng.randrange(self.world)
            n = rng.choice(
                [1, self.flat_max // 4 or 64, (self.flat_max // 4 or 64) + 1, rng.randint(1, 3000)]
            )
            src = np.arange(n, dtype=np.float32) + 1000 * root + case
            t = torch.from_numpy(src.copy() if self.rank == root else np.zeros(n, np.float32))
            before = msgs(self.tree)
            self.tree.broadcast(t, root)
            if self.rank != root:  # (the root of a control pass sends; the fast path does not)
                self.traffic(f"broadcast #{case} ({n} floats from {root})", 4 * n, before)
            if not np.array_equal(t.numpy(), src):
                self.fail(f"broadcast #{case} ({n} floats from rank {root}) differs")
            before = msgs(self.tree)
            self.tree.barrier()
            self.traffic(f"barrier after broadcast #{case}", 0, before)

    def mismatches(self) -> None:
        """TREE-2 on the fast path: the same Mismatch on every rank, naming the culprit."""
        small = max(1, self.flat_max // 8) if self.flat_max else 16
        last = self.world - 1
        cases = {
            "count": (torch.ones(small + (1 if self.rank == last else 0), dtype=torch.float32), "sum"),
            "dtype": (torch.ones(small, dtype=torch.float64 if self.rank == last else torch.float32), "sum"),
            "op": (torch.ones(small, dtype=torch.float32), "max" if self.rank == last else "sum"),
            "size over the cut-over on one rank": (
                torch.ones(
                    small if self.rank != last else max(small, self.flat_max) + 64, dtype=torch.float32
                ),
                "sum",
            ),
        }
        for what, (t, op) in cases.items():
            try:
                self.tree.all_reduce(t, op=op)
                self.fail(f"mismatch ({what}) raised nothing")
            except parallel.Mismatch as e:
                if f"rank {last}" not in str(e):
                    self.fail(f"mismatch ({what}) does not name rank {last}: {e}")
                self.facts[f"mismatch {what}"] = "Mismatch"
            # The tree stays usable and in step.
            t = torch.full((small,), float(self.rank + 1))
            self.tree.all_reduce(t)
            if not bool((t == self.world * (self.world + 1) / 2).all()):
                self.fail(f"all_reduce after the mismatch ({what}) is wrong: {t[:4]}")

    def uneven(self) -> None:
        """TREE-4 across the fast/slow boundary: rank r calls done() after r + 1 steps; each
        step is a small (fast) then a large (control pass) all-reduce and a barrier."""
        small, large = max(1, self.flat_max // 8) if self.flat_max else 16, max(self.flat_max, 4096) // 4 + 8
        steps = self.world + 1
        for step in range(min(self.rank + 1, steps)):
            active = sum(1 for r in range(self.world) if r + 1 > step)
            for n in (small, large):
                t = torch.full((n,), float(self.rank + 1))
                self.tree.all_reduce(t)
                k = self.tree.contributors
                want = sum(r + 1 for r in range(self.world) if r + 1 > step)
                if k != active or not bool((t == want).all()):
                    self.fail(
                        f"uneven step {step} ({n} floats): {k} contributors, {t[:2]}, want {active}, {want}"
                    )
            self.tree.barrier()
        served = self.tree.done(timeout=60)
        self.facts["served"] = served
        # The next epoch: everyone again, on the fast path.
        t = torch.full((small,), 1.0)
        before = msgs(self.tree)
        self.tree.all_reduce(t)
        self.traffic("all_reduce after the epoch", 4 * small, before)
        if self.tree.contributors != self.world or not bool((t == self.world).all()):
            self.fail(f"all_reduce after the epoch: {self.tree.contributors} contributors, {t[:2]}")


def main() -> int:
    mode, seed, rank, world, root, out, flat_max = sys.argv[1:8]
    report: dict[str, Any] = {"rank": int(rank)}
    try:
        tree = parallel.tree(rank=int(rank), world_size=int(world), root=root, timeout=120)
        run = Run(tree, int(seed), int(flat_max))
        if mode == "agree":
            run.all_reduces(120)
            run.broadcasts(12)
            run.mismatches()
            run.uneven()
        elif mode == "kill":
            t = torch.ones(64)
            tree.all_reduce(t)
            if tree.rank == tree.world_size - 1:
                time.sleep(0.5)  # the others are waiting in the next all-reduce by now
                os.kill(os.getpid(), signal.SIGKILL)
            t0 = time.monotonic()
            try:
                tree.all_reduce(t)
                run.fail("the all-reduce with a killed rank returned")
            except parallel.ParallelError as e:
                run.facts["error"] = f"{type(e).__name__}: {e}"
            run.facts["seconds"] = time.monotonic() - t0
        report.update(failures=run.failures, digests=run.digests, facts=run.facts)
    except BaseException:
        report["traceback"] = traceback.format_exc()
    with open(out, "w") as f:
        json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

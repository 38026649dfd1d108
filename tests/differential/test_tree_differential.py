"""Differential test of the Tree: random programs of collectives on 3 and 4 processes, every
result compared with a NumPy reference computed in the test, and across ranks bitwise.

Each batch launches `world` processes (tests/differential/diff_worker.py) that derive the same
program from the seed: all_reduce (sync and async), reduce, broadcast, all_gather, reduce_scatter,
all_to_all (uneven pieces, into given outputs or new tensors; NumPy reference per piece)
and barrier, interleaved; built-in ops and Python functions; dtypes bool, (u)int8..64, float16,
bfloat16, float32/64, complex; shapes with 0-d and empty tensors, strided, transposed and offset
views, ring-sized buffers; nested lists/tuples/dicts; uneven endings with done() (see cases.py for
the flags of behaviours not yet on main). Default: 2 batches of 200 cases per world size (800
cases); `--long` or TP_TEST_LONG=1: 10 batches of 500 per world size (10000 cases).
TP_DIFF_SEED=N reruns a seed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch  # noqa: E402


def batches(config: pytest.Config, world: int) -> list[tuple[int, int]]:
    """(seed, cases) per batch."""
    seed = launch.base_seed(1000 * world + 7)
    if launch.long_mode(config):
        return [(seed + k, 500) for k in range(10)]
    return [(seed, 200), (seed + 1, 200)]


@pytest.mark.parametrize("world", [3, 4])
def test_collectives_match_numpy_reference_and_agree_across_ranks(
    world: int, pytestconfig: pytest.Config
) -> None:
    total, problems = 0, []
    for seed, n in batches(pytestconfig, world):
        reports = launch.run_tree(seed, world, n, timeout=300 if n > 200 else 170)
        ran, p = launch.judge(
            reports,
            f"TP_DIFF_SEED={seed} pytest {__file__} -k 'world{world}' (or "
            f"diff_worker.py tree {seed} {n} RANK {world} HOST:PORT OUT per rank)",
        )
        total += ran
        problems += p
    assert not problems, f"{len(problems) - 1} problem(s):\n" + "\n".join(problems)
    assert total >= (300 if not launch.long_mode(pytestconfig) else 4000), total

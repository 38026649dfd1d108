"""The small-message fast path over shared memory (collectives/src/flat.rs, FLAT-1..6), with ranks
as processes on this host: results against a NumPy reference and bitwise across ranks around the
cut-over; the fast path sends nothing on the links and the control pass does; mismatches on every
rank; uneven endings across the fast/slow boundary; PARALLEL_SHM=0 and PARALLEL_SHM_FLAT_MAX=0; a
rank killed while the others wait for it. Each launch runs many checks (flat_worker.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import launch  # noqa: E402

WORKER = str(Path(__file__).resolve().parent / "flat_worker.py")


def run(
    mode: str, world: int, flat_max: int, envs: list[dict[str, str]], timeout: float = 240
) -> list[dict[str, Any]]:
    """Runs `world` ranks of flat_worker.py (rank r with envs[r]); returns their reports (in
    mode `kill`, the last rank's is not expected)."""
    root = f"127.0.0.1:{launch.free_port()}"
    with tempfile.TemporaryDirectory(prefix="tp-flat-") as d:
        outs = [os.path.join(d, f"rank{r}.json") for r in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, WORKER, mode, "7", str(r), str(world), root, outs[r], str(flat_max)],
                env={**os.environ, **envs[r]},
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(world)
        ]
        logs = launch.wait_all(procs, timeout, f"flat {mode}, {world} ranks")
        reports = []
        for r, path in enumerate(outs[: world - 1] if mode == "kill" else outs):
            assert os.path.exists(path), f"rank {r} wrote no report:\n{logs[r][-3000:]}"
            reports.append(json.loads(Path(path).read_text()))
        return reports


def check(reports: list[dict[str, Any]]) -> None:
    problems = [rep["traceback"] for rep in reports if "traceback" in rep]
    problems += [f for rep in reports for f in rep.get("failures", [])[:10]]
    digests: dict[str, set[str]] = {}
    for rep in reports:
        for case, d in rep.get("digests", {}).items():
            digests.setdefault(case, set()).add(d)
    problems += [f"{case}: ranks ended with different bytes" for case, ds in digests.items() if len(ds) > 1]
    assert not problems, "\n".join(problems)
    assert len(digests) == 120, sorted(digests)


@pytest.mark.parametrize(
    ("world", "flat_max", "envs"),
    [
        (2, 1024, [{"PARALLEL_SHM_FLAT_MAX": "1024"}] * 2),
        # Different settings: the smallest applies on every rank (FLAT-6).
        (3, 2048, [{"PARALLEL_SHM_FLAT_MAX": v} for v in ("4096", "2048", "64K")]),
        (4, 16 << 10, [{}] * 4),
        (2, 0, [{"PARALLEL_SHM": "0"}] * 2),
        (3, 0, [{"PARALLEL_SHM_FLAT_MAX": "0"}] * 3),
    ],
    ids=["world2-1K", "world3-mixed-settings", "world4-default", "world2-shm-off", "world3-flat-off"],
)
def test_fast_path_results_match_reference_agree_bitwise_and_keep_mismatch_and_uneven_endings(
    world: int, flat_max: int, envs: list[dict[str, str]]
) -> None:
    reports = run("agree", world, flat_max, envs)
    check(reports)
    for rep in reports:
        facts = rep["facts"]
        assert all(facts.get(f"mismatch {w}") == "Mismatch" for w in ("count", "dtype", "op")), facts


@pytest.mark.parametrize("world", [2, 3])
def test_rank_killed_while_others_wait_on_the_fast_path_is_an_error_within_seconds(world: int) -> None:
    reports = run("kill", world, 1 << 20, [{}] * world)
    survivors = reports[: world - 1]
    for rep in survivors:
        assert "traceback" not in rep, rep["traceback"]
        assert not rep["failures"], rep["failures"]
        err, secs = rep["facts"]["error"], rep["facts"]["seconds"]
        # The tree's timeout is 120 s: the error comes from the liveness check (FLAT-4).
        assert secs < 10, (secs, err)
        assert f"rank {world - 1}" in err, err

"""Launching the differential workers and judging their reports (used by the tests)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "diff_worker.py")


def long_mode(config: Any = None) -> bool:
    """`--long` (tests/differential/conftest.py) or TP_TEST_LONG=1: thousands of cases."""
    if config is not None:
        try:
            if config.getoption("--long"):
                return True
        except ValueError:
            pass
    return os.environ.get("TP_TEST_LONG", "") not in ("", "0")


def base_seed(default: int) -> int:
    """TP_DIFF_SEED reproduces a run; without it the default seed (fixed, so CI is stable)."""
    s = os.environ.get("TP_DIFF_SEED")
    return int(s) if s else default


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_tree(seed: int, world: int, ncases: int, timeout: float) -> list[dict[str, Any]]:
    """Runs one batch on `world` processes; returns their reports (asserting they all wrote one)."""
    root = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory(prefix="tp-diff-") as d:
        outs = [os.path.join(d, f"rank{r}.json") for r in range(world)]
        procs = [
            subprocess.Popen(
                [sys.executable, WORKER, "tree", str(seed), str(ncases), str(r), str(world), root, outs[r]],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            for r in range(world)
        ]
        logs = wait_all(procs, timeout, f"seed {seed}, {world} ranks")
        reports = []
        for r, path in enumerate(outs):
            if not os.path.exists(path):
                raise AssertionError(
                    f"rank {r} wrote no report (seed {seed}, {world} ranks):\n{logs[r][-3000:]}"
                )
            reports.append(json.loads(Path(path).read_text()))
        return reports


def wait_all(procs: list[subprocess.Popen[str]], timeout: float, what: str) -> list[str]:
    end = time.monotonic() + timeout
    logs = []
    for i, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            rest = [q.communicate()[0] for q in procs]
            raise AssertionError(
                f"HANG: process {i} of {what} did not finish in {timeout:.0f}s\n"
                + "\n".join(x[-2000:] for x in rest)
            ) from None
        logs.append(out)
    return logs


def judge(reports: list[dict[str, Any]], repro: str) -> tuple[int, list[str]]:
    """(cases run, problems): failures, stopped runs, and results that differ across ranks."""
    problems: list[str] = []
    for rep in reports:
        for f in rep.get("failures", [])[:20]:
            problems.append(f"rank {f['rank']}: {f['what']}\n    -> {f['msg']}")
        if len(rep.get("failures", [])) > 20:
            problems.append(f"rank {rep['rank']}: ... {len(rep['failures']) - 20} more failures")
        if rep.get("stopped"):
            problems.append(f"rank {rep['rank']} stopped:\n{rep['stopped'][-2500:]}")
    seen: dict[str, dict[int, str]] = {}
    for rep in reports:
        for case, d in rep.get("digests", {}).items():
            seen.setdefault(case, {})[rep["rank"]] = d
    for case, by_rank in sorted(seen.items(), key=lambda kv: int(kv[0])):
        if len(set(by_rank.values())) > 1:
            problems.append(f"case {case}: ranks ended with different results (digests {by_rank})")
    ran = max((rep.get("cases", 0) for rep in reports), default=0)
    if problems:
        problems.insert(0, f"reproduce with: {repro}")
    return ran, problems

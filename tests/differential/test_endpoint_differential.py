"""Differential test of Client/Server: random nested values sent, received (with and without
`out=`, blocking and asynchronous), checked on the server process and echoed back to be checked
again by the client; see endpoint_cases.py. Default: 300 messages; `--long` or TP_TEST_LONG=1:
3000. TP_DIFF_SEED=N reruns a seed."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import endpoint_cases  # noqa: E402
import launch  # noqa: E402


def test_round_trips_of_random_values_arrive_bit_identical(pytestconfig: pytest.Config) -> None:
    seed = launch.base_seed(5151)
    n = 3000 if launch.long_mode(pytestconfig) else 300
    with tempfile.TemporaryDirectory(prefix="tp-diff-") as d:
        report = os.path.join(d, "server.json")
        server = subprocess.Popen(
            [sys.executable, launch.WORKER, "echo", str(seed), str(n), report],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert server.stdout is not None
        line = server.stdout.readline()
        assert line.strip().isdigit(), f"the echo server did not start: {line}{server.communicate()[0]}"
        problems, ran = endpoint_cases.client_loop(seed, n, int(line))
        log = launch.wait_all([server], 120, "the echo server")[0]
        rep = launch.json.loads(Path(report).read_text()) if os.path.exists(report) else None
    assert rep is not None, f"the echo server wrote no report:\n{log[-3000:]}"
    problems += [f"server, case {f['case']}: {f['msg']} (spec {f['spec']})" for f in rep["failures"]]
    if rep["stopped"]:
        problems.append(f"server stopped:\n{rep['stopped'][-2500:]}")
    assert not problems, f"reproduce with TP_DIFF_SEED={seed}\n" + "\n".join(problems[:30])
    assert ran == n

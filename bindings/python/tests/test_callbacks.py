"""Python on the engine's executor (PY-3, PY-4): done callbacks of handles and works, and lanes
of Python jobs (what the torch.distributed backend runs its sends and receives on)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
import torch

import torch_parallel as parallel
from torch_parallel import _native


def _wait_for(cond, seconds: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < end, "the condition did not become true in time"
        time.sleep(0.005)


def test_a_handles_done_callback_runs_once_off_the_callers_thread_after_its_result(pair):
    s, c, conn = pair
    calls: list[tuple[str, bool]] = []
    h = conn.recv_async(timeout=10, out=torch.empty(3))
    h.add_done_callback(lambda: calls.append((threading.current_thread().name, h.done())))
    time.sleep(0.05)
    assert calls == [], "the callback ran before the operation completed"
    c.send(torch.tensor([1.0, 2.0, 3.0]))
    _wait_for(lambda: calls)
    time.sleep(0.05)
    assert len(calls) == 1, calls
    name, done = calls[0]
    assert done and name != threading.current_thread().name
    assert torch.equal(h.wait(1), torch.tensor([1.0, 2.0, 3.0]))
    # Registered after completion: still runs (once), on the callback lane.
    later: list[int] = []
    h.add_done_callback(lambda: later.append(1))
    _wait_for(lambda: later)
    sent = c.send_async("x")
    seen = threading.Event()
    sent.add_done_callback(seen.set)
    assert seen.wait(10)
    assert conn.recv(timeout=10) == "x"


def test_a_failed_operation_still_calls_back_and_its_wait_raises(pair):
    _, _, conn = pair
    seen = threading.Event()
    h = conn.recv_async(timeout=0.1)
    h.add_done_callback(seen.set)
    assert seen.wait(10)
    with pytest.raises(parallel.Timeout):
        h.wait(1)


def test_a_raising_callback_does_not_stop_the_next(pair):
    _, c, conn = pair
    seen = threading.Event()
    h = conn.recv_async(timeout=10)

    def boom() -> None:
        raise RuntimeError("callback fails (expected in this test)")

    h.add_done_callback(boom)
    h.add_done_callback(seen.set)
    c.send(1)
    assert seen.wait(10)
    assert h.wait(1) == 1


def test_a_lanes_jobs_run_in_order_and_return_or_raise():
    lane = _native.Lane()
    order: list[int] = []

    def job(i: int):
        time.sleep(0.01 * (5 - i))  # later jobs are shorter: order is the lane's, not luck
        order.append(i)
        return i * i

    jobs = [lane.submit(lambda i=i: job(i)) for i in range(5)]
    assert [j.wait(10) for j in jobs] == [0, 1, 4, 9, 16]
    assert order == [0, 1, 2, 3, 4]
    assert jobs[0].wait(0) == 0, "a second wait returns the result again"

    def fails() -> None:
        raise KeyError("nope")

    bad = lane.submit(fails)
    after = lane.submit(lambda: "after")
    with pytest.raises(KeyError, match="nope"):
        bad.wait(10)
    with pytest.raises(KeyError):
        bad.wait(0)
    assert after.wait(10) == "after", "a job that raised does not stop the lane"
    assert lane.pending() == 0
    slow = lane.submit(lambda: time.sleep(0.5))
    with pytest.raises(parallel.Timeout):
        slow.wait(0.05)
    assert slow.wait(10) is None
    names: list[str] = []
    lane.submit(lambda: names.append(threading.current_thread().name)).wait(10)
    assert names and names[0] != threading.current_thread().name


EXIT_SCRIPT = """
import time, torch_parallel
lane = torch_parallel._native.Lane()
job = lane.submit(lambda: (time.sleep(0.4), print("job ran", flush=True)))
job.add_done_callback(lambda: (time.sleep(0.2), print("callback ran", flush=True)))
print("main ends", flush=True)
"""


def test_exit_waits_for_running_jobs_and_callbacks_and_ends_cleanly():
    """PY-4: the atexit hook lets running Python jobs and callbacks finish, then closes the
    gate; the process exits 0 without 'terminate called' or a fatal Python error."""
    r = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "main ends" in r.stdout and "job ran" in r.stdout, r.stdout
    assert "callback ran" in r.stdout, r.stdout
    assert "Fatal" not in r.stderr and "terminate" not in r.stderr, r.stderr

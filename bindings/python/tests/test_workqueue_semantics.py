"""parallel.workqueue semantics that used to give a wrong result or hang (issue 10, behaviours
8-10): when the owner's iteration ends, how a write larger than the capacity proceeds, and what
``drain()`` waits for. Workers are threads and real processes that open the queue by name.

Invariants checked: HQ-6 (no early end while a process attaches), HQ-7 / WQ-2 (write
back-pressure), WQA-1..3 / WQ-7 (drain settles answered or abandoned questions; a worker
process killed holding questions is a named error), in workers/src/host/ and queue/.

Scripts run in child processes where the test needs its own configuration (a small capacity, a
short PARALLEL_TIMEOUT so that a regression fails instead of hanging).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import pytest

import torch_parallel as parallel

from .conftest import finish, spawn

# Every child gets a short default deadline: a regression is an error, never a hang.
SHORT = {"PARALLEL_TIMEOUT": "60"}


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


ECHO = """
import sys, torch, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
assert not q.creator
for item in q:
    q.write(item.sum().item() if isinstance(item, torch.Tensor) else item)
q.close()
"""

# --------------------------------------------------------------------------------------------
# 8. The owner's iteration ends only when the queue is closed and every answer was read.

OWNER_ITERATES_WHILE_WORKERS_ATTACH = """
import subprocess, sys, torch, torch_parallel as parallel
name, echo, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
for r in range(rounds):
    q = parallel.workqueue(f"{name}-{r}")
    # Big questions make the move to shared memory, when the first worker process connects,
    # take a while: the owner's iteration runs across it.
    questions = [torch.full((4 << 20,), float(i)) for i in range(6)]
    q.write(*questions)
    q.close()
    kids = [subprocess.Popen([sys.executable, "-c", echo, q.name]) for _ in range(2)]
    answers = [a for a in q]  # must not end before every answer is in
    expected = sorted(float(i) * (4 << 20) for i in range(6))
    assert sorted(answers) == expected, (r, answers)
    for k in kids:
        assert k.wait(60) == 0
print("ok", flush=True)
"""


def test_owner_iteration_does_not_end_while_a_worker_process_is_attaching() -> None:
    p = spawn(OWNER_ITERATES_WHILE_WORKERS_ATTACH, unique("attach"), ECHO, "4", env=SHORT)
    rc, out, err = finish(p, timeout=240)
    assert rc == 0, err
    assert out.strip() == "ok"


def test_owner_iteration_waits_for_a_process_that_took_questions_then_ends() -> None:
    # The worker process takes every question quickly, then answers slowly: the owner's
    # iteration keeps going until the last answer is read, then ends with the queue.
    name = unique("slow")
    q = parallel.workqueue(name)
    q.write(*range(5))
    q.close()
    p = spawn(SLOW_ECHO, name, env=SHORT)
    got = []
    deadline = time.monotonic() + 60
    for a in q:
        got.append(a)
        assert time.monotonic() < deadline
    assert sorted(got) == [0, 10, 20, 30, 40]
    rc, _, err = finish(p)
    assert rc == 0, err


SLOW_ECHO = """
import sys, time, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
taken = list(q)  # every question, up to the end of the questions
for x in taken:
    time.sleep(0.1)
    q.write(x * 10)
q.close()
"""


def test_owner_iteration_with_worker_threads_ends_after_the_last_answer() -> None:
    q = parallel.workqueue(unique("threads"))

    def worker(_i: int) -> None:
        w = parallel.workqueue(q.name)
        for x in w:
            time.sleep(0.01)
            w.write(x + 1)

    h = parallel.map(3, worker)
    q.write(*range(50))
    q.close()
    assert sorted(q) == list(range(1, 51))
    h.join(timeout=30)


# --------------------------------------------------------------------------------------------
# 9. write(*items) with more items than the capacity completes as workers consume.

BIG_WRITE = """
import subprocess, sys, threading, time, torch_parallel as parallel
name, collect = sys.argv[1], sys.argv[2]
assert int(parallel.config()["PARALLEL_WORKQUEUE_CAPACITY"]) == 2

# A worker thread: one call writes 1000 questions into a queue of capacity 2.
q = parallel.workqueue(name + "-threads")
got = []
def worker(_i):
    got.extend(parallel.workqueue(q.name))
h = parallel.map(1, worker)
q.write(*range(1000), timeout=60)
q.close()
h.join(timeout=60)
assert got == list(range(1000)), got[:20]  # one reader: the order is kept
print("threads", flush=True)

# A worker process (items through shared memory) that answers once, at the end.
q = parallel.workqueue(name + "-procs")
k = subprocess.Popen([sys.executable, "-c", collect, q.name])
q.write(*range(1000), timeout=60)
q.close()
assert q.read(timeout=60) == list(range(1000))
assert k.wait(60) == 0
print("processes", flush=True)

# Nobody reads: the write fails at its deadline, says how far it got, and hangs nothing.
q = parallel.workqueue(name + "-stuck")
w = parallel.workqueue(q.name)
t0 = time.monotonic()
try:
    q.write(*range(10), timeout=0.5)
    raise SystemExit("a write no one reads must time out")
except parallel.Timeout as e:
    took = time.monotonic() - t0
    assert 0.5 <= took < 5, took
    assert "2 of the 10 items were written" in str(e), e
    assert "capacity 2" in str(e), e
# The two that went in are there, in order, and the queue still works.
assert [w.read(timeout=5), w.read(timeout=5)] == [0, 1]
q.write("after")
assert w.read(timeout=5) == "after"
print("timeout", flush=True)
"""


COLLECT = """
import sys, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
q.write(list(q))
q.close()
"""


def test_write_of_more_items_than_the_capacity_completes_as_workers_consume() -> None:
    p = spawn(BIG_WRITE, unique("big"), COLLECT, env={**SHORT, "PARALLEL_WORKQUEUE_CAPACITY": "2"})
    rc, out, err = finish(p, timeout=240)
    assert rc == 0, err
    assert out.split() == ["threads", "processes", "timeout"], out + err


# --------------------------------------------------------------------------------------------
# 10. drain() waits for the answers still outstanding; unanswered questions don't poison it.


def test_drain_is_not_poisoned_by_a_sentinel_that_is_never_answered() -> None:
    q = parallel.workqueue(unique("sentinel"))

    def worker(_i: int) -> None:
        w = parallel.workqueue(q.name)
        for x in w:
            if x is None:  # the sentinel: stop without answering
                return
            w.write(x * 2)

    h = parallel.map(2, worker)
    q.write(*range(10))
    q.drain(timeout=30)
    assert sorted(q.read(timeout=5) for _ in range(10)) == [2 * i for i in range(10)]
    q.write(None)  # stops one worker; nobody answers it
    start = time.monotonic()
    q.drain(timeout=30)
    assert time.monotonic() - start < 10
    q.write(*range(5))  # the other worker answers these
    q.drain(timeout=30)
    assert sorted(q.read(timeout=5) for _ in range(5)) == [0, 2, 4, 6, 8]
    q.write(None)
    q.close()
    h.join(timeout=30)
    q.drain(timeout=5)


def test_drain_waits_for_answers_still_outstanding_and_survives_a_timed_out_drain() -> None:
    q = parallel.workqueue(unique("outstanding"))
    go = threading.Event()

    def worker(_i: int) -> None:
        w = parallel.workqueue(q.name)
        for x in w:
            go.wait(30)
            w.write(x)

    h = parallel.map(1, worker)
    q.write("a", "b")
    start = time.monotonic()
    with pytest.raises(parallel.Timeout) as info:
        q.drain(timeout=0.3)
    assert time.monotonic() - start < 5
    # The error says what is outstanding.
    assert "2 of the 2 questions written before drain() are still unanswered" in str(info.value)
    go.set()
    q.drain(timeout=30)  # the same two answers: a timed-out drain changes nothing
    assert [q.read(timeout=5), q.read(timeout=5)] == ["a", "b"]
    q.drain(timeout=5)  # nothing outstanding: returns at once
    q.write("c")
    q.drain(timeout=30)
    assert q.read(timeout=5) == "c"
    q.close()
    h.join(timeout=30)


def test_drain_with_worker_processes_and_an_unanswered_sentinel() -> None:
    name = unique("drain-procs")
    q = parallel.workqueue(name)
    p = spawn(STOP_ON_NONE, name, env=SHORT)
    q.write(*range(20))
    q.drain(timeout=60)
    assert sorted(q.read(timeout=5) for _ in range(20)) == list(range(20))
    q.write(None)  # the worker process stops without answering
    q.drain(timeout=60)
    rc, _, err = finish(p)
    assert rc == 0, err
    q.write(1)  # a question nobody will take: drain times out, naming it
    with pytest.raises(parallel.Timeout, match="1 questions queued"):
        q.drain(timeout=0.3)


STOP_ON_NONE = """
import sys, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
for x in q:
    if x is None:
        break
    q.write(x)
q.close()
"""


# --------------------------------------------------------------------------------------------
# A worker process killed with kill -9 mid-item: the owner gets an error naming it.

HOLD = """
import sys, time, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
print("holding", q.read(timeout=30), flush=True)
time.sleep(120)
"""


def start_holder(name: str) -> subprocess.Popen[str]:
    p = spawn(HOLD, name, env=SHORT)
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "holding 7"
    return p


def test_a_worker_killed_mid_item_is_an_error_naming_it_in_drain() -> None:
    name = unique("kill-drain")
    q = parallel.workqueue(name)
    q.write(7)
    p = start_holder(name)
    p.send_signal(signal.SIGKILL)
    finish(p)
    start = time.monotonic()
    with pytest.raises(parallel.WorkerError, match=f"worker process {p.pid}") as info:
        q.drain(timeout=30)
    assert time.monotonic() - start < 10
    assert "1 unanswered question" in str(info.value)
    q.drain(timeout=5)  # reported once; the lost question no longer holds drain up
    q.close()
    with pytest.raises(parallel.Closed):
        q.read(timeout=5)


def test_a_worker_killed_mid_item_is_an_error_naming_it_in_the_owners_iteration() -> None:
    name = unique("kill-iter")
    q = parallel.workqueue(name)
    q.write(7)
    p = start_holder(name)
    w = parallel.workqueue(name)  # a worker thread answers the rest
    q.write(8)
    assert w.read(timeout=5) == 8
    w.write("eight")
    w.close()
    q.close()
    killer = threading.Timer(0.3, lambda: os.kill(p.pid, signal.SIGKILL))
    killer.start()
    got = []
    start = time.monotonic()
    with pytest.raises(parallel.WorkerError, match=f"worker process {p.pid}"):
        for a in q:  # the owner is iterating while the worker dies: no silent short end
            got.append(a)
    assert time.monotonic() - start < 10
    killer.join()
    finish(p)
    assert got == ["eight"]
    with pytest.raises(parallel.Closed):
        q.read(timeout=5)


def test_a_worker_killed_mid_item_is_an_error_for_an_owner_waiting_on_an_open_queue() -> None:
    name = unique("kill-open")
    q = parallel.workqueue(name)
    q.write(7)
    p = start_holder(name)
    os.kill(p.pid, signal.SIGKILL)
    finish(p)
    start = time.monotonic()
    with pytest.raises(parallel.WorkerError, match=f"worker process {p.pid}"):
        q.read(timeout=30)  # the queue is still open: without the report this waits 30 s
    assert time.monotonic() - start < 10
    with pytest.raises(parallel.Timeout, match="questions open"):
        q.read(timeout=0.2)  # reported once; then an ordinary wait with its state


@pytest.mark.parametrize("n", [0, 1, 2])
def test_queues_with_no_answers_outstanding_drain_at_once(n: int) -> None:
    q = parallel.workqueue(unique("empty-drain"))
    w = parallel.workqueue(q.name)
    for i in range(n):
        q.write(i)
        w.write(w.read(timeout=5))
    start = time.monotonic()
    q.drain(timeout=5)
    assert time.monotonic() - start < 2

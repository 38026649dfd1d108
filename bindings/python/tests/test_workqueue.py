"""parallel.workqueue: the seed's example (threads and processes), ordering, many readers, close
and end of queue, timeouts, back-pressure, tensors by reference between threads and through
shared memory between processes, processes killed while holding the queue.

Invariants checked: WQ-1..5 (engine workers/queue.rs), HQ-1..4 (workers/host.rs), SHQ-2..4
(workers/shared.rs), PYWQ-1..3 (bindings workers.rs).
"""

from __future__ import annotations

import pathlib
import queue
import signal
import threading
import time
import uuid

import pytest
import torch

import torch_parallel as parallel

from .conftest import finish, spawn


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:12]}"


def write_files(tmp: pathlib.Path) -> list[str]:
    names = []
    for i in range(1, 4):
        p = tmp / f"f{i}.pt"
        torch.save(torch.full((10 * i,), float(i)), p)
        names.append(str(p))
    return names


def seed_worker(queue_name: str, _map_id: int) -> None:
    # As in the seed: open the queue by name, load each file named on it, write the tensor back.
    import torch_parallel as parallel

    q = parallel.workqueue(queue_name)
    for file_name in q:
        q.write(torch.load(file_name))


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_seed_workqueue_two_workers_load_files(tmp_path: pathlib.Path, processes: bool) -> None:
    names = write_files(tmp_path)
    name = unique("my queue")
    q = parallel.workqueue(name)
    assert q.creator and q.owner
    workers = parallel.map(2, seed_worker, name, processes=processes)
    q.write(names[0])
    q.write(names[1])
    q.write(names[2])
    got = sorted((q.read(timeout=60) for _ in range(3)), key=len)
    for i, t in enumerate(got, start=1):
        assert torch.equal(t, torch.full((10 * i,), float(i)))
    q.close()
    workers.join(timeout=60)
    assert q.shared == processes
    with pytest.raises(parallel.Closed, match="end of queue"):
        q.read(timeout=5)


def test_wq_3_one_writer_is_read_in_order_and_multi_writes_are_adjacent() -> None:
    q = parallel.workqueue(unique("order"))
    got: list[object] = []

    def reader(_i: int) -> None:
        w = parallel.workqueue(q.name)
        got.extend(w)

    h = parallel.map(1, reader)
    q.write(*range(500))
    q.write("a", None, [1, 2], {"k": b"v"})
    q.close()
    h.join(timeout=10)
    assert got == [*range(500), "a", None, [1, 2], {"k": b"v"}]


def test_many_readers_take_every_item_exactly_once() -> None:
    q = parallel.workqueue(unique("readers"))
    taken: list[list[int]] = [[], [], []]

    def reader(i: int) -> None:
        for item in parallel.workqueue(q.name):
            taken[i].append(item)

    h = parallel.map(3, reader)
    for i in range(900):
        q.write(i)
    q.close()
    h.join(timeout=10)
    assert sorted(sum(taken, [])) == list(range(900))
    assert all(mine == sorted(mine) for mine in taken)


def test_wq_1_close_ends_workers_then_the_owner() -> None:
    q = parallel.workqueue(unique("close"))
    w = parallel.workqueue(q.name)
    assert not w.creator
    q.write(1, 2)
    q.close()
    with pytest.raises(parallel.Closed):
        q.write(3)
    assert list(w) == [1, 2]
    w.write("answer")  # a worker may still answer after the owner's close
    assert q.read(timeout=5) == "answer"
    with pytest.raises(queue.Empty):
        q.read(block=False)  # a worker is still open: not the end yet
    w.close()
    with pytest.raises(parallel.Closed, match="end of queue"):
        q.read(timeout=5)


def test_pywq_3_non_blocking_reads_and_none_items_are_distinct() -> None:
    q = parallel.workqueue(unique("nb"))
    w = parallel.workqueue(q.name)
    with pytest.raises(queue.Empty):
        w.read(block=False)
    q.write(None)
    assert w.read(block=False) is None
    assert len(w) == 0


def test_wq_5_reads_time_out_promptly() -> None:
    w = parallel.workqueue(parallel.workqueue(unique("timeout")).name)
    start = time.monotonic()
    with pytest.raises(TimeoutError):
        w.read(timeout=0.2)
    assert 0.2 <= time.monotonic() - start < 3


BACKPRESSURE = """
import sys, threading, time, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
w = parallel.workqueue(sys.argv[1])
q.write(1, 2)
t0 = time.monotonic()
try:
    q.write(3, timeout=0.2)
except parallel.Timeout as e:
    assert "PARALLEL_WORKQUEUE_CAPACITY" in str(e), e
    took = time.monotonic() - t0
    print("blocked" if 0.2 <= took < 3 else f"blocked for {took}s")
got = []
reader = threading.Timer(0.2, lambda: got.append(w.read(timeout=5)))
reader.start()
q.write(3, timeout=5)  # waits until the reader makes room
reader.join()  # (one thread prints: two would interleave their output)
print("read", got[0])
print("wrote 3", [w.read(timeout=5), w.read(timeout=5)])
"""


def test_wq_2_back_pressure_blocks_writers_until_readers_make_room() -> None:
    p = spawn(BACKPRESSURE, unique("bp"), env={"PARALLEL_WORKQUEUE_CAPACITY": "2"})
    rc, out, err = finish(p)
    assert rc == 0, err
    assert out.split("\n")[:3] == ["blocked", "read 1", "wrote 3 [2, 3]"], out


def test_pywq_1_tensors_move_between_threads_by_reference() -> None:
    q = parallel.workqueue(unique("byref"))
    batch = torch.zeros(4, 3)

    def fill(_i: int) -> None:
        w = parallel.workqueue(q.name)
        for row, b in w:
            b[row] = row + 1  # writes land in the owner's tensor
            w.write(row)

    h = parallel.map(2, fill)
    q.write(*[(r, batch) for r in range(4)])
    assert sorted(q.read(timeout=5) for _ in range(4)) == [0, 1, 2, 3]
    q.close()
    h.join(timeout=5)
    assert torch.equal(batch, torch.arange(1, 5.0).unsqueeze(1).expand(4, 3))


def test_pywq_1_strided_views_keep_their_layout() -> None:
    q = parallel.workqueue(unique("strided"))
    w = parallel.workqueue(q.name)
    base = torch.arange(12.0).reshape(3, 4)
    q.write(base.t())
    got = w.read(timeout=5)
    assert torch.equal(got, base.t())
    got[0, 1] = -1.0
    assert base[1, 0] == -1.0, "the same memory"


ECHO = """
import sys, torch, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
assert not q.creator
for item in q:
    q.write(item * 2 if isinstance(item, torch.Tensor) else item)
"""


def test_hq_1_another_process_opens_the_same_queue_and_tensors_cross() -> None:
    name = unique("xproc")
    q = parallel.workqueue(name)
    p = spawn(ECHO, name)
    big = torch.randn(4 << 20)  # 16 MiB
    q.write("hello", big, {"n": 3})
    assert q.read(timeout=60) == "hello"
    back = q.read(timeout=60)
    assert torch.equal(back, big * 2)
    assert q.read(timeout=60) == {"n": 3}
    assert q.shared
    q.close()
    rc, _, err = finish(p)
    assert rc == 0, err
    with pytest.raises(parallel.Closed):
        q.read(timeout=5)


DIE = """
import sys, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
q._die_holding_lock()
"""


def test_shq_2_a_process_killed_holding_the_lock_leaves_the_queue_usable() -> None:
    name = unique("die")
    q = parallel.workqueue(name)
    assert hasattr(q, "_die_holding_lock"), (
        "this build lacks its test hooks: build the extension with --features test-hooks (scripts/setup.sh)"
    )
    rc, _, err = finish(spawn(DIE, name))
    assert rc == -signal.SIGKILL, err
    assert q.shared
    w = parallel.workqueue(name)
    start = time.monotonic()
    q.write(torch.ones(1000))
    assert torch.equal(w.read(timeout=5), torch.ones(1000))
    assert time.monotonic() - start < 3


HOLD = """
import sys, time, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
held = q.read(timeout=30)
print("holding", held.shape[0], flush=True)
time.sleep(60)
"""


def test_hq_3_a_killed_worker_process_is_not_waited_for_and_its_lost_item_is_reported() -> None:
    name = unique("hold")
    q = parallel.workqueue(name)
    p = spawn(HOLD, name)
    q.write(torch.ones(1 << 20))
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "holding 1048576"
    p.kill()
    finish(p)
    q.close()
    start = time.monotonic()
    # WQA-3: it died holding a question, so its answer is lost: an error naming it, not a
    # silent end of queue; then the end of queue.
    with pytest.raises(parallel.WorkerError, match=f"worker process {p.pid}"):
        q.read(timeout=10)
    with pytest.raises(parallel.Closed):
        q.read(timeout=10)
    assert time.monotonic() - start < 3


def test_a_queue_passed_to_worker_processes_opens_by_name() -> None:
    q = parallel.workqueue(unique("passed"))
    h = parallel.map(2, pass_through, q, processes=True)
    q.write(1, 2)
    assert sorted(q.read(timeout=60) for _ in range(2)) == [10, 20]
    q.close()
    h.join(timeout=60)


def pass_through(q: parallel.WorkQueue, _i: int) -> None:
    assert not q.creator
    q.write(q.read(timeout=30) * 10)


def test_owner_object_used_from_worker_threads_acts_as_a_worker() -> None:
    q = parallel.workqueue(unique("shared-object"))
    done = threading.Event()

    def use_owner_object(_i: int) -> None:
        assert not q.owner
        q.write(q.read(timeout=5) + 1)
        done.set()

    h = parallel.map(1, use_owner_object)
    q.write(41)
    assert q.read(timeout=5) == 42
    q.close()
    h.join(timeout=5)
    assert done.is_set()
    # The worker thread ended, so its handle closed: the owner reaches end of queue.
    with pytest.raises(parallel.Closed):
        q.read(timeout=5)


INPLACE = """
import sys, torch_parallel as parallel
q = parallel.workqueue(sys.argv[1])
t = q.read(timeout=30)
t += 1  # the same memory as the owner's tensor
q.write(float(t.sum()))
"""


def test_arena_tensors_cross_processes_by_reference() -> None:
    # q.empty() tensors live in the queue's shared arena: no copy on either side, and the
    # reader's in-place writes are the owner's.
    name = unique("arena")
    q = parallel.workqueue(name)
    t = q.empty((1000,), torch.float32)
    t.fill_(1.0)
    p = spawn(INPLACE, name)
    q.write(t)
    assert q.read(timeout=60) == 2000.0
    assert torch.equal(t, torch.full((1000,), 2.0))
    rc, _, err = finish(p)
    assert rc == 0, err

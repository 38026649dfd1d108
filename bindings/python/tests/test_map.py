"""parallel.map and parallel.Pool: the seed's map example, worker order, worker exceptions with
their original type, dead worker processes, join deadlines, pools with progress.

Invariants checked: PYMAP-1..3 (torch_parallel/_workers.py), MAP-1..3 (engine workers/map.rs).
"""

from __future__ import annotations

import os
import pathlib
import threading
import time

import pytest
import torch

import torch_parallel as parallel


def write_files(tmp: pathlib.Path) -> list[str]:
    names = []
    for i in range(1, 4):
        p = tmp / f"f{i}.pt"
        torch.save(torch.full((100 * i,), float(i)), p)
        names.append(str(p))
    return names


def load(file_names: list[str], map_id: int) -> torch.Tensor:
    # The seed: `return torch.load(fileNames[mapid])` (indices from 0 in Python).
    return torch.load(file_names[map_id])


def test_seed_map_loads_three_files_in_parallel(tmp_path: pathlib.Path) -> None:
    names = write_files(tmp_path)
    t1, t2, t3 = parallel.map(3, load, names).join()
    for i, t in enumerate((t1, t2, t3), start=1):
        assert torch.equal(t, torch.full((100 * i,), float(i)))


def test_seed_map_in_clean_processes_returns_tensors_through_shared_memory(
    tmp_path: pathlib.Path,
) -> None:
    names = write_files(tmp_path)
    t1, t2, t3 = parallel.map(3, load, names, processes=True).join(timeout=60)
    for i, t in enumerate((t1, t2, t3), start=1):
        assert isinstance(t, torch.Tensor)
        assert torch.equal(t, torch.full((100 * i,), float(i)))


def slow_then_index(delay: float, i: int) -> int:
    time.sleep(delay * (3 - i))
    return i * 10


def test_pymap_1_results_in_worker_order_whatever_finishes_first() -> None:
    h = parallel.map(3, slow_then_index, 0.05)
    assert h.join(timeout=5) == [0, 10, 20]
    assert h.done()
    with pytest.raises(parallel.Closed):
        h.join()


def fail_in_one(i: int) -> int:
    if i == 1:
        raise ValueError(f"bad input in worker {i}")
    return i


def test_pymap_2_a_thread_exception_keeps_its_type_and_names_the_worker() -> None:
    with pytest.raises(ValueError, match="bad input in worker 1") as info:
        parallel.map(3, fail_in_one).join(timeout=5)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "worker 1 of 3" in notes
    assert info.traceback[-1].name == "fail_in_one", "the original traceback is kept"


def raise_key_error(i: int) -> None:
    raise KeyError(f"missing {i}")


def test_pymap_2_a_process_exception_keeps_its_type_with_the_remote_traceback() -> None:
    with pytest.raises(KeyError, match="missing 0") as info:
        parallel.map(2, raise_key_error, processes=True).join(timeout=60)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "worker 0 of 2 (process" in notes
    assert "raise_key_error" in notes, "the worker's traceback travels in the note"
    assert "workers 1 failed too" in notes


def die_in_one(i: int) -> int:
    if i == 1:
        os._exit(3)
    return i


def test_pymap_2_a_dead_worker_process_is_a_worker_error() -> None:
    start = time.monotonic()
    with pytest.raises(parallel.WorkerError, match="worker 1 of 2 .* exited with code 3"):
        parallel.map(2, die_in_one, processes=True).join(timeout=60)
    assert time.monotonic() - start < 30


def test_pymap_3_join_times_out_and_can_be_repeated() -> None:
    gate = threading.Event()

    def wait_gate(i: int) -> int:
        if i == 1:
            assert gate.wait(10)
        return i

    h = parallel.map(2, wait_gate)
    start = time.monotonic()
    with pytest.raises(parallel.Timeout, match="1 of 2 map workers still running"):
        h.join(timeout=0.1)
    assert time.monotonic() - start < 3
    assert not h.done()
    gate.set()
    assert h.join(timeout=5) == [0, 1]


def square(x: int) -> int:
    return x * x


def test_pool_threads_submit_and_map_with_progress() -> None:
    seen: list[tuple[int, int]] = []
    with parallel.Pool(2) as pool:
        assert pool.submit(square, 7).result(timeout=5) == 49
        out = pool.map(square, range(50), progress=lambda d, t: seen.append((d, t)))
    assert out == [x * x for x in range(50)]
    assert seen[-1] == (50, 50) and len(seen) == 50


def make_tensor(n: int) -> torch.Tensor:
    if n < 0:
        raise ArithmeticError("negative size")
    return torch.arange(n, dtype=torch.float32)


def test_pool_processes_map_returns_tensors_and_exceptions(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with parallel.Pool(2, processes=True) as pool:
        out = pool.map(make_tensor, [3, 1000, 0], timeout=60, progress=True)
        assert [t.tolist() for t in (out[0], out[2])] == [[0.0, 1.0, 2.0], []]
        assert torch.equal(out[1], torch.arange(1000, dtype=torch.float32))
        fut = pool.submit(make_tensor, -1)
        with pytest.raises(ArithmeticError, match="negative size"):
            fut.result(timeout=30)
    assert "[parallel] 3/3" in capsys.readouterr().err

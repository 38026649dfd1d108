"""Trees under real launchers and over stores: torchrun (standalone, c10d, static rendezvous),
torch.distributed stores, process groups, and ranks that never arrive.

Each torchrun launch runs many checks in one go (a launch costs seconds of CPU here); every
launch and child has a timeout.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torch_parallel as parallel

from .conftest import finish, spawn

HERE = Path(__file__).resolve().parent
WORKER = str(HERE / "launcher_worker.py")
LAUNCH_TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(args: list[str], out: Path, env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", *args, WORKER, str(out)]
    full_env = {**os.environ, **(env or {}), "OMP_NUM_THREADS": "1"}
    for var in ("PARALLEL_ROOT", "PARALLEL_RANK", "PARALLEL_WORLD_SIZE"):
        full_env.pop(var, None)
    p = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert p.returncode == 0, f"torchrun {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-6000:]}"


def check_results(out: Path, n: int) -> list[dict[str, object]]:
    want = float(n * (n + 1) // 2)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    for r, res in enumerate(results):
        assert res["tree_rank"] == [r, n], res
        for key in ("sum", "second_tree_before_dist", "tree_after_dist", "tree_group_world"):
            assert res[key] == want, (key, res)
        assert res["gloo_sum"] == want, res
        if r < 2:
            assert res["tree_group_sub"] == [r, 2, 3.0], res
        else:
            assert "tree_group_sub" not in res
        assert f"{n} ranks on 1 host(s)" in str(res["plan"]), res["plan"]
    return results


@pytest.mark.parametrize(
    ("mode", "nproc"),
    [("standalone", 3), ("c10d", 2), ("static", 3), ("c10d-no-shared-store", 2)],
)
def test_tree_from_the_torchrun_environment_then_gloo_and_group_trees(
    tmp_path: Path, mode: str, nproc: int
) -> None:
    port = free_port()
    env: dict[str, str] = {}
    args = {
        "standalone": ["--standalone"],
        "c10d": ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--nnodes=1"],
        "static": ["--nnodes=1", "--node-rank=0", "--master-addr=127.0.0.1", f"--master-port={port}"],
        # The agent shares no store: torch's rank 0 serves MASTER_PORT (multi-tenant), which
        # the tree's store and init_process_group's share in that process.
        "c10d-no-shared-store": [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint=127.0.0.1:{port}",
            "--nnodes=1",
        ],
    }[mode]
    if mode == "c10d-no-shared-store":
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    torchrun([*args, "--nproc-per-node", str(nproc), "--max-restarts=0"], tmp_path, env)
    check_results(tmp_path, nproc)


def test_rust_tree_under_torchrun_without_a_store_is_a_config_error_never_binding_master_port(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    for k, v in {
        "TORCHELASTIC_RUN_ID": "test",
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("PARALLEL_ROOT", raising=False)
    with pytest.raises(parallel.ConfigError) as info:
        parallel.Tree(timeout=5)  # the native constructor: no store
    msg = str(info.value)
    assert "torchrun" in msg and "PARALLEL_ROOT" in msg and "store" in msg, msg
    with socket.socket() as s:  # the port is still free: nothing bound it
        s.bind(("127.0.0.1", port))


def run_threads(target: object, n: int) -> None:
    threads = [threading.Thread(target=target, args=(r,)) for r in range(n)]  # type: ignore[arg-type]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
        assert not t.is_alive(), "a rank thread hung"


def test_trees_over_one_hashstore_between_threads_use_separate_keys() -> None:
    store = dist.HashStore()
    sums: dict[tuple[int, int], float] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            for k in range(2):  # two trees over the same store, one after the other
                t = parallel.tree(store=store, rank=r, world_size=3, timeout=30)
                x = torch.full((7,), float(r + 1) * (k + 1))
                t.all_reduce(x)
                sums[(r, k)] = float(x[0])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    run_threads(rank, 3)
    assert not errors, errors
    assert sums == {(r, k): 6.0 * (k + 1) for r in range(3) for k in range(2)}
    # Rank 0 deletes its entry once every rank arrived: the store keeps no key per tree.
    assert not store.check(["torch_parallel/tree/0/root"])
    assert not store.check(["torch_parallel/tree/1/root"])


def test_a_new_store_object_per_tree_never_meets_through_an_earlier_trees_entry(
    tmp_path: Path,
) -> None:
    # Each tree opens the file store again, so every tree's prefix is torch_parallel/tree/0/;
    # rank 1 asks for the second tree's root before rank 0 publishes it.
    path = str(tmp_path / "store")
    sums: dict[tuple[int, int], float] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            for k in range(2):
                if r == 0 and k == 1:
                    time.sleep(0.5)
                t = parallel.tree(store=dist.FileStore(path, -1), rank=r, world_size=2, timeout=20)
                x = torch.full((3,), float(r + 1) * (k + 1))
                t.all_reduce(x)
                sums[(r, k)] = float(x[0])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    run_threads(rank, 2)
    assert not errors, errors
    assert sums == {(r, k): 3.0 * (k + 1) for r in range(2) for k in range(2)}


class _DictStore:
    """A plain Python store without ``delete_key``: rank 0's entry then just stays."""

    def __init__(self) -> None:
        self.map: dict[str, bytes] = {}
        self.lock = threading.Lock()

    def set(self, key: str, value: bytes) -> None:
        with self.lock:
            self.map[key] = bytes(value)

    def check(self, keys: list[str]) -> bool:
        with self.lock:
            return all(k in self.map for k in keys)

    def get(self, key: str) -> bytes:
        with self.lock:
            return self.map[key]


def test_a_python_store_without_delete_key_still_meets() -> None:
    store = _DictStore()
    sums: dict[int, float] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            t = parallel.tree(store=store, rank=r, world_size=2, timeout=20)
            x = torch.full((3,), float(r + 1))
            t.all_reduce(x)
            sums[r] = float(x[0])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    run_threads(rank, 2)
    assert not errors, errors
    assert sums == {0: 3.0, 1: 3.0}
    assert "torch_parallel/tree/0/root" in store.map


class _InterruptedStore:
    """A store whose every call meets Ctrl-C (the handler raises inside the store's code)."""

    def set(self, key: str, value: bytes) -> None:
        raise KeyboardInterrupt

    def check(self, keys: list[str]) -> bool:
        raise KeyboardInterrupt

    def get(self, key: str) -> bytes:
        raise KeyboardInterrupt

    def delete_key(self, key: str) -> bool:
        raise KeyboardInterrupt


@pytest.mark.parametrize("rank", [0, 1])
def test_ctrl_c_inside_a_python_store_call_is_keyboard_interrupt(rank: int) -> None:
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        parallel.tree(store=_InterruptedStore(), rank=rank, world_size=2, timeout=20)
    assert time.monotonic() - t0 < 10


def test_trees_over_a_filestore_with_one_store_object_per_rank(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    sums: dict[int, float] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:  # each rank opens the file as a process would
            t = parallel.tree(store=dist.FileStore(path, -1), rank=r, world_size=2, timeout=30)
            x = torch.full((3,), float(r + 1))
            t.all_reduce(x)
            sums[r] = float(x[0])
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    run_threads(rank, 2)
    assert not errors, errors
    assert sums == {0: 3.0, 1: 3.0}


def test_tree_over_a_store_needs_rank_and_world_size() -> None:
    with pytest.raises(ValueError, match="rank= and world_size="):
        parallel.tree(store=dist.HashStore(), world_size=2)
    with pytest.raises(ValueError, match="not both"):
        parallel.tree(store=dist.HashStore(), rank=0, world_size=1, root="127.0.0.1:1")


MISSING = """
    import json, sys, time
    import torch.distributed as dist
    import torch_parallel as parallel
    store = dist.FileStore(sys.argv[1], -1) if sys.argv[3] == "file" else dist.TCPStore(
        "127.0.0.1", int(sys.argv[4]), is_master=False, timeout=__import__("datetime").timedelta(seconds=20))
    # Both ranks start their 4 s together: on a loaded machine one may import torch seconds after
    # the other, and a member whose own deadline passes before rank 0 names the missing rank
    # rightly reports only that the plan never came.
    store.add("started", 1)
    for _ in range(6000):
        if store.add("started", 0) >= 2:
            break
        time.sleep(0.005)
    t0 = time.monotonic()
    try:
        parallel.tree(store=store, rank=int(sys.argv[2]), world_size=3, timeout=4)
        print(json.dumps({"error": None}))
    except parallel.ParallelError as e:
        print(json.dumps({"error": type(e).__name__, "msg": str(e), "took": time.monotonic() - t0,
                          "timeout_error": isinstance(e, TimeoutError)}))
"""


@pytest.mark.parametrize("kind", ["file", "tcp"])
def test_a_rank_that_never_arrives_fails_the_others_within_the_timeout_naming_it(
    tmp_path: Path, kind: str
) -> None:
    port = free_port()
    host = dist.TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False) if kind == "tcp" else None
    path = str(tmp_path / "store")
    procs = [spawn(MISSING, path, str(r), kind, str(port)) for r in range(2)]
    for p in procs:
        rc, out, err = finish(p, 60)
        assert rc == 0, err
        res = json.loads(out.strip().splitlines()[-1])
        assert res["error"] == "Timeout" and res["timeout_error"], res
        assert "rank 2" in res["msg"] and "never arrived" in res["msg"], res
        assert res["took"] < 4 + 1.5, res  # within the timeout (plus scheduling slack)
    del host


def test_members_waiting_for_a_root_that_never_comes_name_rank_0(tmp_path: Path) -> None:
    store = dist.FileStore(str(tmp_path / "store"), -1)
    t0 = time.monotonic()
    with pytest.raises(parallel.Timeout) as info:
        parallel.tree(store=store, rank=1, world_size=2, timeout=1.5)
    assert "rank 0" in str(info.value) and "never arrived" in str(info.value), info.value
    assert time.monotonic() - t0 < 1.5 + 1.5


def test_a_missing_rank_under_slurm_is_named_with_its_host_from_the_hostlist(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for k, v in {
        "SLURM_PROCID": "0",
        "SLURM_JOB_NODELIST": "gpu-a[01-02],login",
        "SLURM_TASKS_PER_NODE": "1(x2),1",
    }.items():
        monkeypatch.setenv(k, v)
    for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_USE_AGENT_STORE"):
        monkeypatch.delenv(k, raising=False)
    store = dist.HashStore()
    errors: dict[int, BaseException] = {}

    def rank(r: int) -> None:
        try:
            parallel.tree(store=store, rank=r, world_size=3, timeout=2)
        except BaseException as e:  # noqa: BLE001 - checked by the main thread
            errors[r] = e

    run_threads(rank, 2)  # ranks 0 and 1; rank 2 (on "login") never comes
    assert sorted(errors) == [0, 1], errors
    for e in errors.values():
        assert isinstance(e, parallel.Timeout), e
        assert "rank 2 (host login) never arrived" in str(e), e

"""CUDA tensors through torch_parallel (issue #5): point to point and collectives, across processes.

Every check runs in worker processes (cuda_worker.py), two or three at a time on one GPU, each with
a deadline; a failure shows every worker's output. Between processes of one host, CUDA tensors go
by CUDA IPC (the default), staged through pinned host memory (PARALLEL_CUDA_IPC=0), or staged over
TCP (PARALLEL_SHM=0). Skipped, with the reason, where torch sees no CUDA device.
"""

from __future__ import annotations

import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time
import warnings

import pytest

torch = pytest.importorskip("torch")
with warnings.catch_warnings(record=True) as _said:  # e.g. "driver too old": a reason, not an error
    warnings.simplefilter("always")
    _cuda = torch.cuda.is_available()
if not _cuda:
    pytest.skip(
        "CUDA tests need an NVIDIA GPU that torch can use (torch.cuda.is_available() is False; "
        f"torch {torch.__version__}, built for CUDA {torch.version.cuda})"
        + "".join(f"; {w.message}" for w in _said),
        allow_module_level=True,
    )

import torch_parallel as parallel  # noqa: E402

pytestmark = pytest.mark.timeout(600)  # the workers' own deadlines come first

WORKER = str(pathlib.Path(__file__).with_name("cuda_worker.py"))
DEADLINE = 300.0  # seconds for one set of workers, imports and CUDA start-up included
KNOBS = (
    "PARALLEL_CUDA",
    "PARALLEL_CUDA_IPC",
    "PARALLEL_CUDA_IPC_CACHE",
    "PARALLEL_CUDA_IPC_THRESHOLD",
    "PARALLEL_SHM",
)
MODES = {
    "ipc": {},  # the defaults: CUDA IPC over the shared-memory link
    "staged": {"PARALLEL_CUDA_IPC": "0"},  # pinned host memory, shared-memory link
    "tcp": {"PARALLEL_SHM": "0"},  # pinned host memory, TCP link
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Worker:
    """A child process whose output goes to files (a pipe nobody reads could block it)."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        full = {k: v for k, v in os.environ.items() if k not in KNOBS}
        full.update(env)
        self.out = tempfile.TemporaryFile("w+")
        self.err = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, *argv], env=full, stdout=self.out, stderr=self.err)

    def result(self) -> tuple[int, str, str]:
        self.proc.wait(timeout=30)
        texts = []
        for f in (self.out, self.err):
            f.seek(0)
            texts.append(f.read())
            f.close()
        return self.proc.returncode, texts[0], texts[1]


def start(args: list[str], env: dict[str, str]) -> Worker:
    return Worker([WORKER, *args], env)


def finish(workers: list[Worker], deadline: float = DEADLINE) -> list[tuple[int, str, str]]:
    """Waits for every worker; once one fails, gives the rest 5 s, then kills whatever is left.
    Raises with every worker's output when one did not finish in time."""
    procs = [w.proc for w in workers]
    end = time.monotonic() + deadline
    failed_at = None
    while any(p.poll() is None for p in procs):
        now = time.monotonic()
        if any(p.returncode not in (None, 0) for p in procs):
            failed_at = failed_at or now
        if now >= end or (failed_at is not None and now - failed_at > 5):
            break
        time.sleep(0.1)
    late = [i for i, p in enumerate(procs) if p.poll() is None]
    for p in procs:
        if p.poll() is None:
            p.kill()
    res = [w.result() for w in workers]
    if late and failed_at is None:
        raise AssertionError(f"worker(s) {late} did not finish in {deadline:.0f} s\n{show(res)}")
    return res


def show(res: list[tuple[int, str, str]]) -> str:
    return "\n".join(
        f"--- worker {i} rc={rc}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-6000:]}"
        for i, (rc, out, err) in enumerate(res)
    )


def assert_ok(res: list[tuple[int, str, str]]) -> None:
    assert all(rc == 0 for rc, _, _ in res), show(res)
    assert all(out.rstrip().endswith("ok") for _, out, _ in res), show(res)


def pair(scenario: str, env: dict[str, str], tmp_path: pathlib.Path) -> list[tuple[int, str, str]]:
    port, flag = str(free_port()), str(tmp_path / f"{scenario}.flag")
    recv = start(["recv", scenario, port, flag], env)
    send = start(["send", scenario, port, flag], env)
    return finish([recv, send])


def tree(n: int, scenario: str, env: dict[str, str] | None = None) -> list[tuple[int, str, str]]:
    root = f"127.0.0.1:{free_port()}"
    return finish([start(["tree", scenario, str(r), str(n), root], env or {}) for r in range(n)])


def test_torch_parallel_sees_the_gpu():
    available = getattr(parallel, "cuda_available", None)
    assert available is not None, "torch_parallel.cuda_available() is missing"
    info = getattr(parallel, "cuda_info", lambda: "")()
    assert available() is True, f"torch sees a GPU but torch_parallel does not: {info}"
    assert isinstance(info, str) and info


@pytest.mark.parametrize("mode", list(MODES))
def test_point_to_point_dtypes_views_sizes_and_outs(mode, tmp_path):
    """Every dtype; views with storage offsets and non-contiguous views; 0, 1, odd and 64 MiB;
    received anew (on cuda:0), into a CUDA out= (in place; also a view and a transposed one, the
    memory around them untouched), into a CPU out=, and CPU tensors into a CUDA out=; stream order
    on both ends. Each value is compared on the CPU with what the sender computed."""
    res = pair("battery", MODES[mode], tmp_path)
    assert_ok(res)
    if mode == "tcp":
        assert "link tcp" in res[0][1] and "link tcp" in res[1][1], show(res)


@pytest.mark.parametrize("mode", list(MODES))
def test_sent_tensors_may_be_overwritten_or_freed_once_send_returns(mode, tmp_path):
    """The sender overwrites, or frees (and reuses the memory of, or empties torch's cache of)
    every tensor right after send returns; the receiver, which receives only afterwards where
    send does not wait for it, must get what was sent."""
    assert_ok(pair("keepalive", MODES[mode], tmp_path))


@pytest.mark.parametrize("n", [2, 3])
def test_all_reduce_and_broadcast_of_cuda_tensors(n):
    """sum/max/min/prod/avg on float32, int32, float16, bfloat16 below and above the ring
    threshold; a callable (a.add_(b)), which must be handed CUDA tensors; 64 MiB; a nested container
    with views; input produced on a busy side stream; broadcast from every root. Every result is
    compared exactly with the reduction computed on the CPU."""
    assert_ok(tree(n, "battery"))


@pytest.mark.parametrize("mode", ["ipc", "tcp"])
def test_large_cuda_all_reduces_take_the_ring(mode):
    """Three ranks; CUDA all-reduces above the ring threshold (64 MiB among them, sizes that divide
    neither by the world nor by a chunk) take the ring with the device kernels, by CUDA IPC of
    chunks or staged over TCP, and equal the CPU reduction; a callable that raises on one rank
    fails every rank and leaves every tensor unchanged."""
    assert_ok(tree(3, "ring", MODES[mode]))


@pytest.mark.parametrize("n", [2, 3])
def test_cpu_and_cuda_tensors_mixed_across_ranks_work_or_fail_promptly_everywhere(n):
    """Rank 0 passes a CPU tensor, the others CUDA ones: right on every rank, or a torch_parallel
    error on every rank within 15 s (the tree's timeout is 60 s: no rank may wait it out)."""
    res = tree(n, "mixed")
    assert_ok(res)
    lines = [next(x for x in out.splitlines() if x.startswith("MIXED ")) for _, out, _ in res]
    outcomes = {line.split()[1] for line in lines}
    assert len(outcomes) == 1, f"some ranks succeeded, some failed:\n{show(res)}"
    for line in lines:  # "MIXED ok 0.01s on cuda:0" or "MIXED error Mismatch 0.01s: message"
        m = re.search(r" (\d+\.\d+)s", line)
        assert m and float(m.group(1)) < 15, f"not prompt: {line}\n{show(res)}"
        assert line.split()[1] == "ok" or line.split()[2] != "Timeout", f"failed only by timing out: {line}"


def test_cuda_disabled_refuses_cuda_tensors_clearly():
    """PARALLEL_CUDA=0: a CUDA tensor is refused with an error naming the knob; the link survives."""
    code = """
import sys, torch, torch_parallel as parallel
s = parallel.server("127.0.0.1", 0)
c = parallel.client("127.0.0.1", s.port, timeout=30)
s.wait_for(1, timeout=30)
conn = s.connections()[0]
try:
    c.send(torch.ones(3, device="cuda"), timeout=30)
except parallel.ParallelError as e:
    print("refused:", type(e).__name__, e)
else:
    print("accepted", conn.recv(timeout=30))
c.send("still fine", timeout=30)
print(conn.recv(timeout=30))
"""
    p = Worker(["-c", code], {"PARALLEL_CUDA": "0"})
    (rc, out, err) = finish([p], deadline=120)[0]
    assert rc == 0, out + err
    assert out.startswith("refused:") and "PARALLEL_CUDA" in out, out + err
    assert out.rstrip().endswith("still fine"), out + err


def test_torch_distributed_on_cuda_tensors_matches_gloo_under_torchrun():
    """The real launcher, 2 ranks on the one GPU, backend "parallel": every collective on CUDA
    tensors against a CPU reference, DDP bit-identical to gloo's, FSDP2 close to DDP
    (dist_cuda_worker.py)."""
    script = str(pathlib.Path(__file__).with_name("dist_cuda_worker.py"))
    env = {k: v for k, v in os.environ.items() if k not in KNOBS and k != "TORCHELASTIC_RUN_ID"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", script]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=DEADLINE, env=env)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-8000:]
    for r in range(2):
        m = re.search(rf"rank {r}: cuda dist ok \((\d+) checks\)", out)
        assert m and int(m.group(1)) > 50, out[-8000:]

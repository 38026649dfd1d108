"""The bindings' CUDA glue on a machine without a GPU: the real wheel against the fake libcuda
(engine/tests/fake_cuda/libcuda.c, built here with cc) and fake CUDA arrays (fakecuda.py).

What runs: DLPack import of kDLCUDA producers with the engine's ``stream=`` (dlpack.rs), export of
received CUDA tensors and ``Received.__dlpack_device__`` (lib.rs), the allocator hook
(``_set_cuda_allocator``), contiguous stand-ins of non-contiguous CUDA ``out=`` views and their
write-back (convert.rs, Handle.wait), and the Tree's fused device buffer for several CUDA tensors
(tree.rs ``cuda_group``) in a broadcast (the fake launches no kernels, so no reduction).

``dlopen`` reads LD_LIBRARY_PATH once, at process start: every check runs in worker processes
(fake_cuda_worker.py) started with the fake's directory first in it, each with a deadline; a
failure shows every worker's output. Skipped when there is no C compiler.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

HERE = pathlib.Path(__file__).resolve().parent
SOURCE = HERE.parents[1] / "engine" / "tests" / "fake_cuda" / "libcuda.c"
WORKER = str(HERE / "fake_cuda_worker.py")
DEADLINE = 60.0  # seconds for one set of workers
KNOBS = ("PARALLEL_CUDA", "PARALLEL_CUDA_IPC", "PARALLEL_CUDA_IPC_THRESHOLD", "PARALLEL_SHM")
# mode: (environment, the link, messages of at least this many CUDA bytes go by IPC or -1)
MODES = {
    "ipc-all": ({"PARALLEL_SHM": "1", "PARALLEL_CUDA_IPC_THRESHOLD": "0"}, "shm", 0),
    "shm": ({"PARALLEL_SHM": "1"}, "shm", 1 << 20),
    "staged": ({"PARALLEL_SHM": "1", "PARALLEL_CUDA_IPC": "0"}, "shm", -1),
    "tcp": ({"PARALLEL_SHM": "0"}, "tcp", -1),
}


@pytest.fixture(scope="module")
def fake_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    cc = shutil.which("cc")
    if cc is None:
        pytest.skip("no C compiler (cc) to build the fake libcuda")
    d = tmp_path_factory.mktemp("fake_cuda")
    r = subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            "-O1",
            "-Wall",
            "-Wl,-soname,libcuda.so.1",
            "-o",
            str(d / "libcuda.so.1"),
            str(SOURCE),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, f"building the fake libcuda failed:\n{r.stderr}"
    (d / "libcuda.so").symlink_to("libcuda.so.1")  # cudarc opens libcuda.so first
    return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_workers(fake: pathlib.Path, argvs: list[list[str]], env: dict[str, str]) -> None:
    """Runs the workers together; fails with all their output unless every one printed ok."""
    full = {k: v for k, v in os.environ.items() if k not in KNOBS}
    full.update(env)
    full["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(fake), os.environ.get("LD_LIBRARY_PATH")]))
    procs = []
    for argv in argvs:
        out = tempfile.TemporaryFile("w+")  # files, not pipes: a full pipe nobody reads blocks
        p = subprocess.Popen([sys.executable, WORKER, *argv], env=full, stdout=out, stderr=subprocess.STDOUT)
        procs.append((argv, p, out))
    failed = False
    for _, p, _ in procs:
        try:
            p.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            failed = True
            for _, q, _ in procs:
                q.kill()
                q.wait()
    report = []
    for argv, p, out in procs:
        out.seek(0)
        text = out.read()
        out.close()
        ok = p.returncode == 0 and text.rstrip().endswith("ok")
        failed |= not ok
        report.append(f"--- worker {' '.join(argv)}: exit {p.returncode}\n{text}")
    assert not failed, ("timed out or failed\n" if failed else "") + "\n".join(report)


@pytest.mark.parametrize("mode", list(MODES))
def test_point_to_point(fake_dir: pathlib.Path, mode: str) -> None:
    """Both directions of CPU/CUDA, with and without out= (contiguous, transposed), across
    processes by CUDA IPC or staged through host memory."""
    env, link, ipc_bytes = MODES[mode]
    port = str(free_port())
    env = {**env, "FAKE_LINK": link, "FAKE_IPC_BYTES": str(ipc_bytes)}
    run_workers(fake_dir, [["recv", port], ["send", port]], env)


def test_dlpack_device_after_export(fake_dir: pathlib.Path) -> None:
    env, link, ipc_bytes = MODES["shm"]
    port = str(free_port())
    env = {**env, "FAKE_LINK": link, "FAKE_IPC_BYTES": str(ipc_bytes), "FAKE_DEVICE_AFTER_EXPORT": "1"}
    run_workers(fake_dir, [["recv", port], ["send", port]], env)


@pytest.mark.parametrize("mode", ["shm", "tcp"])
def test_tree_broadcast(fake_dir: pathlib.Path, mode: str) -> None:
    """Tree.broadcast of two CUDA arrays (fused on the device) and of a transposed view."""
    env = MODES[mode][0]
    root = f"127.0.0.1:{free_port()}"
    run_workers(fake_dir, [["tree", str(r), "2", root] for r in range(2)], env)

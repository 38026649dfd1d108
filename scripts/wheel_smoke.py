"""Smoke test of an installed torch_parallel wheel (run by scripts/wheel-smoke.sh in a fresh venv).

    python wheel_smoke.py base    import, package files, a 2-process all-reduce of numpy arrays,
                                  `python -m torch_parallel info`: the wheel and its declared
                                  dependencies alone (torch is not installed)
    python wheel_smoke.py torch   with torch visible: a 2-process all-reduce of torch tensors, and
                                  the torch.distributed backend "parallel" registering where
                                  torch_parallel.distributed exists
Exits non-zero, saying what is wrong, on the first failure.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import socket
import subprocess
import sys

RANK = """
import sys
import torch_parallel as parallel
kind, rank, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if kind == "torch":
    import torch
    value = torch.full((1000,), float(rank + 1))
else:
    import numpy
    value = numpy.full(1000, rank + 1, dtype=numpy.float32)
with_tree = parallel.tree(rank, 2, root, timeout=60)
out = with_tree.all_reduce(value)
assert type(out).__module__.split(".")[0] == ("torch" if kind == "torch" else "numpy"), type(out)
assert float(out.sum()) == 3.0 * 1000, out
print("rank", rank, "ok")
"""


def fail(msg: str) -> None:
    print(f"wheel smoke: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def all_reduce(kind: str) -> None:
    root = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RANK, kind, str(r), root],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    for r, p in enumerate(procs):
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            fail(f"{kind} all-reduce: rank {r} did not finish in 120 s")
        if p.returncode != 0 or f"rank {r} ok" not in out:
            fail(f"{kind} all-reduce: rank {r} exited {p.returncode}:\n{out}")
    print(f"wheel smoke: 2-process all-reduce of {kind} values ok")


def base() -> None:
    if importlib.util.find_spec("torch") is not None:
        fail("torch is importable in the base phase: the venv is not fresh")
    import torch_parallel as parallel

    pkg = pathlib.Path(parallel.__file__).resolve().parent
    if not str(pkg).startswith(str(pathlib.Path(sys.prefix).resolve())):
        fail(f"torch_parallel was imported from {pkg}, not from the venv {sys.prefix}")
    for name in ("_native.abi3.so", "_native.pyi", "py.typed", "__main__.py"):
        if not (pkg / name).exists():
            fail(f"{name} is missing from the installed package {pkg}")
    if hasattr(parallel._native.WorkQueue, "_die_holding_lock"):
        fail("the wheel carries a test hook (WorkQueue._die_holding_lock): build it without test-hooks")
    print(f"wheel smoke: torch_parallel {parallel.__version__} from {pkg}, io {parallel.io_backend()}")
    all_reduce("numpy")
    info = subprocess.run(
        [sys.executable, "-m", "torch_parallel", "info"], capture_output=True, text=True, timeout=60
    )
    if info.returncode != 0 or "PARALLEL_TIMEOUT" not in info.stdout:
        fail(f"python -m torch_parallel info exited {info.returncode}:\n{info.stdout}{info.stderr}")
    print("wheel smoke: python -m torch_parallel info ok")


def with_torch() -> None:
    import torch

    import torch_parallel as parallel

    if not parallel.__file__.startswith(sys.prefix):
        fail(f"with torch visible, torch_parallel came from {parallel.__file__}, not the venv")
    print(f"wheel smoke: torch {torch.__version__}")
    all_reduce("torch")
    if importlib.util.find_spec("torch_parallel.distributed") is None:
        fail("torch_parallel.distributed (the torch.distributed backend) is missing from the wheel")
    import torch.distributed as dist

    import torch_parallel.distributed  # noqa: F401  (registers the backend)

    names = {str(b).lower() for b in getattr(dist.Backend, "backend_list", [])}
    if "parallel" not in names:
        fail(f'the backend "parallel" is not registered with torch.distributed ({sorted(names)})')
    print('wheel smoke: torch.distributed backend "parallel" registered')


if __name__ == "__main__":
    os.environ.pop("PYTHONPATH", None)
    {"base": base, "torch": with_torch}[sys.argv[1]]()

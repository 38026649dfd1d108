"""The examples run as written (small sizes for the demo)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def run(*args: str) -> str:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_hello_example():
    assert "server received 'hi'" in run(str(HERE / "hello.py"))


def test_demo_example_small():
    out = run(str(HERE / "demo.py"), "--clients", "2", "--mib", "8", "--rounds", "2")
    assert out.count("data verified") == 4 and "WRONG" not in out


def test_allreduce_demo_small():
    out = run(str(HERE / "allreduce_demo.py"), "--iters", "2")
    assert "verified on every rank" in out and "64 MiB" in out


def test_cuda_example_runs_or_says_there_is_no_cuda():
    out = run(str(HERE / "cuda_tensors.py"))
    assert "no CUDA here" in out or ("rank 0: ok" in out and "rank 1: ok" in out), out


def test_train_ddp_example_under_torchrun():
    out = run(
        "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        str(HERE / "train_ddp.py"), "--steps", "20",
    )  # fmt: skip
    assert "rank 0: 20 steps, parameters identical on all 2 ranks" in out, out
    assert "rank 1: 20 steps, parameters identical on all 2 ranks" in out, out
    losses = [float(line.split("loss ")[1]) for line in out.splitlines() if "loss " in line]
    assert len(losses) == 3 and losses[-1] < losses[0], losses

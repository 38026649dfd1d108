"""The seed's map and workqueue examples run as written, with threads and with processes."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).parent


def run(*args: str) -> str:
    p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.parametrize("mode", [[], ["--processes"]], ids=["threads", "processes"])
def test_map_example(mode: list[str]) -> None:
    out = run(str(HERE / "map.py"), *mode)
    assert "tensor([1., 1., 1.]) tensor([2., 2., 2.]) tensor([3., 3., 3.])" in out


@pytest.mark.parametrize("mode", [[], ["--processes"]], ids=["threads", "processes"])
def test_workqueue_example(mode: list[str]) -> None:
    out = run(str(HERE / "workqueue.py"), *mode)
    assert sorted(out.split("\n")[:3]) == [
        "tensor([1., 1., 1.])",
        "tensor([2., 2., 2.])",
        "tensor([3., 3., 3.])",
    ]

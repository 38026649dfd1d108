from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

import torch_parallel as parallel


@pytest.fixture
def pair() -> Iterator[tuple[parallel.Server, parallel.Client, parallel.Connection]]:
    s = parallel.server("127.0.0.1", 0)
    c = parallel.client("127.0.0.1", s.port, timeout=10)
    s.wait_for(1, timeout=10)
    conn = s.connections()[0]
    yield s, c, conn
    c.close()
    s.close()


def expected_link() -> str:
    return "shm" if parallel.config()["PARALLEL_SHM"] in ("1", "true", "yes", "on") else "tcp"


def spawn(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Runs a Python child process with `code` (dedented); extra args land in sys.argv[1:]."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(p: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"child did not finish in {timeout}s: {out}\n{err}") from None
    return p.returncode, out, err

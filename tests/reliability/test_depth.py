"""No stack overflow from input or configuration (issue 11, behaviour 7).

A value nested as deep as ``PARALLEL_MAX_VALUE_DEPTH`` allows (10000, its maximum) is converted
Python -> Rust, encoded, decoded and converted Rust -> Python without recursion, on a receiving
thread with a small (256 KiB) stack; a value nested 100000 deep, or a depth setting beyond the
maximum, is a clear error. Each case runs in its own process, which must exit normally (a stack
overflow would kill it with SIGSEGV), with the data checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = r"""
import sys, threading, time
import torch
import torch_parallel as parallel

depth = int(sys.argv[1])

def nest(depth):
    # list / dict / tuple in turn, a tensor and a number at the bottom.
    v = {"leaf": torch.arange(4.0), "n": depth}
    for i in range(depth - 1):
        v = [v] if i % 3 == 0 else ({i: v} if i % 3 == 1 else ("x", v))
    return v

def unnest(v, depth):
    # Walks down iteratively (== on nested lists recurses in C and would raise RecursionError).
    for i in reversed(range(depth - 1)):
        if i % 3 == 0:
            assert isinstance(v, list) and len(v) == 1, type(v)
            v = v[0]
        elif i % 3 == 1:
            assert isinstance(v, dict) and list(v) == [i], type(v)
            v = v[i]
        else:
            assert isinstance(v, tuple) and v[0] == "x", type(v)
            v = v[1]
    assert torch.equal(v["leaf"], torch.arange(4.0)) and v["n"] == depth, v
    return True

try:
    s = parallel.server("127.0.0.1", 0)
except parallel.ConfigError as e:
    # A depth setting out of range fails closed at the first use (issue 11, behaviour 1).
    print(f"setting refused: {e}", flush=True)
    sys.exit(0)
c = parallel.client("127.0.0.1", s.port, timeout=10)
s.wait_for(1, timeout=10)
conn = s.connections()[0]
t0 = time.monotonic()
try:
    c.send(nest(depth), timeout=60)
except (parallel.Unsupported, parallel.ConfigError) as e:
    print(f"refused after {time.monotonic() - t0:.2f}s: {type(e).__name__}: {e}", flush=True)
    # Nothing was sent; the connection still works.
    c.send("next")
    assert conn.recv(timeout=10) == "next"
    print("connection usable", flush=True)
    sys.exit(0)
got = []
threading.stack_size(256 << 10)
th = threading.Thread(target=lambda: got.append(unnest(conn.recv(timeout=60), depth)))
th.start()
th.join(120)
assert got == [True], got
# And back the other way, received by the main thread.
conn.send(nest(depth), timeout=60)
assert unnest(c.recv(timeout=60), depth)
print(f"round trip of depth {depth} ok in {time.monotonic() - t0:.2f}s", flush=True)
"""


def run(depth: int, setting: str) -> str:
    env = dict(os.environ, PARALLEL_MAX_VALUE_DEPTH=setting)
    p = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(depth)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert p.returncode == 0, f"exit {p.returncode} (negative: killed by a signal)\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_value_nested_to_the_maximum_depth_round_trips_on_a_small_stack():
    out = run(10000, "10000")
    assert "round trip of depth 10000 ok" in out, out


def test_value_nested_100000_deep_is_refused_without_a_crash():
    out = run(100000, "10000")
    assert "refused after" in out and "PARALLEL_MAX_VALUE_DEPTH" in out, out
    assert "connection usable" in out, out


@pytest.mark.parametrize("setting", ["100000", "18446744073709551615"])
def test_depth_setting_beyond_the_maximum_is_a_config_error_not_a_crash(setting):
    # The setting is refused at the first use, naming the variable, its value and the range.
    out = run(100000, setting)
    assert "setting refused" in out, out
    assert f"PARALLEL_MAX_VALUE_DEPTH='{setting}'" in out and "1 to 10000" in out, out

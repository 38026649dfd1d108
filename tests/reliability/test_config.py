"""Configuration fails closed (issue 11, behaviour 1): real processes with a broken environment.

A malformed variable is a ConfigError naming the variable, its value and the accepted form, at
the first call that uses the configuration; nothing runs on defaults, so a typo next to
PARALLEL_SECRET can no longer switch authentication off. Each child reports what it saw as JSON
on its last line of output; every child must also exit normally (no crash, no abort).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import torch_parallel as parallel

# Variables a child must not inherit from the test's own environment.
SCRUB = (
    "PARALLEL_SECRET",
    "PARALLEL_SECRET_FILE",
    "PARALLEL_SHM_RING",
    "PARALLEL_RANK",
    "PARALLEL_WORLD_SIZE",
    "PARALLEL_ROOT",
    "RANK",
    "WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)
LIMIT = 30.0  # seconds a child may take, imports included, on a loaded machine

# Tries every public entry point that uses the configuration and records how each failed, and
# how long the failure took.
ENTRY_POINTS = """
import json, sys, time
import torch_parallel as p

def attempt(name, f):
    t0 = time.monotonic()
    try:
        f()
        return {"entry": name, "error": None}
    except Exception as e:
        return {"entry": name, "error": type(e).__name__, "config_error": isinstance(e, p.ConfigError),
                "message": str(e), "seconds": time.monotonic() - t0}

results = [
    attempt("server", lambda: p.server("127.0.0.1", 0)),
    attempt("client", lambda: p.client("127.0.0.1", int(sys.argv[1]), timeout=5)),
    attempt("tree", lambda: p.tree(rank=0, world_size=1, root="127.0.0.1:0", timeout=5)),
    attempt("config", p.config),
    attempt("workqueue", lambda: p.workqueue()),
    attempt("map_join", lambda: p.map(1, lambda i: i).join()),  # join's default deadline
    attempt("io_backend", p.io_backend),
]
print(json.dumps(results))
"""


def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(extra)
    return env


def start(code: str, env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=child_env(env),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def report(p: subprocess.Popen[str]) -> object:
    """The child's JSON report; asserts it exited normally within LIMIT."""
    try:
        out, err = p.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"child hung for {LIMIT}s:\n{out}\n{err}") from None
    assert p.returncode == 0, f"child died with {p.returncode}:\n{out}\n{err}"
    return json.loads(out.strip().splitlines()[-1])


def assert_config_errors(results: object, variable: str, value: str) -> None:
    assert isinstance(results, list)
    for r in results:
        assert r["error"] == "ConfigError" and r["config_error"], r
        assert f"{variable}='{value}' is not valid: expected " in r["message"], r
        assert r["seconds"] < 5, r


def test_malformed_variable_next_to_secret_fails_every_entry_point_with_config_error() -> None:
    # The old behaviour: defaults for everything, PARALLEL_SECRET dropped, authentication off.
    p = start(ENTRY_POINTS, {"PARALLEL_SHM_RING": "lots", "PARALLEL_SECRET": "s"}, "1")
    results = report(p)
    assert_config_errors(results, "PARALLEL_SHM_RING", "lots")
    assert isinstance(results, list)
    assert {r["entry"] for r in results} == {
        "server",
        "client",
        "tree",
        "config",
        "workqueue",
        "map_join",
        "io_backend",
    }
    assert "from 64KiB to 1GiB" in results[0]["message"]


def test_each_kind_of_malformed_variable_fails_server_creation() -> None:
    code = """
        import json, torch_parallel as p
        try:
            p.server("127.0.0.1", 0)
            print(json.dumps([{"entry": "server", "error": None}]))
        except p.ConfigError as e:
            print(json.dumps([{"entry": "server", "error": "ConfigError", "config_error": True,
                               "message": str(e), "seconds": 0}]))
    """
    cases = [("PARALLEL_TIMEOUT", "soon"), ("PARALLEL_SHM", "maybe"), ("PARALLEL_MAX_FRAME", "1.5")]
    children = [(start(code, {var: value, "PARALLEL_SECRET": "s"}), var, value) for var, value in cases]
    for child, var, value in children:
        assert_config_errors(report(child), var, value)


SECRET_SERVER = """
    import json, sys, torch_parallel as p
    s = p.server("127.0.0.1", 0)
    print(s.port, flush=True)
    sys.stdin.readline()  # the test is done with it
    print(json.dumps({"connections": len(s.connections())}))
"""


def test_server_with_secret_refuses_unauthenticated_client_whose_environment_is_malformed() -> None:
    server = start(SECRET_SERVER, {"PARALLEL_SECRET": "s3cret"})
    assert server.stdout is not None
    port = int(server.stdout.readline())
    # The client process: no secret, and a malformed variable. It must not connect on defaults.
    code = """
        import json, sys, time, torch_parallel as p
        t0 = time.monotonic()
        try:
            p.client("127.0.0.1", int(sys.argv[1]), timeout=5)
            r = {"error": None}
        except Exception as e:
            r = {"error": type(e).__name__, "message": str(e)}
        r["seconds"] = time.monotonic() - t0
        print(json.dumps(r))
    """
    r = report(start(code, {"PARALLEL_SHM_RING": "lots"}, str(port)))
    assert isinstance(r, dict)
    assert r["error"] == "ConfigError" and "PARALLEL_SHM_RING='lots'" in r["message"], r
    assert r["seconds"] < 5, r
    # A well-configured client without the secret is refused by the server too.
    if "PARALLEL_SECRET" not in os.environ and "PARALLEL_SECRET_FILE" not in os.environ:
        t0 = time.monotonic()
        with pytest.raises(parallel.AuthError):
            parallel.client("127.0.0.1", port, timeout=5)
        assert time.monotonic() - t0 < 5
    verdict = report(server)
    assert verdict == {"connections": 0}, verdict


def test_secret_that_cannot_be_used_is_an_error_never_no_secret(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-secret"
    empty = tmp_path / "empty-secret"
    empty.write_text("\n")
    cases = [
        ({"PARALLEL_SECRET_FILE": str(missing)}, "PARALLEL_SECRET_FILE", str(missing), "reading it failed"),
        ({"PARALLEL_SECRET_FILE": str(tmp_path)}, "PARALLEL_SECRET_FILE", str(tmp_path), "reading it failed"),
        ({"PARALLEL_SECRET_FILE": str(empty)}, "PARALLEL_SECRET_FILE", str(empty), "it is empty"),
        ({"PARALLEL_SECRET": ""}, "PARALLEL_SECRET", "", "non-empty"),
    ]
    if os.geteuid() != 0:  # root reads any file, so an unreadable one only exists for others
        locked = tmp_path / "locked-secret"
        locked.write_text("s")
        locked.chmod(0)
        cases.append(({"PARALLEL_SECRET_FILE": str(locked)}, "PARALLEL_SECRET_FILE", str(locked), "denied"))
    code = """
        import json, torch_parallel as p
        try:
            p.server("127.0.0.1", 0)
            print(json.dumps({"error": None}))
        except Exception as e:
            print(json.dumps({"error": type(e).__name__, "message": str(e)}))
    """
    children = [(start(code, env), var, value, why) for env, var, value, why in cases]
    for child, var, value, why in children:
        r = report(child)
        assert isinstance(r, dict)
        assert r["error"] == "ConfigError", (var, value, r)
        assert f"{var}='{value}' is not valid: expected " in r["message"] and why in r["message"], r


def test_malformed_launcher_variable_fails_the_tree_that_reads_it() -> None:
    code = """
        import json, torch_parallel as p
        out = {}
        try:
            p.tree(world_size=1, root="127.0.0.1:0", timeout=5)
            out["tree"] = None
        except Exception as e:
            out["tree"] = [type(e).__name__, str(e)]
        s = p.server("127.0.0.1", 0)  # not a tuning knob: servers are unaffected
        out["server"] = s.port > 0
        s.close()
        print(json.dumps(out))
    """
    r = report(start(code, {"RANK": "first"}))
    assert isinstance(r, dict)
    assert r["server"] is True
    kind, message = r["tree"]
    assert kind == "ConfigError" and "RANK='first' is not valid: expected a whole number" in message, r


def test_sizes_accept_the_forms_people_write() -> None:
    code = """
        import json, torch_parallel as p
        s = p.server("127.0.0.1", 0)
        c = p.client("127.0.0.1", s.port, timeout=10)
        s.wait_for(1, timeout=10)
        c.send(b"x" * 100000)
        got = s.connections()[0].recv(timeout=10)
        print(json.dumps({"ok": bytes(got) == b"x" * 100000, "ring": p.config()["PARALLEL_SHM_RING"]}))
    """
    r = report(start(code, {"PARALLEL_SHM_RING": "4 MiB", "PARALLEL_CHUNK": "64KB"}))
    assert r == {"ok": True, "ring": "4 MiB"}, r

"""PARALLEL_LOG: engine log lines on stderr and in Python's logging, never the secret."""

from __future__ import annotations

import json
import secrets
import socket

from .conftest import finish, spawn

RANK = """
import json, logging, sys
import numpy as np
import torch_parallel as parallel
from torch_parallel import _logging

seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append((record.name, record.levelname, record.getMessage()))
logging.getLogger().addHandler(Keep())

rank, root = int(sys.argv[1]), sys.argv[2]
tree = parallel.tree(rank, 2, root, timeout=60)
out = tree.all_reduce(np.ones(4, dtype=np.float32))
assert out.tolist() == [2.0] * 4, out
tree.barrier()
_logging.flush()
print(json.dumps(seen))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_debug_log_shows_rendezvous_and_plan_on_stderr_and_in_python_logging_without_the_secret() -> None:
    secret = "s3cr3t-" + secrets.token_hex(8)
    root = f"127.0.0.1:{free_port()}"
    env = {"PARALLEL_LOG": "debug", "PARALLEL_SECRET": secret}
    procs = [spawn(RANK, str(r), root, env=env) for r in range(2)]
    results = [finish(p, timeout=120) for p in procs]
    for rank, (rc, out, err) in enumerate(results):
        assert rc == 0, out + err
        assert secret not in out and secret not in err
        lines = err.splitlines()
        plan = [ln for ln in lines if "parallel_collectives::tree: plan: Plan: 2 ranks" in ln]
        assert plan, err
        assert f" rank={rank} host=" in plan[0], plan[0]
        assert plan[0][:4].isdigit() and "Z " in plan[0], plan[0]  # starts with the UTC time
        records = json.loads(out.strip().splitlines()[-1])
        names = {name for name, _, _ in records}
        assert "torch_parallel.parallel_collectives.tree" in names, records
        assert any("plan: Plan: 2 ranks" in msg for _, _, msg in records), records
    root_err = results[0][2]
    assert "rendezvous: rank 1 joined from" in root_err, root_err
    assert "rendezvous: rank 0 joined from" in root_err, root_err


def test_a_malformed_log_filter_is_a_config_error_naming_the_variable() -> None:
    code = """
    import torch_parallel as parallel
    try:
        parallel.config()
    except parallel.ConfigError as e:
        print("ConfigError:", e)
    """
    for bad in ("debugg", "parallel_engine=loud"):
        rc, out, err = finish(spawn(code, env={"PARALLEL_LOG": bad}))
        assert rc == 0, out + err
        assert f"PARALLEL_LOG='{bad}'" in out and "is not valid" in out, out + err


def test_without_parallel_log_nothing_is_written_to_stderr() -> None:
    code = """
    import torch_parallel as parallel
    s = parallel.server("127.0.0.1", 0)
    c = parallel.client("127.0.0.1", s.port, timeout=10)
    c.send("x"); assert s.recv_any(timeout=10) == "x"
    c.close(); s.close()
    """
    rc, out, err = finish(spawn(code, env={"PARALLEL_LOG": ""}))
    assert rc == 0 and err == "", out + err


LOSE = """
import subprocess, sys
import torch_parallel as parallel
from torch_parallel import _logging

server = parallel.server("127.0.0.1", 0)
child = subprocess.Popen([sys.executable, "-c", (
    "import os, sys, torch_parallel as p; c = p.client('127.0.0.1', int(sys.argv[1]), timeout=30); "
    "c.send('hello'); c.recv(timeout=30); os._exit(0)"), str(server.port)])
value, conn = server.recv_any_from(timeout=30)
conn.send("bye")
child.wait(timeout=30)
try:
    conn.recv(timeout=30)
except parallel.PeerLost as e:
    print("PeerLost:", e)
_logging.flush()
"""


def test_a_lost_peer_is_logged_at_warning_with_its_address() -> None:
    rc, out, err = finish(spawn(LOSE, env={"PARALLEL_LOG": "warn"}), timeout=120)
    assert rc == 0, out + err
    assert "PeerLost:" in out, out + err
    lost = [ln for ln in err.splitlines() if "peer lost" in ln]
    assert lost and " WARN " in lost[0] and "link=" in lost[0] and "peer=" in lost[0], err

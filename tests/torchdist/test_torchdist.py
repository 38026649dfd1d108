"""The torch.distributed backend "parallel" under the real launcher (python -m torch.distributed.run).

Few launches, many checks each: ops_worker.py runs every c10d operation against gloo's result
(2 ranks with file:// init, 3 ranks with tcp:// init); train_worker.py trains with DDP, a DDP
comm hook, DDP join() on uneven inputs and FSDP2 fully_shard against gloo (env:// init). The
faults (a rank killed mid-collective, a timeout) start plain processes with torchrun's
variables, because torchrun would SIGTERM the survivors before they could report.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch_parallel

HERE = Path(__file__).resolve().parent
PACKAGE_DIR = str(Path(torch_parallel.__file__).resolve().parent.parent)
LAUNCH_TIMEOUT = 240  # seconds for one launch on a loaded 2-core machine (usually 10-20 s)


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([PACKAGE_DIR, env.get("PYTHONPATH", "")])
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun(nproc: int, script: str, *args: str) -> str:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), str(HERE / script), *args,
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=child_env())
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-6000:]
    return out


def test_every_operation_matches_gloo_with_2_ranks_and_file_init(tmp_path: Path) -> None:
    out = torchrun(2, "ops_worker.py", f"file://{tmp_path / 'init'}")
    for r in range(2):
        m = re.search(rf"rank {r}: (\d+) checks ok", out)
        assert m and int(m.group(1)) > 100, out[-3000:]


def test_every_operation_matches_gloo_with_3_ranks_and_tcp_init() -> None:
    out = torchrun(3, "ops_worker.py", f"tcp://127.0.0.1:{free_port()}")
    for r in range(3):
        m = re.search(rf"rank {r}: (\d+) checks ok", out)
        assert m and int(m.group(1)) > 100, out[-3000:]


def test_ddp_hook_join_and_fsdp_training_are_bit_identical_to_gloo() -> None:
    out = torchrun(2, "train_worker.py", "env")
    assert "rank 0: training ok" in out and "rank 1: training ok" in out, out[-3000:]


def run_fault(mode: str, n: int) -> list[str]:
    port = free_port()
    procs = []
    for r in range(n):
        env = child_env()
        env.update(
            RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(n),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, str(HERE / "fault_worker.py"), mode],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )  # fmt: skip
        )
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=LAUNCH_TIMEOUT)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return outs


def test_a_rank_killed_mid_collective_makes_every_other_rank_raise_naming_it() -> None:
    outs = run_fault("kill", 3)
    for r in range(2):
        m = re.search(rf"rank {r} raised after ([\d.]+) s: DistBackendError: (.*)", outs[r])
        assert m, outs[r][-3000:]
        assert float(m.group(1)) < 30, m.group(0)  # the group's timeout is 60 s
        assert "rank 2" in m.group(2) and "peer lost" in m.group(2), m.group(0)


def test_a_rank_that_never_joins_the_collective_raises_within_the_groups_timeout() -> None:
    start = time.monotonic()
    outs = run_fault("timeout", 2)
    m = re.search(r"rank 0 raised after ([\d.]+) s: DistBackendError: (.*)", outs[0])
    assert m, outs[0][-3000:]
    assert 2.5 < float(m.group(1)) < 20, m.group(0)  # init_process_group(timeout=3 s)
    assert "3 s" in m.group(2) and "timeout" in m.group(2), m.group(0)
    assert time.monotonic() - start < LAUNCH_TIMEOUT


REGISTRATION = """
import datetime, torch, torch.distributed as dist
import torch_parallel, torch_parallel.distributed as tpd
assert tpd.register() and tpd.register(), "register() is idempotent"
assert "parallel" in dist.Backend.backend_list
caps = dist.Backend.backend_capability["parallel"]
assert caps == ["cpu", "cuda"], caps
store = dist.HashStore()
dist.init_process_group("cpu:parallel,cuda:gloo", store=store, rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=20))
assert dist.get_backend() == "cpu:parallel,cuda:gloo", dist.get_backend()
x = torch.arange(4.0)
dist.all_reduce(x)
assert torch.equal(x, torch.arange(4.0))
try:
    dist.all_reduce(torch.ones(2, dtype=torch.float32), op=dist.ReduceOp.BXOR)
except Exception as e:
    print("refused:", type(e).__name__, e)
dist.destroy_process_group()
print("registration ok")
"""


def test_import_registers_parallel_for_cpu_and_cuda_and_a_device_map_with_a_given_store() -> None:
    p = subprocess.run(
        [sys.executable, "-c", REGISTRATION],
        capture_output=True, text=True, timeout=LAUNCH_TIMEOUT, env=child_env(),
    )  # fmt: skip
    assert p.returncode == 0 and "registration ok" in p.stdout, p.stdout + p.stderr
    refused = p.stdout.split("refused: ", 1)[1].splitlines()[0]
    assert "bxor" in refused and "float32" in refused, refused

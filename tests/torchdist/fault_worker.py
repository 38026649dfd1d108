"""A rank of a "parallel" process group that meets a fault; started by test_torchdist.py as a
plain process with torchrun's variables (torchrun itself would SIGTERM the survivors as soon as
one worker dies, before they could report).

argv[1] = "kill": the last rank SIGKILLs itself while an all_reduce is in flight; the others
must raise, naming it. argv[1] = "timeout": rank 1 never calls the all_reduce; rank 0 must
raise within the group's timeout (init_process_group(timeout=3 s)).
Each surviving rank prints one line "rank R raised after S s: <type>: <message>".
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

import torch_parallel  # noqa: F401 - registers "parallel"


def main() -> None:
    mode = sys.argv[1]
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    seconds = 3 if mode == "timeout" else 60
    dist.init_process_group("parallel", timeout=datetime.timedelta(seconds=seconds))
    x = torch.ones(1 << 18)
    for _ in range(3):
        dist.all_reduce(x)
    dist.barrier()
    if mode == "kill" and rank == n - 1:
        dist.all_reduce(x, async_op=True)
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "timeout" and rank == 1:
        time.sleep(7)
        os._exit(0)
    start = time.monotonic()
    try:
        for _ in range(1000):
            dist.all_reduce(x)
    except Exception as e:  # noqa: BLE001 - reporting what surfaced
        took = time.monotonic() - start
        msg = str(e).replace("\n", " ")
        print(f"rank {rank} raised after {took:.1f} s: {type(e).__name__}: {msg}", flush=True)
        os._exit(0)
    print(f"rank {rank} did not raise", flush=True)
    os._exit(1)


if __name__ == "__main__":
    main()

"""Example: CUDA tensors between two processes of one machine, and an all-reduce on the GPU.

Rank 0 sends rank 1 a dict of CUDA tensors (a view with an offset among them); rank 1 receives
them (by CUDA IPC: device to device) and sends one back into a preallocated CUDA tensor; then
both all-reduce their gradients with the reductions running on the GPU. Without a GPU it says so
and exits (nothing to show).

    python examples/cuda_tensors.py
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import sys


def rank_main(rank: int, port: int, tree_port: int, q: mp.Queue) -> None:
    import torch

    import torch_parallel as parallel

    dev = torch.device("cuda", 0)
    try:
        if rank == 0:
            server = parallel.server("127.0.0.1", port)
            server.wait_for(1, timeout=60)
            base = torch.arange(1 << 22, dtype=torch.float32, device=dev)
            view = base[1000 : 1000 + (1 << 20)]  # a view 4000 bytes into its allocation
            grads = {"w": view, "step": 7, "mask": torch.ones(5, dtype=torch.bool, device=dev)}
            server.broadcast(grads)
            back = torch.empty(1 << 20, device=dev)
            server.connections()[0].recv(out=back, timeout=60)
            assert torch.equal(back, view * 2), "the reply differs"
        else:
            client = parallel.client("127.0.0.1", port, timeout=60)
            got = client.recv(timeout=60)
            assert got["w"].device == dev and got["w"][0].item() == 1000.0 and got["step"] == 7
            client.send(got["w"] * 2)
        tree = parallel.tree(rank, 2, f"127.0.0.1:{tree_port}", timeout=60)
        g = torch.full((1 << 20,), float(rank + 1), device=dev)
        tree.all_reduce(g, lambda a, b: a.add_(b))  # the seed's reduce function, on CUDA tensors
        tree.all_reduce(g, "max")
        assert torch.all(g == 3.0), "all-reduce result"
        q.put((rank, "ok", str(tree)))
    except BaseException as e:  # report to the parent, whatever it was
        q.put((rank, f"failed: {e!r}", ""))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    import torch

    import torch_parallel as parallel

    if not (torch.cuda.is_available() and parallel.cuda_available()):
        print(f"no CUDA here, nothing to show ({parallel.cuda_info()})")
        return 0
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    port, tree_port = free_port(), free_port()
    procs = [ctx.Process(target=rank_main, args=(r, port, tree_port, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    for rank, status, _plan in results:
        print(f"rank {rank}: {status}")
    print(results[0][2])
    return 0 if all(s == "ok" for _, s, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())

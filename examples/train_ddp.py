"""DDP training on the "parallel" backend: an ordinary DDP script, one word away from gloo.

    torchrun --nproc-per-node 2 examples/train_ddp.py [--steps 50]

The only changes from a gloo script: ``import torch_parallel`` (it registers the backend) and
``"parallel"`` instead of ``"gloo"`` in ``init_process_group``.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_parallel  # noqa: F401 - registers the backend "parallel"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()

    dist.init_process_group("parallel")  # was: dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts it)
    model = DDP(nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    data = torch.Generator().manual_seed(rank)  # each rank its own shard
    true_w = torch.linspace(-1, 1, 32)

    for step in range(args.steps):
        x = torch.randn(64, 32, generator=data)
        y = (x @ true_w).unsqueeze(1)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # gradients are averaged over the ranks by the backend
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f}", flush=True)

    # Every rank must hold the same parameters, bit for bit.
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    everyone = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(everyone, flat)
    assert all(torch.equal(flat, other) for other in everyone), "ranks diverged"
    print(f"rank {rank}: {args.steps} steps, parameters identical on all {world} ranks", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

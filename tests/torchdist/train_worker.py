"""Run by torchrun: DDP, DDP with a comm hook, DDP with join() on uneven inputs and FSDP2
(fully_shard) on the "parallel" backend, each against the same run on a gloo group of the same
ranks. DDP results must be bit-identical; FSDP's too (2 ranks: every sum has two terms).

argv[1]: the init method ("env" or an init_method URL). Prints "rank R: training ok".
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_parallel  # noqa: F401 - registers "parallel"


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def batches(rank: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(8, 16, generator=g), torch.randn(8, 4, generator=g)) for _ in range(count)]


def train_ddp(group: dist.ProcessGroup | None, data, hook: bool = False, join: bool = False):
    net = DDP(model(), process_group=group)
    if hook:
        net.register_comm_hook(group, default_hooks.fp16_compress_hook)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)

    def steps() -> None:
        for x, y in data:
            opt.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            opt.step()

    if join:
        with net.join():
            steps()
    else:
        steps()
    return [p.detach().clone() for p in net.module.parameters()]


def same(name: str, a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert torch.equal(x, y), f"{name}: parameter {i} differs: max |diff| {(x - y).abs().max()}"


def train_fsdp(mesh, data) -> list[torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    net = model()
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.full_tensor().detach().clone() for p in net.parameters()]


def main() -> None:
    init = sys.argv[1]
    rank, n = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=60)
    if init == "env":
        dist.init_process_group("parallel", timeout=timeout)
    else:
        dist.init_process_group("parallel", init_method=init, rank=rank, world_size=n, timeout=timeout)
    gloo = dist.new_group(backend="gloo")
    data = batches(rank, 20)

    ours = train_ddp(None, data)
    ref = train_ddp(gloo, data)
    same("DDP 20 steps", ours, ref)
    assert not all(torch.equal(p, q) for p, q in zip(ours, model().parameters(), strict=True)), "no training"

    same("DDP fp16 comm hook", train_ddp(None, data[:5], hook=True), train_ddp(gloo, data[:5], hook=True))

    uneven = batches(rank, 4 + 3 * rank)
    same("DDP join uneven", train_ddp(None, uneven, join=True), train_ddp(gloo, uneven, join=True))

    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    mesh = init_device_mesh("cpu", (n,))
    gloo_mesh = DeviceMesh.from_group(gloo, "cpu")
    same("FSDP2 fully_shard", train_fsdp(mesh, data[:4]), train_fsdp(gloo_mesh, data[:4]))

    # gloo's thread frees its Work objects after they complete; one freed after the interpreter
    # exited aborts the process (a gloo behaviour): end the gloo group while the interpreter lives.
    dist.barrier(group=gloo)
    dist.destroy_process_group(gloo)
    dist.barrier()
    print(f"rank {rank}: training ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run by torchrun (tests/gpu/test_cuda.py): the torch.distributed backend "parallel" on CUDA tensors.

Two ranks share the one GPU (cuda:0), as two ranks per GPU work on our backend (NCCL refuses them).
Checked on every rank, against an independent reference:
- every c10d collective on CUDA tensors (float32, bfloat16, int64; below and above the ring
  threshold; a strided view) against the result computed on the CPU from every rank's input,
  gathered through a gloo group over CPU copies; results must be exact (two terms per sum) and on
  the input's device;
- DDP on cuda:0 for 10 steps: parameters bit-identical to the same training on a gloo group
  (gloo moves CUDA tensors through host memory);
- FSDP2 (fully_shard over a CUDA device mesh on "parallel"): parameters close to the DDP run's.
Prints "rank R: cuda dist ok (N checks)".
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import torch_parallel  # noqa: F401 - registers "parallel"

# DIST_CUDA_WORKER_DEVICE=cpu dry-runs the checks on the CPU (for editing this file without a GPU).
DEV = torch.device(os.environ.get("DIST_CUDA_WORKER_DEVICE", "cuda:0"))
checks = 0


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
    global checks
    assert got.device == DEV, f"{name}: result on {got.device}, not {DEV}"
    assert got.dtype == want.dtype and got.shape == want.shape, f"{name}: {got.dtype}{tuple(got.shape)}"
    g = got.cpu()
    assert torch.equal(g, want), f"{name}: differs, max |diff| {(g.double() - want.double()).abs().max()}"
    checks += 1


def inputs(rank: int, n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 31 + rank)
    if dtype.is_floating_point:
        return torch.randn(n, generator=g).to(dtype)
    return torch.randint(-1000, 1000, (n,), generator=g, dtype=dtype)


def everyone(t: torch.Tensor, gloo: dist.ProcessGroup, world: int) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=gloo)
    return out


def collectives(rank: int, world: int, gloo: dist.ProcessGroup) -> None:
    sizes = [1, 1000, (1 << 20) + 3, 16 << 20]  # 16 Mi elements: above any ring threshold
    for seed, (n, dtype) in enumerate(
        [(s, d) for s in sizes for d in (torch.float32, torch.bfloat16, torch.int64)][:10]
    ):
        mine = inputs(rank, n, dtype, seed)
        alls = everyone(mine, gloo, world)
        for op, ref in (
            (dist.ReduceOp.SUM, lambda ts: sum(ts[1:], ts[0].clone())),
            (dist.ReduceOp.MAX, lambda ts: torch.stack(ts).amax(0)),
            (dist.ReduceOp.MIN, lambda ts: torch.stack(ts).amin(0)),
        ):
            x = mine.to(DEV, copy=True)
            dist.all_reduce(x, op=op)
            check(f"all_reduce {op} {dtype} n={n}", x, ref(alls))
        # async, on a busy side stream's output: the backend must order after the producer.
        if DEV.type == "cuda":
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                y = mine.to(DEV, copy=True) * 1
            with torch.cuda.stream(s):
                dist.all_reduce(y, async_op=True).wait()
            s.synchronize()
        else:
            y = mine.clone()
            dist.all_reduce(y, async_op=True).wait()
        check(f"all_reduce async side stream {dtype} n={n}", y, sum(alls[1:], alls[0].clone()))
        for root in range(world):
            b = mine.to(DEV, copy=True)
            dist.broadcast(b, src=root)
            check(f"broadcast root {root} {dtype} n={n}", b, alls[root])
        if n <= (1 << 20) + 3:
            out = torch.empty(world * n, dtype=dtype, device=DEV)
            dist.all_gather_into_tensor(out, mine.to(DEV, copy=True))
            check(f"all_gather_into_tensor {dtype} n={n}", out, torch.cat(alls))
            rows = torch.stack([inputs(r, n, dtype, seed + 100) for r in range(world)])  # same on all
            full = [rows * (r + 1) for r in range(world)]  # rank r's input
            got = torch.empty(n, dtype=dtype, device=DEV)
            dist.reduce_scatter_tensor(got, full[rank].to(DEV).reshape(-1))
            check(f"reduce_scatter_tensor {dtype} n={n}", got, sum(f[rank] for f in full))
    # a strided view (every other element of a 2-D tensor's column block)
    base = inputs(rank, 4096, torch.float32, 999).reshape(64, 64)
    alls = everyone(base, gloo, world)
    v = base.to(DEV, copy=True)
    view = v[:, ::2]
    dist.all_reduce(view)
    want = base.clone()
    want[:, ::2] = sum(a[:, ::2] for a in alls[1:]) + alls[0][:, ::2]
    check("all_reduce strided view (untouched columns kept)", v, want)
    # all_to_all_single on CUDA
    n = 1000
    x = inputs(rank, n * world, torch.float32, 555)
    alls = everyone(x, gloo, world)
    out = torch.empty(n * world, device=DEV)
    dist.all_to_all_single(out, x.to(DEV))
    check("all_to_all_single", out, torch.cat([alls[r][rank * n : (rank + 1) * n] for r in range(world)]))


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 8))


def train(group: dist.ProcessGroup | None, rank: int, steps: int) -> list[torch.Tensor]:
    ids = [0] if DEV.type == "cuda" else None
    net = DDP(model().to(DEV), device_ids=ids, process_group=group)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=g).to(DEV), torch.randn(16, 8, generator=g).to(DEV)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.detach().cpu() for p in net.module.parameters()]


def train_fsdp(rank: int, world: int, steps: int) -> list[torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(DEV.type, (world,))
    net = model().to(DEV)
    for layer in net:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(net, mesh=mesh)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x, y = torch.randn(16, 32, generator=g).to(DEV), torch.randn(16, 8, generator=g).to(DEV)
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return [p.full_tensor().detach().cpu() for p in net.parameters()]


def main() -> None:
    global checks
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if DEV.type == "cuda":
        torch.cuda.set_device(DEV)
    dist.init_process_group("parallel", timeout=datetime.timedelta(seconds=120))
    gloo = dist.new_group(backend="gloo")
    collectives(rank, world, gloo)

    ours, ref = train(None, rank, 10), train(gloo, rank, 10)
    for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
        assert torch.equal(a, b), f"DDP on cuda: parameter {i} differs from gloo's: {(a - b).abs().max()}"
        checks += 1
    assert not torch.equal(ours[0], model()[0].weight.detach()), "DDP on cuda: the parameters did not change"
    fsdp = train_fsdp(rank, world, 10)
    for i, (a, b) in enumerate(zip(fsdp, ours, strict=True)):
        diff = (a - b).abs().max()
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), f"FSDP2 on cuda: parameter {i}: {diff}"
        checks += 1

    dist.barrier(group=gloo)
    dist.destroy_process_group(gloo)
    dist.barrier()
    print(f"rank {rank}: cuda dist ok ({checks} checks)", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

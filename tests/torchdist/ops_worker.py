"""Run by torchrun: every c10d operation on the "parallel" backend against gloo's result.

argv[1]: the init method ("env" for torchrun's env://, "tcp://host:port", "file:///path").
Each rank makes the default group on "parallel" and a gloo group of the same ranks, runs each
operation on both with the same inputs (random, from a seed), and checks equality: exact for
integers and integer-valued floats, allclose for other floats. It prints "rank R: N checks ok"
at the end; any failure raises (and the launcher's exit code is non-zero).
"""

from __future__ import annotations

import datetime
import os
import sys
import threading

import torch
import torch.distributed as dist

from torch_parallel.distributed import recv_any_source

CHECKS = 0


def check(name: str, ours: object, ref: object, exact: bool = True) -> None:
    global CHECKS
    if isinstance(ours, list | tuple):
        assert isinstance(ref, list | tuple) and len(ours) == len(ref), (name, ours, ref)
        for i, (a, b) in enumerate(zip(ours, ref, strict=True)):
            check(f"{name}[{i}]", a, b, exact)
        return
    if isinstance(ours, torch.Tensor):
        assert isinstance(ref, torch.Tensor)
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (name, ours, ref)
        if exact or not ours.is_floating_point():
            ok = torch.equal(ours, ref)
        else:
            ok = torch.allclose(ours, ref, rtol=1e-5, atol=1e-6)
        assert ok, f"{name}: parallel {ours} != gloo {ref}"
    else:
        assert ours == ref, f"{name}: parallel {ours!r} != gloo {ref!r}"
    CHECKS += 1


def main() -> None:
    init = sys.argv[1]
    rank = int(os.environ["RANK"])
    n = int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=60)
    if init == "env":
        dist.init_process_group("parallel", timeout=timeout)
    else:
        dist.init_process_group("parallel", init_method=init, rank=rank, world_size=n, timeout=timeout)
    assert dist.get_backend() == "parallel"
    gloo = dist.new_group(backend="gloo")
    ours = dist.group.WORLD
    gen = torch.Generator().manual_seed(1234 + rank)

    def ints(*shape: int, dtype: torch.dtype = torch.int64, lo: int = -50, hi: int = 50):
        return torch.randint(lo, hi, shape, generator=gen).to(dtype)

    def both(fn, *tensors: torch.Tensor):
        """Runs fn(copies, group) on ours and on gloo; returns (ours, gloo) copies."""
        a = [t.clone() for t in tensors]
        b = [t.clone() for t in tensors]
        fn(a, ours)
        fn(b, gloo)
        return a, b

    # all_reduce: every op, every dtype that makes sense, plus async_op.
    float_dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    int_dtypes = [torch.int8, torch.int32, torch.int64, torch.uint8]
    for dtype in float_dtypes + int_dtypes:
        for op in [dist.ReduceOp.SUM, dist.ReduceOp.MIN, dist.ReduceOp.MAX, dist.ReduceOp.PRODUCT]:
            lo, hi = (0, 4) if op == dist.ReduceOp.PRODUCT else (-50, 50)
            if dtype == torch.uint8:
                lo = 0
            x = ints(17, dtype=dtype, lo=lo, hi=hi)
            a, b = both(lambda t, g, op=op: dist.all_reduce(t[0], op=op, group=g), x)
            check(f"all_reduce {op} {dtype}", a, b)
    for dtype in int_dtypes + [torch.bool]:
        for op in [dist.ReduceOp.BAND, dist.ReduceOp.BOR, dist.ReduceOp.BXOR]:
            x = ints(33, dtype=dtype, lo=0, hi=2 if dtype == torch.bool else 100)
            a, b = both(lambda t, g, op=op: dist.all_reduce(t[0], op=op, group=g), x)
            check(f"all_reduce {op} {dtype}", a, b)
    # AVG and PREMUL_SUM: gloo has neither; compare with gloo's SUM divided / premultiplied.
    x = ints(64, dtype=torch.float64)
    a = x.clone()
    dist.all_reduce(a, op=dist.ReduceOp.AVG)
    b = x.clone()
    dist.all_reduce(b, group=gloo)
    check("all_reduce AVG", a, b / n, exact=False)
    a = x.clone()
    dist.all_reduce(a, op=dist._make_nccl_premul_sum(0.5))
    check("all_reduce PREMUL_SUM", a, b * 0.5)
    # PREMUL_SUM reduce: the root gets the scaled sum; the others' tensors are left as they were.
    a = x.clone()
    dist.reduce(a, dst=0, op=dist._make_nccl_premul_sum(0.5))
    check("reduce PREMUL_SUM", a, b * 0.5 if rank == 0 else x)
    # Large (ring path), random floats: allclose.
    x = torch.randn(300_000, generator=gen)
    a, b = both(lambda t, g: dist.all_reduce(t[0], group=g), x)
    check("all_reduce large float32", a, b, exact=(n == 2))
    # Non-contiguous tensor.
    x = ints(8, 6, dtype=torch.float32).t()
    a, b = both(lambda t, g: dist.all_reduce(t[0], group=g), x)
    check("all_reduce non-contiguous", a, b)
    # async_op: several in flight, then wait; get_future chains.
    xs = [ints(10 + i, dtype=torch.float32) for i in range(5)]
    a = [x.clone() for x in xs]
    works = [dist.all_reduce(t, async_op=True) for t in a]
    futs = [w.get_future() for w in works]
    for w in works:
        assert w.wait()
    b = [x.clone() for x in xs]
    for t in b:
        dist.all_reduce(t, group=gloo)
    check("all_reduce async_op", a, b)
    check("get_future value", [f.wait()[0] for f in futs], b)
    chained = dist.all_reduce(xs[0].clone(), async_op=True).get_future().then(lambda f: f.value()[0] * 2)
    check("get_future then", chained.wait(), b[0] * 2)
    # The Work of a call that waits at once (asyncOp False: it ran inline and is complete when
    # returned): through the group (torch's C++ Work passes wait and get_future on to ours) its
    # future holds the result; the backend's own Work answers as a finished one.
    o = dist.AllreduceOptions()
    o.asyncOp = False
    a = xs[1].clone()
    w = dist.group.WORLD.allreduce([a], o)
    assert w.wait()
    check("inline Work", a, b[1])
    check("inline Work future", w.get_future().wait()[0], b[1])
    check("inline Work future then", w.get_future().then(lambda f: f.value()[0] + 1).wait(), b[1] + 1)
    backend = dist.group.WORLD._get_backend(torch.device("cpu"))
    a = xs[2].clone()
    w = backend.allreduce([a], o)
    assert w.is_completed() and w.is_success() and w.exception() is None and w.wait()
    check("inline backend Work future", w.get_future().wait()[0], b[2])
    bo = dist.BarrierOptions()
    bo.asyncOp = False
    w = backend.barrier(bo)
    assert w.is_completed() and w.wait() and w.get_future().wait() == []
    # A blocking all_reduce (async_op=False runs inline on the caller) issued while async ones
    # are still queued runs after them on every rank (DIST-1), with the same results as gloo.
    xs = [ints(20 + i, dtype=torch.float32) for i in range(3)]
    y = ints(7, dtype=torch.int64)
    a = [x.clone() for x in xs]
    ya = y.clone()
    works = [dist.all_reduce(t, async_op=True) for t in a]
    dist.all_reduce(ya)
    dist.broadcast(ya, src=n - 1)
    for w in works:
        w.wait()
    b = [x.clone() for x in xs]
    yb = y.clone()
    for t in b:
        dist.all_reduce(t, group=gloo)
    dist.all_reduce(yb, group=gloo)
    dist.broadcast(yb, src=n - 1, group=gloo)
    check("async then blocking all_reduce", [*a, ya], [*b, yb])
    # all_reduce_coalesced
    xs = [ints(5, dtype=torch.float32), ints(7, dtype=torch.float32)]
    a, b = both(lambda t, g: dist.all_reduce_coalesced(t, group=g), *xs)
    check("all_reduce_coalesced", a, b)

    # broadcast, reduce (from every root)
    for root in range(n):
        x = ints(4, 5, dtype=torch.float32)
        a, b = both(lambda t, g, root=root: dist.broadcast(t[0], src=root, group=g), x)
        check(f"broadcast root {root}", a, b)
        w = dist.broadcast(x.clone(), src=root, async_op=True)
        w.wait()
        x = ints(9, dtype=torch.int64)
        a, b = both(lambda t, g, root=root: dist.reduce(t[0], dst=root, group=g), x)
        if rank == root:
            check(f"reduce root {root}", a, b)

    # all_gather, all_gather_into_tensor, coalesced, gather
    x = ints(3, 4, dtype=torch.float32)
    outs_a = [torch.empty_like(x) for _ in range(n)]
    outs_b = [torch.empty_like(x) for _ in range(n)]
    dist.all_gather(outs_a, x)
    dist.all_gather(outs_b, x, group=gloo)
    check("all_gather", outs_a, outs_b)
    out_a = torch.empty(n * 3, 4)
    out_b = torch.empty(n * 3, 4)
    dist.all_gather_into_tensor(out_a, x)
    dist.all_gather_into_tensor(out_b, x, group=gloo)
    check("all_gather_into_tensor", out_a, out_b)
    w = dist.all_gather_into_tensor(out_a, x * 2, async_op=True)
    w.wait()
    check("all_gather_into_tensor async", out_a, out_b * 2)
    y = ints(5, dtype=torch.int32)
    oa = [torch.empty(n * 3, 4), torch.empty(n * 5, dtype=torch.int32)]
    with dist._coalescing_manager(async_ops=True) as cm:
        dist.all_gather_into_tensor(oa[0], x)
        dist.all_gather_into_tensor(oa[1], y)
    cm.wait()
    ob = [torch.empty(n * 3, 4), torch.empty(n * 5, dtype=torch.int32)]
    dist.all_gather_into_tensor(ob[0], x, group=gloo)
    dist.all_gather_into_tensor(ob[1], y, group=gloo)
    check("allgather_into_tensor_coalesced", oa, ob)
    # Every bit of every slot, as gloo moves them: signed zeros, NaN payloads, infinities,
    # subnormals, and random bit patterns; large enough (1 MiB a rank) for the ring.
    special = torch.tensor([-0.0, 0.0, float("inf"), -float("inf"), 1e-45, -3.5], dtype=torch.float32)
    payload_nan = torch.tensor([0x7FC00001 + rank, -0x00400001 - rank], dtype=torch.int32).view(torch.float32)
    rand_bits = torch.randint(-(2**31), 2**31 - 1, (1 << 18,), generator=gen, dtype=torch.int32)
    xg = torch.cat([special, payload_nan, rand_bits.view(torch.float32)])
    oga = torch.full((n * xg.numel(),), 7.0)
    ogb = torch.empty(n * xg.numel())
    dist.all_gather_into_tensor(oga, xg)
    dist.all_gather_into_tensor(ogb, xg, group=gloo)
    check("all_gather_into_tensor bits", oga.view(torch.int32), ogb.view(torch.int32))
    for dt in (torch.bool, torch.uint8, torch.float16, torch.bfloat16, torch.int64, torch.complex64):
        xg = ints(5, 3, lo=-2, hi=3).to(dt)
        oga = torch.empty((n * 5, 3), dtype=dt)
        ogb = torch.empty((n * 5, 3), dtype=dt)
        dist.all_gather_into_tensor(oga, xg)
        dist.all_gather_into_tensor(ogb, xg, group=gloo)
        check(f"all_gather_into_tensor {dt}", oga, ogb)
    # An output that is not contiguous is filled in place.
    xg = ints(4, 6, dtype=torch.float32)
    oga = torch.empty(6, n * 4).t()
    ogb = torch.empty(n * 4, 6)
    dist.all_gather_into_tensor(oga, xg)
    dist.all_gather_into_tensor(ogb, xg, group=gloo)
    check("all_gather_into_tensor into a transposed output", oga.contiguous(), ogb)
    # In place, as FSDP gathers: the input is this rank's slot of the output; at a size under
    # the ring's threshold (the bitwise-or all-reduce) and over it (the ring's all-gather).
    for k in (1 << 10, 1 << 20):
        oga = torch.empty(n * k)
        ogb = torch.empty(n * k)
        mine = ints(k, dtype=torch.float32)
        oga[rank * k : (rank + 1) * k].copy_(mine)
        ogb[rank * k : (rank + 1) * k].copy_(mine)
        dist.all_gather_into_tensor(oga, oga[rank * k : (rank + 1) * k])
        dist.all_gather_into_tensor(ogb, ogb[rank * k : (rank + 1) * k], group=gloo)
        check(f"all_gather_into_tensor in place, {k} a rank", oga, ogb)
        # The input is another slot of the output: every slot s must end with what rank s
        # passed, the values of its own output's slot s + 1 before the call.
        oga = torch.arange(n * k, dtype=torch.float32) + 1e6 * rank
        nxt_slot = (rank + 1) % n
        dist.all_gather_into_tensor(oga, oga[nxt_slot * k : (nxt_slot + 1) * k])
        want = torch.cat(
            [
                torch.arange(((s + 1) % n) * k, ((s + 1) % n + 1) * k, dtype=torch.float32) + 1e6 * s
                for s in range(n)
            ]
        )
        check(f"all_gather_into_tensor whose input is another slot of its output, {k} a rank", oga, want)
    # Ranks whose inputs differ in dtype (same byte count): an error on every rank, never one
    # rank's bytes read as another dtype; the group is usable afterwards.
    for k in (8, 1 << 20):
        xg = ints(k, dtype=torch.float32 if rank % 2 == 0 else torch.int32)
        try:
            dist.all_gather_into_tensor(torch.empty(n * k, dtype=xg.dtype), xg)
        except Exception as e:  # the backend's error, whichever torch wraps it in
            check(f"all_gather_into_tensor dtype mismatch names the dtypes, {k}", "float32" in str(e), True)
        else:
            raise AssertionError(f"all_gather_into_tensor of {k} float32 and int32 did not raise")
    a, b = both(lambda t, g: dist.all_reduce(t[0], group=g), ints(4, dtype=torch.int64))
    check("all_reduce after a mismatch", a, b)
    for root in range(n):
        ga = [torch.empty_like(x) for _ in range(n)] if rank == root else None
        gb = [torch.empty_like(x) for _ in range(n)] if rank == root else None
        dist.gather(x, ga, dst=root)
        dist.gather(x, gb, dst=root, group=gloo)
        if rank == root:
            check(f"gather root {root}", ga, gb)

    # scatter, reduce_scatter, reduce_scatter_tensor
    for root in range(n):
        pieces = [ints(6, dtype=torch.float32) for _ in range(n)] if rank == root else None
        sa = torch.empty(6)
        sb = torch.empty(6)
        dist.scatter(sa, pieces, src=root)
        dist.scatter(sb, pieces, src=root, group=gloo)
        check(f"scatter root {root}", sa, sb)
    for op in [dist.ReduceOp.SUM, dist.ReduceOp.MAX, dist.ReduceOp.MIN]:
        pieces = [ints(2, 3, dtype=torch.float32) for _ in range(n)]
        ra, rb = torch.empty(2, 3), torch.empty(2, 3)
        dist.reduce_scatter(ra, [p.clone() for p in pieces], op=op)
        dist.reduce_scatter(rb, [p.clone() for p in pieces], op=op, group=gloo)
        check(f"reduce_scatter {op}", ra, rb)
        big = ints(n * 4, 3, dtype=torch.float64)
        ra, rb = torch.empty(4, 3, dtype=torch.float64), torch.empty(4, 3, dtype=torch.float64)
        keep = big.clone()
        dist.reduce_scatter_tensor(ra, big, op=op)
        check("reduce_scatter_tensor leaves its input", big, keep)
        dist.reduce_scatter_tensor(rb, big, op=op, group=gloo)
        check(f"reduce_scatter_tensor {op}", ra, rb)
    # Large enough for the all-reduce's ring (3 MiB a rank), with an average.
    big = ints(n * (1 << 16), 12, dtype=torch.float32)
    keep = big.clone()
    rb = torch.empty(1 << 16, 12)
    dist.reduce_scatter_tensor(rb, big, group=gloo)
    for op in [dist.ReduceOp.SUM, dist.ReduceOp.AVG]:  # (gloo has no AVG: its SUM / n)
        ra = torch.empty(1 << 16, 12)
        dist.reduce_scatter_tensor(ra, big, op=op)
        ref = rb if op == dist.ReduceOp.SUM else rb / n
        check(f"reduce_scatter_tensor large {op}", ra, ref, exact=op == dist.ReduceOp.SUM)
    check("reduce_scatter_tensor large leaves its input", big, keep)

    # all_to_all (list), all_to_all_single even and uneven splits
    ins = [ints(4, dtype=torch.int64) for r in range(n)]
    oa = [torch.empty(4, dtype=torch.int64) for r in range(n)]
    ob = [torch.empty(4, dtype=torch.int64) for r in range(n)]
    dist.all_to_all(oa, ins)
    dist.all_to_all(ob, ins, group=gloo)
    check("all_to_all", oa, ob)
    x = ints(n * 3, 2, dtype=torch.float32)
    oa, ob = torch.empty_like(x), torch.empty_like(x)
    dist.all_to_all_single(oa, x)
    dist.all_to_all_single(ob, x, group=gloo)
    check("all_to_all_single even", oa, ob)
    # uneven: rank r sends (r + d + 1) rows to rank d
    in_splits = [rank + d + 1 for d in range(n)]
    out_splits = [s + rank + 1 for s in range(n)]
    x = ints(sum(in_splits), 3, dtype=torch.float32)
    oa, ob = torch.empty(sum(out_splits), 3), torch.empty(sum(out_splits), 3)
    w = dist.all_to_all_single(oa, x, out_splits, in_splits, async_op=True)
    w.wait()
    dist.all_to_all_single(ob, x, out_splits, in_splits, group=gloo)
    check("all_to_all_single uneven", oa, ob)

    # send / recv around a ring, with tags out of order; recv from any source.
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    t1, t2 = ints(5, dtype=torch.float32), ints(3, dtype=torch.int32)
    r1, r2 = torch.empty(5), torch.empty(3, dtype=torch.int32)
    s_works = [dist.isend(t1, nxt, tag=1), dist.isend(t2, nxt, tag=2)]
    w2 = dist.irecv(r2, prv, tag=2)  # the later tag first: tag 1 waits in the stash
    w1 = dist.irecv(r1, prv, tag=1)
    for w in [w2, w1, *s_works]:
        w.wait()
    g1, g2 = torch.empty(5), torch.empty(3, dtype=torch.int32)
    gw = [dist.isend(t1, nxt, tag=1, group=gloo), dist.isend(t2, nxt, tag=2, group=gloo)]
    dist.recv(g1, prv, tag=1, group=gloo)
    dist.recv(g2, prv, tag=2, group=gloo)
    for w in gw:
        w.wait()
    check("send/recv tag 1", r1, g1)
    check("send/recv tag 2", r2, g2)
    # Futures of point-to-point Works complete by themselves (done callbacks on the engine's
    # callback lane): nobody waits on the Works.
    r3 = torch.empty(5)
    futs = [dist.isend(t1, nxt, tag=3).get_future(), dist.irecv(r3, prv, tag=3).get_future()]
    torch.futures.wait_all(futs)
    check("isend/irecv get_future", r3, g1)
    if rank == 0:
        got = set()
        for _ in range(n - 1):
            buf = torch.empty(4, dtype=torch.int64)
            work = dist.irecv(buf, tag=7)
            work.wait()
            src = int(buf[0])
            assert torch.equal(buf, torch.full((4,), src)), buf
            got.add(src)
        check("irecv from any source: every sender once", sorted(got), list(range(1, n)))
        got = set()
        for _ in range(n - 1):
            buf = torch.empty(4, dtype=torch.int64)
            src = recv_any_source(buf, tag=8)
            check("recv_any_source returns the sender", buf, torch.full((4,), src))
            got.add(src)
        check("recv_any_source: every sender once", sorted(got), list(range(1, n)))
    else:
        dist.send(torch.full((4,), rank, dtype=torch.int64), 0, tag=7)
        dist.send(torch.full((4,), rank, dtype=torch.int64), 0, tag=8)

    # object collectives
    obj = {"rank": rank, "payload": list(range(rank + 2))}
    oa, ob = [None] * n, [None] * n
    dist.all_gather_object(oa, obj)
    dist.all_gather_object(ob, obj, group=gloo)
    check("all_gather_object", oa, ob)
    la, lb = [obj, "x" * rank], [obj, "x" * rank]
    dist.broadcast_object_list(la, src=n - 1)
    dist.broadcast_object_list(lb, src=n - 1, group=gloo)
    check("broadcast_object_list", la, lb)
    ga = [None] * n if rank == 0 else None
    dist.gather_object(obj, ga, dst=0)
    if rank == 0:
        check("gather_object", ga, [{"rank": r, "payload": list(range(r + 2))} for r in range(n)])
    so = [None]
    dist.scatter_object_list(so, [f"to {r}" for r in range(n)] if rank == 0 else None, src=0)
    check("scatter_object_list", so[0], f"to {rank}")

    # subgroups: new_group of ranks {0, n-1} (parallel), new_subgroups, split_group
    sub = dist.new_group([0, n - 1])
    if rank in (0, n - 1):
        x = ints(6, dtype=torch.int64)
        a = x.clone()
        dist.all_reduce(a, group=sub)
        sub_gloo_sum = [torch.empty_like(x) for _ in range(n)]
        dist.all_gather(sub_gloo_sum, x, group=gloo)
        check("new_group all_reduce", a, sub_gloo_sum[0] + sub_gloo_sum[n - 1])
    else:
        dist.all_gather([torch.empty(6, dtype=torch.int64) for _ in range(n)], ints(6), group=gloo)
    cur, _ = dist.new_subgroups(group_size=1)
    x = ints(4, dtype=torch.float32)
    a = x.clone()
    dist.all_reduce(a, group=cur)
    check("new_subgroups of one rank", a, x)
    split = dist.split_group(split_ranks=[list(range(n))])
    if split is not None:
        x = ints(5, dtype=torch.int64)
        a, b = both(lambda t, g: dist.all_reduce(t[0], group=g), x)
        dist.all_reduce(a[0], group=split)  # a second time, on the split group
        b2 = b[0].clone()
        dist.all_reduce(b2, group=gloo)
        check("split_group all_reduce", a[0], b2)

    # barrier, monitored_barrier
    dist.barrier()
    dist.barrier(async_op=True).wait()
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
    check("backend name", dist.get_backend(), "parallel")
    # No thread of the backend's own (#13): its sends, receives and futures ran on the engine's
    # lanes (the threads it had were named parallel-dist-*).
    own = [t.name for t in threading.enumerate() if t.name.startswith("parallel")]
    check("no Python thread of the backend", own, [])

    # unsupported input: a clear error naming what was passed and what is supported
    try:
        dist.all_reduce(torch.ones(3, dtype=torch.int32), op=dist.ReduceOp.AVG)
    except Exception as e:  # noqa: BLE001 - checking the message
        assert "avg" in str(e) and "int32" in str(e), e
        check("AVG on int32 refused", True, True)
    else:
        raise AssertionError("AVG on int32 was accepted")

    try:
        dist.all_gather([torch.empty(3, dtype=torch.float64) for _ in range(n)], torch.ones(3))
    except ValueError as e:
        assert "float64" in str(e) and "float32" in str(e), e
        check("all_gather into outputs of another dtype refused", True, True)
    else:
        raise AssertionError("all_gather cast float32 into float64 outputs silently")
    dist.barrier()  # the group is still usable

    # an error surfaces from Work.wait on every rank (a dtype that differs across ranks), and
    # the group stays usable; wait(timeout) on a healthy operation returns True
    odd = torch.ones(4, dtype=torch.float32 if rank == 0 else torch.float64)
    work = dist.all_reduce(odd, async_op=True)
    try:
        work.wait()
    except ValueError as e:
        assert "rank" in str(e) and "float" in str(e), e
        check("a mismatch raises from wait on every rank", True, True)
    else:
        raise AssertionError("all_reduce of float32 against float64 did not raise")
    a = torch.arange(4.0)
    check("wait(timeout)", dist.all_reduce(a, async_op=True).wait(datetime.timedelta(seconds=30)), True)
    check("the group is usable after a mismatch", a, torch.arange(4.0) * n)

    # gloo's own thread frees its Work objects after they complete, and one freed after the
    # interpreter has exited aborts the process ("terminate called without an active
    # exception": a gloo behaviour, seen with torch 2.15; not this backend's). Destroying the
    # gloo group first ends that thread while the interpreter is alive; a barrier alone left a
    # window in slow (debug) builds.
    dist.barrier(group=gloo)
    dist.destroy_process_group(gloo)
    dist.barrier()
    print(f"rank {rank}: {CHECKS} checks ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

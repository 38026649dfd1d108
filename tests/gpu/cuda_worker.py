"""One process of a CUDA test (tests/gpu/test_cuda.py): a sender, a receiver, or a tree rank.

Usage:
  cuda_worker.py recv SCENARIO PORT FLAG    the server: receives every case and checks it
  cuda_worker.py send SCENARIO PORT FLAG    the client: sends every case
  cuda_worker.py tree SCENARIO RANK WORLD ROOT

Both ends of a pair walk the same list of cases; every payload is built deterministically from its
case (pattern()), so the receiver rebuilds on the CPU what the sender computed and compares there.
FLAG is a file the sender creates once it has modified and freed what it sent (scenario keepalive).
Every blocking call has a timeout. Prints one line per check and "ok" last; exits 0 only when every
check passed (an assertion error is a traceback on stderr and exit code 1).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import torch_parallel as parallel

T = 120.0  # seconds: every blocking call of torch_parallel
DEV = torch.device("cuda", 0)
MARGIN = 1024  # elements around a received view, checked untouched (an offset bug shows there)
SLEEP_CYCLES = 200_000_000  # torch.cuda._sleep: ~0.1 s of GPU time, to expose missing stream waits

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.int32,
    torch.float64,
    torch.int8,
]


def pattern(numel: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """CPU tensor of numel elements, deterministic in (seed, index), exact in dtype. The period
    (65521) does not divide any chunk size, so a misplaced chunk shows."""
    i = torch.arange(numel, dtype=torch.int64)
    v = (i * 2654435761 + seed * 40503 + 17) % 65521
    if dtype == torch.bool:
        return v % 2 == 1
    if dtype == torch.uint8:
        return (v % 256).to(dtype)
    if dtype in (torch.int8, torch.bfloat16):
        return (v % 256 - 128).to(dtype)
    if dtype == torch.float16:
        return (v % 2048 - 1024).to(dtype)
    if dtype.is_complex:
        return torch.complex((v - 32760).float(), ((v * 7) % 65521).float()).to(dtype)
    return (v - 32760).to(dtype)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "whole": lambda b: b,
    "slice": lambda b: b[1000:5000],  # base of 10000: storage offset 1000
    "row": lambda b: b.view(64, 64)[3],  # base of 4096: storage offset 192
    "t": lambda b: b.view(33, 65).t(),  # base of 2145: non-contiguous (65, 33)
}


@dataclass(frozen=True)
class Case:
    name: str
    dtype: torch.dtype
    base: tuple[int, ...]  # shape of the allocation the sent value is a view of
    view: str = "whole"
    src: str = "cuda:0"  # where the sender's tensor lives: "cuda:0", "cpu" or "cuda:1"
    recv: str = "new"  # new | cuda_out | cuda_out_view | cuda_out_t | cpu_out
    seed: int = 0
    stream: bool = False  # produce (sender) or consume (receiver) on a busy side stream

    def expected(self) -> torch.Tensor:
        return VIEWS[self.view](pattern(_numel(self.base), self.dtype, self.seed).reshape(self.base))


def cases(scenario: str) -> list[Case]:
    out: list[Case] = []

    def add(name: str, dtype: torch.dtype, base: tuple[int, ...], **kw: object) -> None:
        out.append(Case(f"{name} [{dtype}]", dtype, base, seed=len(out) + 1, **kw))

    f32, big = torch.float32, 16 << 20  # 64 MiB of float32
    if scenario == "battery":
        for dt in DTYPES:
            add("odd 7x143", dt, (7, 143))
            add("base[1000:5000] -> cuda out", dt, (10000,), view="slice", recv="cuda_out")
            add("base.view(64,64)[3] -> cpu out", dt, (4096,), view="row", recv="cpu_out")
            add("x.t()", dt, (2145,), view="t")
        for mode in ("new", "cuda_out", "cuda_out_view", "cpu_out"):
            add(f"one element -> {mode}", f32, (1,), recv=mode)
        add("empty", f32, (0,))
        add("empty -> cuda out", torch.int64, (0,), recv="cuda_out")
        add("empty 3x0x2 -> cpu out", torch.float16, (3, 0, 2), recv="cpu_out")
        add("0-d", f32, ())
        add("x.t() -> transposed cuda out", torch.int32, (2145,), view="t", recv="cuda_out_t")
        add("base[1000:5000] -> cuda out view", torch.bfloat16, (10000,), view="slice", recv="cuda_out_view")
        add("cpu odd -> cuda out view", torch.float16, (7919,), src="cpu", recv="cuda_out_view")
        add("64 MiB", f32, (big,))
        add("64 MiB -> cuda out", f32, (big,), recv="cuda_out")
        add("64 MiB + 1 byte -> cpu out", torch.uint8, ((64 << 20) + 1,), recv="cpu_out")
        add("64 MiB cpu -> cuda out", f32, (big,), src="cpu", recv="cuda_out")
        add("64 MiB + 3 -> cuda out view", torch.bfloat16, ((32 << 20) + 3,), recv="cuda_out_view")
        add("send waits for the current stream", f32, (1 << 20,), stream=True)
        add("recv orders after the current stream", f32, (1 << 20,), recv="cuda_out", stream=True)
        if torch.cuda.device_count() > 1:
            add("on cuda:1", f32, (1001,), src="cuda:1")
    elif scenario == "keepalive":
        add("64 MiB, overwritten after send", f32, (big,))
        add("4 MiB, freed and its memory reused", f32, (1 << 20,), recv="cuda_out")
        add("base[1000:5000], base freed and reused", torch.int64, (10000,), view="slice")
        add("odd, zeroed after send", torch.float16, (1001,), recv="cpu_out")
        add("64 MiB, freed, cache emptied, reallocated", f32, (big,), recv="cuda_out")
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    return out


def same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Exact comparison on the CPU, with the first differing index in the message."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype}, expected {want.dtype}"
    assert tuple(got.shape) == tuple(want.shape), f"{what}: shape {tuple(got.shape)}, expected {want.shape}"
    g = got.detach().cpu()
    if not torch.equal(g, want):
        bad = (g != want).reshape(-1).nonzero()
        first = int(bad[0]) if bad.numel() else -1
        raise AssertionError(f"{what}: {bad.numel()} of {want.numel()} elements differ, first at {first}")


def busy(stream: torch.cuda.Stream) -> None:
    """Queues ~0.1 s of GPU work on stream (so later work on it runs late)."""
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)


def info() -> str:
    f = getattr(parallel, "cuda_info", None)
    return str(f()) if f else "torch_parallel.cuda_info() missing"


# ----------------------------------------------------------------------------------------------
# point to point


def send_one(c: parallel.Client, case: Case) -> object:
    """Sends case's value; returns what the sender must keep referenced until the end."""
    dev = torch.device(case.src)
    if case.stream:  # the value is written late on a busy side stream; sent without synchronizing
        final = case.expected().to(dev)
        value = torch.zeros_like(final)
        torch.cuda.synchronize()
        side = torch.cuda.Stream(dev)
        busy(side)
        with torch.cuda.stream(side):
            value.copy_(final)
            c.send(value, timeout=T)
        return (value, final, side)
    base = pattern(_numel(case.base), case.dtype, case.seed).reshape(case.base).to(dev)
    c.send(VIEWS[case.view](base), timeout=T)
    return base


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def recv_one(conn: parallel.Connection, case: Case) -> None:
    want = case.expected()
    what = case.name
    src_dev = torch.device(case.src)
    if case.recv == "new":
        got = conn.recv(timeout=T)
        assert isinstance(got, torch.Tensor), f"{what}: received {type(got).__name__}"
        assert got.device == src_dev, f"{what}: received on {got.device}, sent from {src_dev}"
        same(got, want, what)
        return
    if case.recv == "cpu_out":
        out = pattern(want.numel(), case.dtype, 99991).reshape(want.shape)
        ptr = out.data_ptr()
        got = conn.recv(timeout=T, out=out)
        assert got is out and out.data_ptr() == ptr, f"{what}: not received into the CPU out="
        same(out, want, what)
        return
    if case.recv == "cuda_out":
        out = pattern(want.numel(), case.dtype, 99991).reshape(want.shape).to(DEV)
        ptr = out.data_ptr()
        if case.stream:  # garbage is written late on the current stream: the receive must follow it
            side = torch.cuda.Stream(DEV)
            torch.cuda.synchronize()
            busy(side)
            with torch.cuda.stream(side):
                out.fill_(7)
                got = conn.recv(timeout=T, out=out)
            # read on the default stream, without synchronizing: complete when recv returned
        else:
            got = conn.recv(timeout=T, out=out)
        assert got is out and out.data_ptr() == ptr, f"{what}: not received into the CUDA out="
        assert out.device == DEV
        same(out, want, what)
        return
    if case.recv == "cuda_out_view":  # a view with a storage offset inside a larger allocation
        n = want.numel()
        holder_cpu = pattern(n + 2 * MARGIN, case.dtype, 99991)
        holder = holder_cpu.to(DEV)
        out = holder[MARGIN : MARGIN + n].view(want.shape)
        got = conn.recv(timeout=T, out=out)
        assert got is out, f"{what}: not received into the CUDA out= view"
        same(out, want, what)
        h = holder.cpu()
        assert torch.equal(h[:MARGIN], holder_cpu[:MARGIN]), f"{what}: wrote before the out= view"
        assert torch.equal(h[MARGIN + n :], holder_cpu[MARGIN + n :]), f"{what}: wrote past the out= view"
        return
    if case.recv == "cuda_out_t":  # a non-contiguous out=
        holder = torch.zeros(tuple(reversed(want.shape)), dtype=case.dtype, device=DEV)
        out = holder.t()
        got = conn.recv(timeout=T, out=out)
        assert got is out, f"{what}: not received into the transposed CUDA out="
        same(out, want, what)
        same(holder, want.t().contiguous(), what + " (holder)")
        return
    raise AssertionError(f"unknown receive mode {case.recv}")


def mutate(box: list[object], case: Case) -> object:
    """keepalive: spoils what was just sent (box holds the only reference the test keeps):
    overwrites it, or frees it and fills the memory the allocator hands out next."""
    kept = box.pop()
    if "overwritten" in case.name or "zeroed" in case.name:
        assert isinstance(kept, torch.Tensor)
        kept.fill_(-1 if "overwritten" in case.name else 0)
        return kept
    numel = _numel(case.base)
    del kept  # freed: the caching allocator hands the same block to the next allocation
    if "cache emptied" in case.name:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # back to the driver, unless torch_parallel still holds it
    return torch.full((numel,), -7, dtype=case.dtype, device=DEV)


def run_send(scenario: str, port: int, flag: str) -> None:
    c = parallel.client("127.0.0.1", port, timeout=60)
    print(f"link {c.link}; {info()}", flush=True)
    kept = []
    for case in cases(scenario):
        box = [send_one(c, case)]
        kept.append(mutate(box, case) if scenario == "keepalive" else box[0])
    torch.cuda.synchronize()
    with open(flag, "w") as f:
        f.write("mutated\n")
    c.send("end", timeout=T)
    # Stay (and keep every tensor) until the receiver has checked everything.
    assert c.recv(timeout=T) == "done"
    print(f"sent {len(kept)} cases; stats {c.stats()}", flush=True)
    c.close()


def run_recv(scenario: str, port: int, flag: str) -> None:
    s = parallel.server("127.0.0.1", port)
    s.wait_for(1, timeout=60)
    conn = s.connections()[0]
    print(f"link {conn.link}; {info()}", flush=True)
    if scenario == "keepalive":  # wait until the sender spoiled what it sent, unless send blocks
        end = time.monotonic() + 5
        while not os.path.exists(flag) and time.monotonic() < end:
            time.sleep(0.02)
        print(f"sender had spoiled its tensors before the first recv: {os.path.exists(flag)}", flush=True)
    for case in cases(scenario):
        recv_one(conn, case)
        print(f"checked {case.name}", flush=True)
    assert conn.recv(timeout=T) == "end"
    conn.send("done", timeout=T)
    print(f"stats {conn.stats()}", flush=True)
    time.sleep(0.2)  # let "done" leave before closing
    s.close()


# ----------------------------------------------------------------------------------------------
# collectives


def contribution(op: str, numel: int, rank: int, world: int, seed: int) -> torch.Tensor:
    """This rank's int64 input: small integers, so every reduction is exact in every dtype tested
    (sums within +-15, products within +-8, the average a whole number)."""
    i = torch.arange(numel, dtype=torch.int64)
    if op in ("sum", "callable"):
        return (i * 7 + rank * 3 + seed) % 11 - 5
    if op in ("max", "min"):
        return (i * 31 + rank * 17 + seed) % 97 - 48
    if op == "prod":
        return (i + rank + seed) % 4 - 1
    if op == "avg":  # a + k*(2r - (world-1)): the k terms cancel, the average is a
        return (i + seed) % 13 - 6 + (i % 5) * (2 * rank - (world - 1))
    raise AssertionError(op)


def reference(op: str, numel: int, world: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    s = torch.stack([contribution(op, numel, r, world, seed) for r in range(world)])
    red = {
        "sum": lambda: s.sum(0),
        "callable": lambda: s.sum(0),
        "max": lambda: s.amax(0),
        "min": lambda: s.amin(0),
        "prod": lambda: s.prod(0),
        "avg": lambda: s.sum(0) // world,
    }[op]()
    return red.to(dtype)


RING_AT = 256 << 10  # PARALLEL_RING_THRESHOLD's default (the GPU tests leave it alone)


def expect_algorithm(tree: parallel.Tree, nbytes: int, what: str) -> str:
    """The algorithm that moved the last all-reduce: the ring from the threshold on (CUDA tensors
    as CPU ones), the tree below it; returns its name for the log."""
    want = "ring" if nbytes >= RING_AT and tree.world_size > 1 else "tree"
    got = tree.last_algorithm
    assert got == want, f"{what}: the data moved by the {got}, expected the {want}"
    return got


def reduce_checked(tree: parallel.Tree, op: str, dtype: torch.dtype, numel: int, seed: int) -> None:
    r, n = tree.rank, tree.world_size
    t = contribution(op, numel, r, n, seed).to(dtype).to(DEV)
    ptr = t.data_ptr()
    seen: list[str] = []

    def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        seen.append(f"{a.device.type}/{b.device.type}")
        return a.add_(b)

    tree.all_reduce(t, add if op == "callable" else op)
    what = f"all_reduce {op} {dtype} x{numel} (world {n})"
    assert t.device == DEV and t.data_ptr() == ptr, f"{what}: not in place"
    same(t, reference(op, numel, n, seed, dtype), what)
    assert all(s == "cuda/cuda" for s in seen), f"{what}: the callable got {set(seen)}"
    expect_algorithm(tree, numel * t.element_size(), what)


def tree_battery(tree: parallel.Tree) -> None:
    r, n = tree.rank, tree.world_size
    seed = 0
    for op in ("sum", "max", "min", "prod", "avg"):
        for dtype in (torch.float32, torch.int32, torch.float16, torch.bfloat16):
            for numel in (1001, 200_003):  # below and above PARALLEL_RING_THRESHOLD (256 KiB)
                seed += 1
                reduce_checked(tree, op, dtype, numel, seed)
        print(f"all_reduce {op} ok", flush=True)
    for numel in (0, 1, 1001, 300_007):
        seed += 1
        reduce_checked(tree, "callable", torch.float32, numel, seed)
    print("all_reduce callable ok", flush=True)

    # 64 MiB, ring; element-dependent values so that a misplaced chunk shows.
    big = contribution("sum", 16 << 20, r, n, 5).float().to(DEV)
    tree.all_reduce(big, "sum")
    same(big, reference("sum", 16 << 20, n, 5, torch.float32), "all_reduce 64 MiB")
    algo = expect_algorithm(tree, 64 << 20, "all_reduce 64 MiB")
    print(f"all_reduce 64 MiB ok (by the {algo})", flush=True)

    # A nested container of CUDA tensors, views among them; the memory around views is untouched.
    holder = torch.full((10000,), 1000.0, device=DEV)
    m = torch.zeros(33, 65, dtype=torch.int32, device=DEV)
    tree_in = {
        "w": contribution("sum", 33 * 17, r, n, 7).float().reshape(33, 17).to(DEV),
        "b": [contribution("sum", 5, r, n, 8).to(torch.int32).to(DEV), holder[1000:5000]],
        "t": m.t(),
        "h": contribution("sum", 7, r, n, 9).to(torch.bfloat16).to(DEV),
    }
    tree_in["b"][1].copy_(contribution("sum", 4000, r, n, 10).float().to(DEV))
    tree_in["t"].copy_(contribution("sum", 65 * 33, r, n, 11).to(torch.int32).reshape(65, 33).to(DEV))
    tree.all_reduce(tree_in, "sum")
    same(tree_in["w"], reference("sum", 33 * 17, n, 7, torch.float32).reshape(33, 17), "container w")
    same(tree_in["b"][0], reference("sum", 5, n, 8, torch.int32), "container b[0]")
    same(tree_in["b"][1], reference("sum", 4000, n, 10, torch.float32), "container b[1] (a slice)")
    same(m.t(), reference("sum", 65 * 33, n, 11, torch.int32).reshape(65, 33), "container t (transposed)")
    same(tree_in["h"], reference("sum", 7, n, 9, torch.bfloat16), "container h")
    hc = holder.cpu()
    assert torch.all(hc[:1000] == 1000) and torch.all(hc[5000:] == 1000), "wrote outside the slice"
    print("all_reduce container ok", flush=True)

    # Stream order: the input is written late on a busy side stream, the call is made under it
    # without synchronizing; the result is read on the default stream as soon as the call returns.
    final = contribution("sum", 1 << 20, r, n, 12).float().to(DEV)
    t = torch.zeros_like(final)
    torch.cuda.synchronize()
    side = torch.cuda.Stream(DEV)
    busy(side)
    with torch.cuda.stream(side):
        t.copy_(final)
        tree.all_reduce(t, "sum")
    same(t, reference("sum", 1 << 20, n, 12, torch.float32), "all_reduce under a busy side stream")
    algo = expect_algorithm(tree, 4 << 20, "all_reduce under a busy side stream")
    print(f"all_reduce stream order ok (by the {algo})", flush=True)

    # Broadcast from every root, several dtypes, a container, 64 MiB.
    for k in range(n):
        for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
            want = pattern(1001, dtype, 100 + k)
            b = want.to(DEV) if r == k else torch.zeros(1001, dtype=dtype, device=DEV)
            tree.broadcast(b, root=k)
            same(b, want, f"broadcast {dtype} from {k}")
    want_c = {"x": pattern(4097, torch.float16, 200), "y": [pattern(13, torch.int32, 201)]}
    bc = {"x": want_c["x"].to(DEV), "y": [want_c["y"][0].to(DEV)]}
    if r != n - 1:
        bc["x"].zero_()
        bc["y"][0].zero_()
    tree.broadcast(bc, root=n - 1)
    same(bc["x"], want_c["x"], "broadcast container x")
    same(bc["y"][0], want_c["y"][0], "broadcast container y")
    want_big = pattern(16 << 20, torch.float32, 300)
    bb = want_big.to(DEV) if r == 0 else torch.zeros(16 << 20, device=DEV)
    tree.broadcast(bb, root=0)
    same(bb, want_big, "broadcast 64 MiB")
    print("broadcast ok", flush=True)
    tree.barrier()


def tree_ring(tree: parallel.Tree) -> None:
    """Large CUDA all-reduces by the ring (over whatever link the environment gives: CUDA IPC of
    chunks, or staged through pinned host memory): odd sizes that divide neither by the world nor
    by any chunk, several ops and dtypes, a callable, and a callable that raises on one rank, which
    must fail every rank and leave every tensor as it was."""
    r, n = tree.rank, tree.world_size
    seed = 100
    for op, dtype, numel in (
        ("sum", torch.float32, (16 << 20) + 7),  # 64 MiB + 28 bytes
        ("max", torch.int32, 3_000_017),
        ("avg", torch.bfloat16, 1_000_003),
        ("prod", torch.float16, 777_777),
        ("min", torch.float64, 65_537),
        ("callable", torch.float32, 5_000_011),
    ):
        seed += 1
        reduce_checked(tree, op, dtype, numel, seed)
        print(f"ring {op} {dtype} x{numel} ok (by the {tree.last_algorithm})", flush=True)

    # A callable raising on the last rank: every rank raises, no tensor changes, the tree goes on.
    t = contribution("sum", 1_000_003, r, n, 200).float().to(DEV)
    before = t.clone()

    def add_or_raise(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if r == n - 1:
            raise ValueError(f"raised on purpose on rank {r}")
        return a.add_(b)

    try:
        tree.all_reduce(t, add_or_raise)
    except Exception as e:  # the raising rank may see its own exception type
        print(f"ring callable raised as expected: {type(e).__name__}: {str(e)[:200]}", flush=True)
    else:
        raise AssertionError("a callable that raised on one rank did not fail this rank")
    assert torch.equal(t, before), "a failed all-reduce changed the tensor"
    reduce_checked(tree, "sum", torch.float32, 300_007, 201)
    print("ring failing callable ok", flush=True)
    tree.barrier()


def tree_mixed(tree: parallel.Tree) -> None:
    """Rank 0 passes a CPU tensor, the others CUDA: either right everywhere or a prompt error."""
    r, n = tree.rank, tree.world_size
    x = contribution("sum", 1001, r, n, 1).float()
    if r != 0:
        x = x.to(DEV)
    t0 = time.monotonic()
    try:
        tree.all_reduce(x, "sum")
    except parallel.ParallelError as e:
        print(f"MIXED error {type(e).__name__} {time.monotonic() - t0:.2f}s: {e}", flush=True)
        return
    dt = time.monotonic() - t0
    same(x, reference("sum", 1001, n, 1, torch.float32), "mixed CPU/CUDA all_reduce")
    print(f"MIXED ok {dt:.2f}s on {x.device}", flush=True)


def main() -> int:
    assert torch.cuda.is_available(), "this worker needs a CUDA device"
    role, scenario = sys.argv[1], sys.argv[2]
    torch.cuda.init()
    if role == "send":
        run_send(scenario, int(sys.argv[3]), sys.argv[4])
    elif role == "recv":
        run_recv(scenario, int(sys.argv[3]), sys.argv[4])
    elif role == "tree":
        rank, world, root = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        tree = parallel.tree(rank=rank, world_size=world, root=root, timeout=60)
        print(f"rank {tree.rank}; {info()}", flush=True)
        {"battery": tree_battery, "mixed": tree_mixed, "ring": tree_ring}[scenario](tree)
    else:
        raise SystemExit(f"unknown role {role!r}")
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

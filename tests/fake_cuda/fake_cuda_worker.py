"""One process of tests/fake_cuda/test_bindings_fake_cuda.py, run with the fake libcuda first in
LD_LIBRARY_PATH: the real wheel, fake CUDA arrays (fakecuda.py).

Usage:
  fake_cuda_worker.py recv PORT     the server: receives every case and checks it
  fake_cuda_worker.py send PORT     the client: sends every case
  fake_cuda_worker.py tree RANK WORLD ROOT

Both ends of the pair walk the same cases; payloads are deterministic (fakecuda.pattern), so the
receiver rebuilds what was sent. The receiver's expectations of the link come from FAKE_LINK
("shm" or "tcp") and FAKE_IPC_BYTES (messages of at least this many CUDA bytes go by CUDA IPC;
-1: none). Every blocking call has a timeout; prints "ok" last and exits 0 only if all passed.
"""

from __future__ import annotations

import gc
import os
import sys

import fakecuda as fc
import numpy as np
from fakecuda import FakeCudaArray, ReceivedArray, count, pattern

parallel = fc.load()
T = 30.0
f32, f64, i64 = np.float32, np.float64, np.int64


def settle() -> None:
    """Lets deferred releases happen: pyo3 applies decrefs queued without the GIL on its next
    entry; then a collection."""
    parallel.cuda_available()
    gc.collect()
    parallel.cuda_available()
    gc.collect()


def clean(what: str) -> None:
    assert count("misuses") == 0, f"{what}: driver misuse (stderr says which)"
    assert count("open_mappings") == 0, f"{what}: CUDA IPC mappings left open"
    assert not fc.deleter_errors, f"{what}: {fc.deleter_errors}"


def released(what: str) -> None:
    """Every capsule of ours that the bindings imported was released (DL-1 ends)."""
    settle()
    assert not fc._exported, f"{what}: {len(fc._exported)} exported capsules never released"
    clean(what)


def check_start() -> None:
    assert parallel.cuda_available(), parallel.cuda_info()
    assert parallel.cuda_info() == "CUDA driver 12.34, 2 device(s)", parallel.cuda_info()


# ---- the cases: (key, device, values, offset in elements of a larger allocation) -----------------


def dict_case() -> dict[str, tuple[int, np.ndarray]]:
    """What the dict of case 1 holds once received: device and values per key."""
    return {
        "a": (0, pattern((7,), f32, 1)),
        "big": (1, pattern((300_000,), i64, 2)),
        "empty": (1, pattern((0,), f32, 3)),
        "view": (0, pattern((1000,), f32, 4)[100:107]),
        "t": (1, pattern((3, 5), i64, 5).T.copy()),
        "scalar": (1, pattern((), f64, 15)),
    }


def send(port: int) -> None:
    c = parallel.client("127.0.0.1", port, timeout=T)
    # 1. A dict of CUDA arrays: on both devices, empty, a view at an offset, a transposed view.
    base = FakeCudaArray.of(pattern((1000,), f32, 4), 0)
    mat = FakeCudaArray.of(pattern((3, 5), i64, 5), 1)
    sent = {
        "a": FakeCudaArray.of(pattern((7,), f32, 1), 0),
        "big": FakeCudaArray.of(pattern((300_000,), i64, 2), 1),
        "empty": FakeCudaArray.of(pattern((0,), f32, 3), 1),
        "view": FakeCudaArray(base.alloc, f32, (7,), None, 100 * 4),
        "t": mat.T,
        "scalar": FakeCudaArray.of(pattern((), f64, 15), 1),
        "n": 42,
    }
    c.send(sent, timeout=T)
    for k in ("a", "big", "empty", "view", "scalar"):
        assert len(sent[k].dlpack_streams) == 1, k  # type: ignore[union-attr]
    assert sent["t"].dlpack_streams == [], "a non-contiguous CUDA array is sent through contiguous()"  # type: ignore[union-attr]
    # 2. Into contiguous CUDA out= (another device; then the same), with guard bytes.
    c.send(FakeCudaArray.of(pattern((1000,), f32, 6), 1), timeout=T)
    c.send(FakeCudaArray.of(pattern((300_000,), i64, 7), 0), timeout=T)
    # 3. Into non-contiguous (transposed) CUDA out=, blocking and asynchronous.
    c.send(FakeCudaArray.of(pattern((300, 5), f32, 8), 1), timeout=T)
    c.send(FakeCudaArray.of(pattern((300, 5), f32, 9), 0), timeout=T)
    # 4. CUDA into a CPU out=, CPU into a CUDA out=.
    c.send(FakeCudaArray.of(pattern((4096,), f64, 10), 1), timeout=T)
    c.send(pattern((2, 513), i64, 11), timeout=T)
    # 5. A dict into a dict of out=: transposed CUDA, CUDA at an offset, CPU; CUDA and CPU sent.
    parts = {
        "x": FakeCudaArray.of(pattern((6, 4), f32, 12), 1),
        "y": pattern((33,), i64, 13),
        "z": FakeCudaArray.of(pattern((5,), f64, 14), 0),
    }
    c.send(parts, timeout=T)
    assert c.recv(timeout=T) == "bye"
    del sent, base, mat
    released("the sender")
    c.close()


def recv(port: int) -> None:
    link = os.environ["FAKE_LINK"]
    ipc_bytes = int(os.environ["FAKE_IPC_BYTES"])
    s = parallel.server("127.0.0.1", port)
    s.wait_for(1, timeout=T)
    conn = s.connections()[0]
    assert conn.link == link, (conn.link, link)

    def by_ipc(nbytes: int) -> bool:
        return ipc_bytes >= 0 and nbytes >= ipc_bytes

    # 1.
    opens, calls = count("ipc_opens"), len(fc.alloc_calls)
    got = conn.recv(timeout=T)
    want = dict_case()
    assert list(got) == [*want, "n"] and got["n"] == 42, list(got)
    total = sum(v.nbytes for _, v in want.values())
    nonempty = [k for k, (_, v) in want.items() if v.size]
    for k, (dev, v) in want.items():
        r = got[k]
        assert isinstance(r, ReceivedArray), (k, type(r))
        assert r.is_cuda and r.dev == dev, f"{k}: received on cuda:{r.dev}, sent from cuda:{dev}"
        assert (r.dtype, r.shape) == (v.dtype, v.shape), (k, r.dtype, r.shape)
        assert np.array_equal(r.host, v), f"{k}: wrong values"
        if v.size:
            assert fc.device_of(r.data_ptr()) == dev, f"{k}: memory on the wrong device"
            assert any(a.ptr <= r.ptr < a.ptr + a.nbytes and a.dev == dev for a in fc.allocated), (
                f"{k}: not in memory from the installed allocator"
            )
    news = sorted((d, n) for d, n, _ in fc.alloc_calls[calls:])
    assert news == sorted((dev, v.nbytes) for k, (dev, v) in want.items() if v.size), news
    assert fc.received_devices[-len(want) :] == [(2, dev) for dev, _ in want.values()]
    if os.environ.get("FAKE_DEVICE_AFTER_EXPORT") == "1":
        after = fc.devices_after_export[-len(want) :]
        assert after == fc.received_devices[-len(want) :], f"__dlpack_device__ after __dlpack__: {after}"
    assert count("ipc_opens") - opens == (len(nonempty) if by_ipc(total) else 0), count("ipc_opens") - opens
    del got, r
    settle()
    assert ReceivedArray.live == 0 and len(fc.allocated) == 0, "received CUDA memory not freed"
    clean("a dict of CUDA arrays")

    # 2.
    for dev, shape, dtype, seed in ((0, (1000,), f32, 6), (0, (300_000,), i64, 7)):
        out = FakeCudaArray.empty(dev, dtype, shape, margin=256, fill=0x11)
        calls = len(fc.alloc_calls)
        assert conn.recv(timeout=T, out=out) is out
        assert np.array_equal(out.host, pattern(shape, dtype, seed)), f"out= {shape}: wrong values"
        assert (out.alloc.host[:256] == 0x11).all() and (out.alloc.host[-256:] == 0x11).all(), "guards"
        assert len(out.dlpack_streams) == 1
        assert len(fc.alloc_calls) == calls, "out= is filled in place, without new device memory"
        clean(f"into a CUDA out= of {shape}")

    # 3.
    for seed, dev, use_async in ((8, 1, False), (9, 0, True)):
        base = FakeCudaArray.empty(dev, f32, (5, 300), fill=0)
        out = base.T
        assert not out.is_contiguous()
        if use_async:
            got = conn.recv_async(timeout=T, out=out).wait(T)
        else:
            got = conn.recv(timeout=T, out=out)
        assert got is out
        want_v = pattern((300, 5), f32, seed)
        assert len(out.copied_from) == 1, "the contiguous stand-in was not copied back (write_back)"
        assert np.array_equal(out.host, want_v), "non-contiguous out=: wrong values"
        assert np.array_equal(base.host, want_v.T)
        clean("into a transposed CUDA out=")

    # 4.
    cpu = np.zeros((4096,), f64)
    assert conn.recv(timeout=T, out=cpu) is cpu
    assert np.array_equal(cpu, pattern((4096,), f64, 10)), "CUDA into a CPU out=: wrong values"
    out = FakeCudaArray.empty(1, i64, (2, 513), margin=64, fill=0x22)
    assert conn.recv(timeout=T, out=out) is out
    assert np.array_equal(out.host, pattern((2, 513), i64, 11)), "CPU into a CUDA out=: wrong values"
    assert (out.alloc.host[:64] == 0x22).all() and (out.alloc.host[-64:] == 0x22).all(), "guards"
    clean("CPU <-> CUDA out=")

    # 5.
    base = FakeCudaArray.empty(0, f32, (4, 6), fill=0)
    outs = {"x": base.T, "y": FakeCudaArray.empty(1, i64, (33,), margin=8, fill=0x33), "z": np.zeros(5)}
    got = conn.recv(timeout=T, out=outs)
    assert got.keys() == outs.keys() and all(got[k] is outs[k] for k in outs), got
    assert np.array_equal(base.host, pattern((6, 4), f32, 12).T), "dict out=: transposed view"
    assert np.array_equal(outs["y"].host, pattern((33,), i64, 13)), "dict out=: CUDA at an offset"
    assert (outs["y"].alloc.host[:8] == 0x33).all() and (outs["y"].alloc.host[-8:] == 0x33).all()
    assert np.array_equal(outs["z"], pattern((5,), f64, 14)), "dict out=: CPU"
    clean("a dict of out=")

    conn.send("bye", timeout=T)
    released("the receiver")
    s.close()


def tree(rank: int, world: int, root: str) -> None:
    t = parallel.tree(rank, world, root, timeout=T)
    src = world - 1
    # Two float32 arrays on one device: fused into one device buffer (from the allocator).
    xs = [
        FakeCudaArray.of(pattern(shape, f32, seed + rank), 0, margin=64)
        for shape, seed in (((1000,), 10), ((7,), 20))
    ]
    calls = len(fc.alloc_calls)
    assert t.broadcast(xs, root=src) is xs
    for x, seed in zip(xs, (10, 20), strict=True):
        assert np.array_equal(x.host, pattern(x.shape, f32, seed + src)), (
            f"broadcast of {x.shape}: wrong values"
        )
        assert (x.alloc.host[:64] == 0xA5).all() and (x.alloc.host[-64:] == 0xA5).all(), "guards"
    assert (0, 1007 * 4) in [(d, n) for d, n, _ in fc.alloc_calls[calls:]], (
        "no fused buffer from the allocator"
    )
    # One array at an offset in its allocation (its own memory, no fused buffer), a group with an
    # empty array, a group of empty arrays only.
    one = FakeCudaArray.of(pattern((300,), i64, 50 + rank), 1, margin=24)
    mixed = [FakeCudaArray.of(pattern((0,), f32, 0), 1), FakeCudaArray.of(pattern((9,), f32, 60 + rank), 1)]
    empties = [FakeCudaArray.of(pattern((0,), np.int32, 0), 0) for _ in range(2)]
    t.broadcast([one, mixed, empties], root=src)
    assert np.array_equal(one.host, pattern((300,), i64, 50 + src)), "broadcast at an offset"
    assert (one.alloc.host[:24] == 0xA5).all() and (one.alloc.host[-24:] == 0xA5).all(), "guards"
    assert np.array_equal(mixed[1].host, pattern((9,), f32, 60 + src)), "broadcast with an empty array"
    # A transposed view (contiguous stand-in, written back), blocking and asynchronous.
    for seed, use_async in ((30, False), (40, True)):
        m = FakeCudaArray.of(pattern((4, 6), f32, seed + rank), 1)
        view = m.T
        if use_async:
            assert t.broadcast_async(view, root=src).wait(T) is view
        else:
            assert t.broadcast(view, root=src) is view
        assert np.array_equal(m.host, pattern((4, 6), f32, seed + src)), "broadcast into a transposed view"
        assert len(view.copied_from) == 1, "the stand-in was not copied back"
    t.barrier()
    released(f"tree rank {rank}")


def main() -> None:
    check_start()
    role = sys.argv[1]
    if role == "send":
        send(int(sys.argv[2]))
    elif role == "recv":
        recv(int(sys.argv[2]))
    else:
        tree(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    print("ok", flush=True)


if __name__ == "__main__":
    main()

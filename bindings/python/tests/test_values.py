"""Values and tensors through a live link (shm or tcp, per PARALLEL_SHM)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_parallel as parallel

from .conftest import expected_link

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.complex64,
    torch.complex128,
]


def roundtrip(pair, value, **kw):
    _, c, conn = pair
    c.send(value)
    return conn.recv(timeout=10, **kw)


def test_seed_example_runs_as_written():
    server = parallel.server("127.0.0.1", 0)
    client = parallel.client("127.0.0.1", server.port)
    client.send("hi")
    msg = server.recv_any()
    assert msg == "hi"
    assert client.link == expected_link()
    client.close()
    server.close()


def test_scalars_and_containers(pair):
    v = {
        "none": None,
        "t": True,
        "f": False,
        "i": -(2**63),
        "j": 2**63 - 1,
        "x": -0.0,
        "s": "ünïcødé ✓",
        "b": b"\x00\xff" * 1000,
        "l": [1, [2, [3, []]], ()],
        "tu": (1, "a", None),
        7: {"nested": {}},
    }
    got = roundtrip(pair, v)
    assert got == v
    assert isinstance(got["tu"], tuple) and isinstance(got["l"], list)
    assert type(got["t"]) is bool and type(got["i"]) is int


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensor_dtypes(pair, dtype):
    t = (torch.arange(24) % 7).to(dtype).reshape(2, 3, 4)
    got = roundtrip(pair, t)
    assert got.dtype == dtype and got.shape == t.shape
    assert torch.equal(got, t)


@pytest.mark.parametrize("shape", [(0,), (1,), (7919,), (3, 0, 2), ()], ids=str)
def test_awkward_sizes(pair, shape):
    t = torch.randn(shape, dtype=torch.float64)
    got = roundtrip(pair, t)
    assert got.shape == t.shape and torch.equal(got, t)


def test_non_contiguous_views_are_sent_correctly(pair):
    base = torch.arange(60, dtype=torch.int32).reshape(6, 10)
    views = [base.t(), base[::2, 1::3], base[:, 4], base.reshape(3, 20)[1:]]
    got = roundtrip(pair, views)
    for g, v in zip(got, views, strict=True):
        assert g.is_contiguous() and torch.equal(g, v)


def test_receive_into_non_contiguous_out(pair):
    _, c, conn = pair
    src = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    holder = torch.zeros(4, 3)
    out = holder.t()  # 3x4 view, strides (1, 3)
    c.send(src)
    r = conn.recv(timeout=10, out=out)
    assert r is out and torch.equal(out, src) and torch.equal(holder, src.t())


def test_numpy_and_requires_grad(pair):
    a = np.arange(10, dtype=np.float32)
    w = torch.ones(3, requires_grad=True)
    got = roundtrip(pair, [a, w])
    assert torch.equal(got[0], torch.from_numpy(a))
    assert torch.equal(got[1], torch.ones(3)) and not got[1].requires_grad


def test_large_tensor_into_preallocated_out(pair):
    _, c, conn = pair
    t = torch.randn(8 << 20)  # 32 MiB
    out = torch.empty_like(t)
    h = c.send_async(t)  # the ring (or socket buffer) is smaller than the tensor: send concurrently
    assert conn.recv(timeout=30, out=out) is out
    h.wait(30)
    assert torch.equal(out, t)


def test_out_structures_fill_in_place(pair):
    _, c, conn = pair
    a, b = torch.arange(5), torch.ones(2, 2)
    c.send({"a": a, "meta": "x", "b": b})
    oa, ob = torch.empty(5, dtype=torch.int64), torch.empty(2, 2)
    got = conn.recv(timeout=10, out={"a": oa, "b": ob})
    assert got["a"] is oa and got["b"] is ob and got["meta"] == "x"
    assert torch.equal(oa, a) and torch.equal(ob, b)
    c.send([a, b])
    got = conn.recv(timeout=10, out=[oa, ob])
    assert got[0] is oa and got[1] is ob


def test_out_mismatch_raises_and_keeps_the_connection(pair):
    _, c, conn = pair
    c.send(torch.ones(3, 4))
    c.send("next")
    with pytest.raises(parallel.Mismatch, match="float32") as ei:
        conn.recv(timeout=10, out=torch.empty(3, 4, dtype=torch.float64))
    assert isinstance(ei.value, ValueError) and ei.value.peer
    assert conn.recv(timeout=10) == "next"
    c.send([torch.ones(1)])
    with pytest.raises(parallel.Mismatch, match=r"out= has a tensor at value\[1\]"):
        conn.recv(timeout=10, out=[torch.empty(1), torch.empty(1)])
    c.send(42)
    assert conn.recv(timeout=10) == 42


def test_unsupported_values_are_refused_clearly(pair):
    _, c, conn = pair
    with pytest.raises(parallel.Unsupported, match="type object"):
        c.send(object())
    with pytest.raises(TypeError, match="64 bits"):
        c.send([1, 2**64])
    with pytest.raises(parallel.Unsupported, match="dict keys"):
        c.send({(1, 2): 3})
    loop: list = []
    loop.append(loop)
    with pytest.raises(parallel.Unsupported, match="PARALLEL_MAX_VALUE_DEPTH"):
        c.send(loop)
    with pytest.raises(ValueError, match="negative strides"):
        c.send(torch.arange(4).numpy()[::-1])
    c.send("still fine")
    assert conn.recv(timeout=10) == "still fine"


class Point:
    def __init__(self, x: int) -> None:
        self.x = x


def test_pickle_only_when_both_ends_allow_it():
    s = parallel.server("127.0.0.1", 0, allow_pickle=True)
    c = parallel.client("127.0.0.1", s.port, allow_pickle=True)
    c.send({"p": Point(3)})
    got = s.recv_any(timeout=10)
    assert isinstance(got["p"], Point) and got["p"].x == 3
    s.close()
    c.close()
    s2 = parallel.server("127.0.0.1", 0)
    c2 = parallel.client("127.0.0.1", s2.port, allow_pickle=True)
    c2.send(Point(1))
    with pytest.raises(parallel.Unsupported, match="allow_pickle"):
        s2.recv_any(timeout=10)
    s2.close()
    c2.close()

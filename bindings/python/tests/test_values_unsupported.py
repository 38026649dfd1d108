"""Tensors the wire cannot carry are refused with the package's Unsupported error naming the dtype
or layout and the fix, never an exception class from torch or numpy; the connection stays usable."""

from __future__ import annotations

import socket
import warnings

import numpy
import pytest
import torch

import torch_parallel as parallel


def cases() -> list[tuple[str, object, str]]:
    with warnings.catch_warnings():  # CSR and nested tensors are "beta"/"prototype" in torch
        warnings.simplefilter("ignore")
        return make_cases()


def make_cases() -> list[tuple[str, object, str]]:
    c = torch.tensor([1 + 2j, 3 - 1j])
    out: list[tuple[str, object, str]] = [
        ("sparse_coo", torch.eye(3).to_sparse(), ".to_dense()"),
        ("sparse_csr", torch.eye(3).to_sparse_csr(), ".to_dense()"),
        ("conjugate", c.conj(), ".resolve_conj()"),
        ("negative", c.conj().imag, ".resolve_neg()"),
        ("quantized", torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8), ".dequantize()"),
        ("nested", torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "t.unbind()"),
        ("float128", numpy.zeros(3, dtype=numpy.longdouble), "cast"),
    ]
    for name in ("float8_e4m3fn", "float8_e5m2"):
        if hasattr(torch, name):
            out.append((name, torch.zeros(4).to(getattr(torch, name)), "cast it first"))
    return out


CASES = cases()


@pytest.mark.parametrize("name,tensor,fix", CASES, ids=[c[0] for c in CASES])
def test_unsendable_tensor_is_refused_with_unsupported_naming_the_fix(pair, name, tensor, fix):
    _, c, conn = pair
    with pytest.raises(parallel.Unsupported) as e:
        c.send({"t": tensor})
    msg = str(e.value)
    assert fix in msg, msg
    if name.startswith("float8"):
        assert name in msg, msg
    if name.startswith("sparse"):
        assert "sparse" in msg, msg
    # Nothing was sent: the next message is the next one received.
    c.send("after")
    assert conn.recv(timeout=10) == "after"


def test_unsendable_tensor_in_a_collective_is_unsupported():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tree = parallel.tree(0, 1, f"127.0.0.1:{port}", timeout=30)
    with pytest.raises(parallel.Unsupported, match=r"\.to_dense\(\)"):
        tree.all_reduce([torch.eye(2).to_sparse()])
    # Bare, as the collectives' fast import of plain torch tensors sees them first.
    for name, tensor, fix in CASES:
        with pytest.raises(parallel.Unsupported) as e:
            tree.all_reduce(tensor)
        assert fix in str(e.value), (name, str(e.value))
    t = torch.ones(2)
    tree.all_reduce(t)
    assert torch.equal(t, torch.ones(2))


def test_unsendable_out_tensor_is_unsupported(pair):
    _, c, conn = pair
    c.send(torch.ones(3))
    with pytest.raises(parallel.Unsupported, match=r"resolve_conj"):
        conn.recv(timeout=10, out=torch.tensor([1j, 2j, 3j]).conj())
    # The out= check happens before the receive: the message is still there.
    assert torch.equal(conn.recv(timeout=10), torch.ones(3))

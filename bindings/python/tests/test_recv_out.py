"""recv(out=...) into a dict/list fills each tensor by its key and place in the structure, not by
position; a structure mismatch is a clear error, the message is consumed, the connection stays
usable."""

from __future__ import annotations

import pytest
import torch

import torch_parallel as parallel


def test_recv_out_dict_fills_by_key_whatever_the_insertion_order(pair):
    _, c, conn = pair
    # Same dtype and shape everywhere, so a positional fill would be silently wrong.
    c.send(
        {
            "a": torch.full((3,), 1.0),
            "b": torch.full((3,), 2.0),
            "c": {"x": torch.full((3,), 3.0), 5: torch.full((3,), 5.0)},
        }
    )
    oa, ob, ox, o5 = (torch.zeros(3) for _ in range(4))
    out = {"c": {5: o5, "x": ox}, "b": ob, "a": oa}
    got = conn.recv(timeout=10, out=out)
    assert got["a"] is oa and got["b"] is ob and got["c"]["x"] is ox and got["c"][5] is o5
    for t, v in ((oa, 1.0), (ob, 2.0), (ox, 3.0), (o5, 5.0)):
        assert torch.equal(t, torch.full((3,), v)), (t, v)


def test_recv_out_nested_lists_and_tuples_fill_by_place(pair):
    _, c, conn = pair
    c.send([torch.arange(2.0), ("s", {"k": torch.arange(3)})])
    o0, ok = torch.zeros(2), torch.zeros(3, dtype=torch.int64)
    # Places given by index; a dict with int keys names places in lists and tuples too.
    got = conn.recv(timeout=10, out={0: o0, 1: {1: {"k": ok}}})
    assert got[0] is o0 and got[1][0] == "s" and got[1][1]["k"] is ok
    assert torch.equal(o0, torch.arange(2.0)) and torch.equal(ok, torch.arange(3))


def test_recv_out_async_fills_by_key(pair):
    _, c, conn = pair
    oa, ob = torch.zeros(2), torch.zeros(2)
    h = conn.recv_async(timeout=10, out={"b": ob, "a": oa})
    c.send({"a": torch.ones(2), "b": torch.full((2,), 2.0)})
    got = h.wait(10)
    assert got["a"] is oa and torch.equal(oa, torch.ones(2)) and torch.equal(ob, torch.full((2,), 2.0))


@pytest.mark.parametrize(
    "out,expect",
    [
        (lambda: {"a": torch.zeros(2), "z": torch.zeros(2)}, "value['b']"),
        (lambda: {"a": torch.zeros(2)}, "value['b']"),
        (lambda: {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(2)}, "value['c']"),
        (lambda: {"a": torch.zeros(2), "b": torch.zeros(3)}, "value['b']"),
    ],
    ids=["other_key", "missing_key", "extra_key", "other_shape"],
)
def test_recv_out_structure_mismatch_is_an_error_and_the_connection_stays_usable(pair, out, expect):
    _, c, conn = pair
    c.send({"a": torch.ones(2), "b": torch.ones(2)})
    c.send({"next": torch.full((2,), 7.0)})
    with pytest.raises(parallel.Mismatch) as e:
        conn.recv(timeout=10, out=out())
    assert expect in str(e.value) and "still usable" in str(e.value), str(e.value)
    # The mismatched message was consumed; the next one arrives intact.
    got = conn.recv(timeout=10)
    assert torch.equal(got["next"], torch.full((2,), 7.0))

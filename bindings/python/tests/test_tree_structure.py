"""Nested values in the Tree's collectives, across real processes: leaves matched by structure and
dict key (never insertion order), plain numbers reduced and returned, structure mismatches named
on every rank, unsupported leaves and ops refused before any data moves."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch

import torch_parallel as parallel

WORKER = str(pathlib.Path(__file__).with_name("structure_worker.py"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_world(n: int, scenario: str, timeout: float = 120) -> list[tuple[int, str, str]]:
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, scenario, str(r), str(n), f"127.0.0.1:{port}"],
            env=dict(os.environ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(n)
    ]
    out = []
    end = time.monotonic() + timeout
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError(f"{scenario}: a rank did not finish") from None
        out.append((p.returncode, o, e))
    for r, (rc, o, e) in enumerate(out):
        assert rc == 0 and f"rank {r} ok" in o, f"rank {r}: {o}\n{e}"
    return out


def lines(res: list[tuple[int, str, str]], prefix: str) -> list[str]:
    return [next(x for x in o.splitlines() if x.startswith(prefix)) for _, o, _ in res]


@pytest.mark.parametrize("n", [3, 4])
def test_dicts_built_in_different_orders_reduce_by_key_with_numbers_returned(n):
    run_world(n, "match_by_key")


def test_shape_mismatch_names_the_path_and_ranks_on_every_rank():
    msgs = lines(run_world(3, "mismatch_shape"), "mismatch:")
    for m in msgs:
        assert "value['layer1']['weight']: shape (3, 4) on rank 0, (4, 3) on rank 2" in m, m
    assert len(set(msgs)) == 1, msgs


def test_key_mismatch_names_the_missing_key_on_every_rank():
    for m in lines(run_world(3, "mismatch_key"), "mismatch:"):
        assert "value['b']: missing on rank 0, present on rank 1" in m, m


def test_dtype_mismatch_names_the_path_on_every_rank():
    for m in lines(run_world(3, "mismatch_dtype"), "mismatch:"):
        assert "value[1]['g']: dtype float32 on rank 0, float64 on rank 1" in m, m


def test_number_kind_mismatch_is_named():
    for m in lines(run_world(3, "mismatch_number"), "mismatch:"):
        assert "value['loss']: a float on rank 0, an int on rank 2" in m, m


def test_avg_on_integer_tensors_is_refused_on_every_rank_before_data_moves():
    for m in lines(run_world(3, "avg_int"), "refused:"):
        assert "avg is only supported for floating-point and complex dtypes, got int32" in m, m
        assert "value['i']" in m, m


def test_bare_tensors_in_any_form_reduce_together_and_their_differences_are_named():
    res = run_world(4, "mixed_imports")
    for _, o, _ in res:
        found = [x for x in o.splitlines() if x.startswith("mismatch:")]
        assert len(found) == 3, o
        assert "value: shape (4,) on rank 0, (5,) on rank 2" in found[0], found
        assert "value: dtype float32 on rank 0, float64 on rank 1" in found[1], found
        assert "value: missing on rank 0, present on rank 1" in found[2], found


def test_unreducible_leaf_is_a_type_error_about_the_value():
    port = free_port()
    tree = parallel.tree(0, 1, f"127.0.0.1:{port}", timeout=30)
    with pytest.raises(TypeError) as e:
        tree.all_reduce({"w": torch.zeros(2), "name": "abc"})
    msg = str(e.value)
    assert isinstance(e.value, parallel.Unsupported)
    assert "value['name'] is a str; expected tensors, numbers, or lists/tuples/dicts of them" in msg
    assert "all_reduce" in msg and "send" not in msg and "out=" not in msg, msg
    with pytest.raises(TypeError, match=r"value\[0\] is a NoneType"):
        tree.broadcast([None])
    # Numbers alone, on one rank: returned as they are.
    assert tree.all_reduce({"a": 1, "b": [2.5]}) == {"a": 1, "b": [2.5]}

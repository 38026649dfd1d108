"""The public interface: docstrings, stubs, torch habits (ReduceOp, errors that say what to do)."""

from __future__ import annotations

import ast
import inspect
import pathlib
import socket
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed as dist

import torch_parallel as parallel

PKG = pathlib.Path(parallel.__file__).parent
DUNDERS_WITH_MEANING = {"__len__", "__iter__", "__next__", "__enter__", "__exit__"}


def public_members(cls: type) -> Iterator[tuple[str, Any]]:
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            yield name, member.fget
        elif callable(member) or inspect.isdatadescriptor(member) or inspect.ismethoddescriptor(member):
            yield name, member


def test_every_public_name_and_method_has_a_docstring() -> None:
    missing = []
    for name in parallel.__all__:
        obj = getattr(parallel, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for member, fn in public_members(obj):
                doc = getattr(fn, "__doc__", None) or ""
                if not doc.strip():
                    missing.append(f"{name}.{member}")
    assert not missing, f"public names without a docstring: {missing}"


def test_main_entry_points_document_errors_and_an_example() -> None:
    classes = (parallel.Server, parallel.Client, parallel.Tree, parallel.WorkQueue)
    for obj in (parallel.server, parallel.client, *classes):
        doc = inspect.getdoc(obj) or ""
        assert "Example" in doc, obj
    for obj in (parallel.server, parallel.client, parallel.config):
        assert "Raises" in (inspect.getdoc(obj) or ""), obj


def stub_classes() -> tuple[set[str], dict[str, set[str]]]:
    tree = ast.parse((PKG / "_native.pyi").read_text())
    exported: set[str] = set()
    classes: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            exported = {ast.literal_eval(e) for e in node.value.elts}  # type: ignore[attr-defined]
        if isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    return exported, classes


def test_every_native_public_name_and_method_appears_in_the_stubs() -> None:
    exported, classes = stub_classes()
    for name in parallel.__all__:
        obj = getattr(parallel, name)
        if getattr(obj, "__module__", "") != "torch_parallel._native":
            continue
        assert name in exported, f"{name} is missing from _native.pyi's __all__"
        if inspect.isclass(obj):
            assert name in classes, f"class {name} is missing from _native.pyi"
            for member, _ in public_members(obj):
                assert member in classes[name], f"{name}.{member} is missing from _native.pyi"
    # And the Python modules are typed (mypy --strict checks them): py.typed ships.
    assert (PKG / "py.typed").exists()


@pytest.fixture(scope="module")
def solo() -> parallel.Tree:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return parallel.tree(0, 1, f"127.0.0.1:{port}", timeout=30)


@pytest.mark.parametrize(
    ("op", "want"),
    [
        (dist.ReduceOp.SUM, "sum"),
        (dist.ReduceOp.PRODUCT, "prod"),
        (dist.ReduceOp.MIN, "min"),
        (dist.ReduceOp.MAX, "max"),
        (dist.ReduceOp.AVG, "avg"),
        (dist.ReduceOp(dist.ReduceOp.MAX), "max"),
    ],
)
def test_op_accepts_torch_reduce_ops_like_their_names(solo: parallel.Tree, op: Any, want: str) -> None:
    x = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(solo.all_reduce(x.clone(), op=op), solo.all_reduce(x.clone(), op=want))


def test_unsupported_reduce_op_and_unknown_names_say_what_to_use(solo: parallel.Tree) -> None:
    with pytest.raises(ValueError, match=r"PREMUL_SUM is not supported: use SUM, PRODUCT"):
        solo.all_reduce(torch.ones(2), op=dist.ReduceOp.PREMUL_SUM)
    with pytest.raises(ValueError, match=r'op="summ" is not a reduction: expected sum, prod'):
        solo.all_reduce(torch.ones(2), op="summ")
    with pytest.raises(TypeError, match=r"torch.distributed.ReduceOp or a callable f\(a, b\), not int"):
        solo.all_reduce(torch.ones(2), op=3)  # type: ignore[arg-type]


def test_tensor_only_collectives_name_the_call_and_what_was_passed(solo: parallel.Tree) -> None:
    with pytest.raises(TypeError, match=r"all_gather\(tensor\) expects a tensor .* not int"):
        solo.all_gather(5)
    with pytest.raises(TypeError, match=r"reduce_scatter\(tensor\) expects a torch.Tensor, not list"):
        solo.reduce_scatter([1, 2])
    with pytest.raises(parallel.Unsupported, match=r"all_reduce: .*value is a str; expected tensors"):
        solo.all_reduce("x")

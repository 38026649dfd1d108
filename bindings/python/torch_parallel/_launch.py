"""Where a tree meets: a given store, a process group's store, or the launcher's store.

Under torchrun, ``MASTER_ADDR:MASTER_PORT`` is a TCPStore the launcher (or torch's rank 0)
serves, not a free port: a tree meets through that store as torch's ``env://`` rendezvous does
(torch/distributed/rendezvous.py, ``_create_c10d_store``) and never binds the port itself.

Keys: every tree over a store gets the prefix ``torch_parallel/tree/<n>/``, ``n`` counting the
trees this rank made over that store (per rank, so ranks may be threads of one process). Trees
are created collectively, in the same order on every rank, so ``n`` agrees across ranks; torch's
own keys never start with ``torch_parallel/``.
"""

from __future__ import annotations

import os
import threading
import weakref
from datetime import timedelta
from typing import Any

from . import _native

_lock = threading.Lock()
# Trees made so far, per rank, per key space: a store object (held weakly, so a store the user
# drops is freed with its connections), or a name ("launcher", "default", "group:<name>").
_by_store: weakref.WeakKeyDictionary[Any, dict[int, int]] = weakref.WeakKeyDictionary()
_by_name: dict[tuple[str, int], int] = {}
# The launcher's store, one client per process, made on first use.
_launcher_store: Any = None


def _default_timeout() -> float:
    """PARALLEL_TIMEOUT in seconds (the engine has validated it: a number with an optional
    unit ms, s, min or h)."""
    text = dict(_native.config()).get("PARALLEL_TIMEOUT", "600").strip().lower()
    for unit, scale in (("ms", 1e-3), ("min", 60.0), ("h", 3600.0), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return float(text)


def under_torchrun() -> bool:
    """Whether torchrun (torch.distributed.run / torchelastic) started this process."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "TORCHELASTIC_USE_AGENT_STORE" in os.environ


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip().isdigit():
        raise ValueError(
            f"torchrun should have set {name} to a whole number, found {value!r}: "
            "pass rank= and world_size= to torch_parallel.tree()"
        )
    return int(value)


def _next_prefix(space: object, rank: int) -> str:
    with _lock:
        if isinstance(space, str):
            n = _by_name.get((space, rank), 0)
            _by_name[(space, rank)] = n + 1
        else:
            counts = _by_store.setdefault(space, {})
            n = counts.get(rank, 0)
            counts[rank] = n + 1
    return f"torch_parallel/tree/{n}/"


def launcher_store(timeout: float | None) -> tuple[Any, object]:
    """torchrun's store as a client, or torch's default store once a process group exists.

    Mirrors torch's ``env://``: when the agent hosts the TCPStore
    (``TORCHELASTIC_USE_AGENT_STORE=True``) every rank is a client; otherwise rank 0 serves it
    as a multi-tenant TCPStore, which ``init_process_group`` later shares in this process.
    """
    global _launcher_store
    import torch.distributed as dist
    from torch._C._distributed_c10d import TCPStore

    if dist.is_available() and dist.is_initialized():
        return dist.distributed_c10d._get_default_store(), "default"
    with _lock:
        if _launcher_store is None:
            addr = os.environ.get("MASTER_ADDR")
            if not addr:
                raise ValueError(
                    "under torchrun but MASTER_ADDR is unset: pass store= (or group=) to "
                    "torch_parallel.tree()"
                )
            port = _env_int("MASTER_PORT")
            wait = timedelta(seconds=timeout if timeout is not None else _default_timeout())
            if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
                _launcher_store = TCPStore(addr, port, is_master=False, timeout=wait)
            else:
                _launcher_store = TCPStore(
                    addr,
                    port,
                    is_master=_env_int("RANK") == 0,
                    timeout=wait,
                    wait_for_workers=False,
                    multi_tenant=True,
                    use_libuv=True,
                )
        return _launcher_store, "launcher"


def group_store(group: Any) -> tuple[Any, int, int, str]:
    """The store, rank, size and key space of a tree over a torch ProcessGroup's ranks."""
    import torch.distributed as dist
    from torch._C._distributed_c10d import PrefixStore

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "tree(group=...) needs torch.distributed initialised: call dist.init_process_group(...) first"
        )
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of the group given to tree(group=...)")
    name = getattr(group, "group_name", None) or str(id(group))
    store = PrefixStore(f"torch_parallel/group/{name}/", dist.distributed_c10d._get_default_store())
    return store, rank, dist.get_world_size(group), f"group:{name}"


def make_tree(
    rank: int | None,
    world_size: int | None,
    root: str | None,
    timeout: float | None,
    store: Any,
    group: Any,
) -> _native.Tree:
    """The body of :func:`torch_parallel.tree`."""
    space: object
    if group is not None:
        if store is not None or root is not None:
            raise ValueError("tree(group=...) takes its store from the group: drop store= and root=")
        store, g_rank, g_size, space = group_store(group)
        if rank is not None and rank != g_rank or world_size is not None and world_size != g_size:
            raise ValueError(
                f"tree(group=...): rank={rank}, world_size={world_size} disagree with the "
                f"group's rank {g_rank} of {g_size}: leave them out"
            )
        rank, world_size = g_rank, g_size
    elif store is not None:
        if root is not None:
            raise ValueError("pass store= or root=, not both")
        space = store
    elif root is None and under_torchrun() and "PARALLEL_ROOT" not in os.environ:
        store, space = launcher_store(timeout)
        if space == "default":  # torch.distributed is initialised: its numbering
            import torch.distributed as dist

            rank = dist.get_rank() if rank is None else rank
            world_size = dist.get_world_size() if world_size is None else world_size
        rank = _env_int("RANK") if rank is None else rank
        world_size = _env_int("WORLD_SIZE") if world_size is None else world_size
    else:
        return _native.Tree(rank, world_size, root, timeout)
    if rank is None or world_size is None:
        raise ValueError("a tree over a store needs rank= and world_size= (the store does not assign ranks)")
    prefix = _next_prefix(space, rank)
    return _native.Tree(rank, world_size, None, timeout, store, prefix)

"""Parallel: message passing, collectives and workers for PyTorch tensors.

Client/Server::

    import torch_parallel as parallel
    server = parallel.server("127.0.0.1", 0)
    client = parallel.client("127.0.0.1", server.port)
    client.send("hi")
    assert server.recv_any() == "hi"
    client.close()
    server.close()

Values: None, bool, int (64-bit), float, str, bytes, list, tuple, dict (str/int keys) and
tensors (torch, numpy or any DLPack object, CPU or CUDA), nested freely. Received tensors are
torch tensors when torch is importable, else numpy arrays; CUDA tensors arrive on the same device
index (by CUDA IPC between processes of one host, staged through pinned host memory otherwise;
see docs/cuda.md). Every blocking call takes ``timeout`` (seconds; default
``PARALLEL_TIMEOUT``) and releases the GIL while it waits.
"""

from __future__ import annotations

import atexit
from typing import Any

from . import _logging, _native
from ._errors import CLASSES as _CLASSES
from ._errors import (
    AuthError,
    Cancelled,
    Closed,
    ConfigError,
    Mismatch,
    ParallelError,
    PeerLost,
    ProtocolError,
    ResourceError,
    Timeout,
    Unsupported,
    WorkerError,
)
from ._native import Client, Connection, Handle, Server, Tree, WorkQueue
from ._workers import MapHandle, Pool, map, workqueue

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Cancelled",
    "Client",
    "Closed",
    "ConfigError",
    "Connection",
    "Handle",
    "MapHandle",
    "Mismatch",
    "ParallelError",
    "PeerLost",
    "Pool",
    "ProtocolError",
    "ResourceError",
    "Server",
    "Timeout",
    "Tree",
    "Unsupported",
    "WorkQueue",
    "WorkerError",
    "client",
    "config",
    "cuda_available",
    "cuda_info",
    "io_backend",
    "map",
    "server",
    "tree",
    "wait_stats",
    "workqueue",
]

_native._register_errors(dict(_CLASSES))
# PY-4: no engine thread calls Python once the interpreter is exiting. Done callbacks and
# point-to-point jobs already running (or whose operation already finished) get this long.
_EXIT_WAIT_S = 10.0
atexit.register(_native._close_callbacks, _EXIT_WAIT_S)
_logging.start()


def _tensor_factory() -> Any:
    try:
        from torch.utils.dlpack import from_dlpack

        return from_dlpack
    except ImportError:  # pragma: no cover - torch is a dependency of the tests
        import numpy

        return numpy.from_dlpack


_native._set_tensor_factory(_tensor_factory())


def _cuda_alloc(device: int, nbytes: int, stream: int) -> Any:
    """Device memory for received CUDA tensors, from torch's caching allocator (``cudaFree``
    would synchronize the whole device each time a received tensor is freed). A cached block is
    free only in the order of torch's current stream: the engine's ``stream``, which writes it,
    waits for that stream first."""
    import torch

    with torch.cuda.device(device):
        t = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
        ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
        ready.record()
        torch.cuda.ExternalStream(stream, device=device).wait_event(ready)  # type: ignore[no-untyped-call]
    return t


_native._set_cuda_allocator(_cuda_alloc)


def _register_nvrtc() -> None:
    """Points the engine at libnvrtc from the NVIDIA wheels that torch's CUDA build installs
    (``nvidia/*/lib``), for the GPU reduction kernels; cheap, and nothing is loaded here."""
    import glob
    import importlib.util
    import os

    def major(path: str) -> int:
        tail = os.path.basename(path).rpartition(".so.")[2].split(".")[0]
        return int(tail) if tail.isdigit() else 0

    spec = importlib.util.find_spec("nvidia")
    found = [
        path
        for root in (list(spec.submodule_search_locations or []) if spec else [])
        for path in glob.glob(os.path.join(root, "*", "lib", "libnvrtc.so*"))
        if "builtins" not in os.path.basename(path)
    ]
    for path in sorted(found, key=major, reverse=True):  # the newest NVRTC first
        _native._add_nvrtc_hint(path)


_register_nvrtc()


def server(host: str = "127.0.0.1", port: int = 0, *, allow_pickle: bool = False) -> Server:
    """Listens on ``host:port`` (port 0: an ephemeral port, read it from ``server.port``).

    Binds to loopback unless given another host. IPv4 and IPv6 addresses are accepted.
    ``allow_pickle``: accept values that are not plain data (pickled; only between trusted peers).

    Raises ``ResourceError`` (an ``OSError``) when the address cannot be bound, ``ConfigError``
    for a malformed ``PARALLEL_*`` variable.

    Example::

        server = parallel.server("0.0.0.0", 29400)
        server.wait_for(2, timeout=60)
        for value in (server.recv_any(timeout=10) for _ in range(2)):
            print(value)
    """
    return Server(host, port, allow_pickle)


def client(
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    timeout: float | None = None,
    allow_pickle: bool = False,
) -> Client:
    """Connects to a server, retrying until ``timeout`` (default ``PARALLEL_CONNECT_TIMEOUT``).

    Between processes of one host the link is a shared-memory ring (``client.link == "shm"``);
    otherwise TCP. ``PARALLEL_SHM=0`` keeps every link on TCP.

    Raises ``Timeout`` when no server answered in time, ``AuthError`` when the shared secrets
    (``PARALLEL_SECRET``) differ, ``ConfigError`` for a malformed ``PARALLEL_*`` variable.

    Example::

        with parallel.client("127.0.0.1", 29400, timeout=30) as c:
            c.send({"grad": torch.ones(4)})
            reply = c.recv(timeout=10)
    """
    return Client(host, port, timeout, allow_pickle)


def tree(
    rank: int | None = None,
    world_size: int | None = None,
    root: str | None = None,
    timeout: float | None = None,
    *,
    store: Any = None,
    group: Any = None,
) -> Tree:
    """Joins an allreduce tree of processes.

    With no arguments, rank, world size and how to meet come from the launcher: under torchrun,
    its store (``MASTER_ADDR:MASTER_PORT`` is torchrun's TCPStore: the tree is its client and
    never binds that port; once ``torch.distributed`` is initialised, its default store); else
    ours (PARALLEL_RANK, PARALLEL_WORLD_SIZE, PARALLEL_ROOT), SLURM (SLURM_PROCID, SLURM_NTASKS,
    the first host of SLURM_JOB_NODELIST) or Open MPI / PMI. Without a rank, the root assigns
    ranks in arrival order.

    ``store``: any ``torch.distributed.Store`` (TCPStore, FileStore, HashStore, PrefixStore);
    ``rank`` and ``world_size`` are then required. ``group``: a torch ProcessGroup; rank and size
    come from it, the store is torch's default store under a prefix of that group. Several trees
    over one store never collide, as long as every rank creates them in the same order.

    Ranks may start in any order within ``timeout`` (default PARALLEL_TIMEOUT); a rank that
    never arrives fails the others within it, naming the missing ranks. ``print(tree)`` shows
    the plan: hosts, tree, ring, link kinds.

    The seed's example runs as written::

        tree.all_reduce(grads, lambda a, b: a.add_(b))
    """
    from ._launch import make_tree

    return make_tree(rank, world_size, root, timeout, store, group)


def config() -> dict[str, str]:
    """Every effective ``PARALLEL_*`` value, as text, by name (the secret shows as ``<set>``).

    Raises ``ConfigError`` naming the variable, its value and the accepted form when one is
    malformed. ``python -m torch_parallel info`` prints them with their source.

    Example::

        assert parallel.config()["PARALLEL_IO"] in ("auto", "uring", "epoll")
    """
    return dict(_native.config())


def cuda_available() -> bool:
    """Whether this process can use CUDA (an NVIDIA driver was found and ``PARALLEL_CUDA`` is on).

    Example: ``device = "cuda" if parallel.cuda_available() else "cpu"``
    """
    return bool(_native.cuda_available())


def cuda_info() -> str:
    """The CUDA driver and devices in use, or why there is no CUDA here (for logs and bug reports).

    Example: ``print(parallel.cuda_info())``
    """
    return str(_native.cuda_info())


def io_backend() -> str:
    """The I/O backend in use: ``"io_uring"`` or ``"epoll"`` (``PARALLEL_IO``; ``auto`` falls back
    to epoll where io_uring cannot be set up, and ``python -m torch_parallel info`` says why).

    Raises ``ConfigError`` when ``PARALLEL_IO=uring`` and io_uring cannot be set up here.

    Example: ``print(parallel.io_backend())``
    """
    return str(_native.io_backend())


def wait_stats() -> dict[str, int]:
    """How this process's waits went, counted since it started: ``spins_started``,
    ``spins_paid`` (the awaited message or peer came while the thread spun), ``spins_declined``
    (waits that went straight to a kernel sleep), of which ``spins_declined_busy`` for busy
    cores (more runnable threads than cores) and the rest skipped after recent spins that did
    not pay, and
    ``spins_declined_short`` (skipped waits whose sleep ended within ``PARALLEL_SPIN_US``: a
    spin would have paid, so the thread soon spins again). Each kernel sleep costs a wake-up
    (tens to hundreds of microseconds on a virtual machine), so a run whose waits are mostly
    declined is slow for that reason; ``PARALLEL_SPIN_US`` sets the longest spin (0: never spin).
    ``spins_yielding``: the started spins that gave the CPU away at every step, because this
    process has no CPU to spare beside the waiter (a rank bound to one CPU, or its other
    spinners holding the rest).
    ``spread_moves``: times a waiting thread whose spin did not pay (ran out, or skipped after
    spins that did) moved itself off the CPU the process it waited for last ran on (two ranks
    handing messages back and forth on one CPU while another idles; ``PARALLEL_SPREAD=0`` turns
    the moves off). ``spread_pairs``: times a waiting thread moved onto the CPU of the rank it
    waited for, every core being busy (the Tree's small-message fast path between two ranks:
    their hand-offs then need no compute thread to be preempted; same switch).

    Example: ``s = parallel.wait_stats(); print(s["spins_paid"] / max(1, s["spins_started"]))``
    """
    return {k: int(v) for k, v in _native.wait_stats().items()}


def _register_backend() -> None:
    """Registers the torch.distributed backend "parallel" (see torch_parallel.distributed);
    nothing happens where torch.distributed is not available."""
    try:
        from . import distributed
    except ImportError:  # pragma: no cover - torch without distributed support
        return
    distributed.register()


_register_backend()

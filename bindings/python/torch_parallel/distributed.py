"""The torch.distributed backend ``"parallel"``: c10d operations on a Tree.

``import torch_parallel`` registers it; then::

    dist.init_process_group("parallel")                 # instead of "gloo"
    dist.init_process_group("cpu:parallel,cuda:nccl")   # per device type

Each process group (the default one, and every ``new_group`` / ``split_group`` /
``new_subgroups``) gets its own :class:`~torch_parallel.Tree`, made through the group's store.
Collectives map onto the Tree's (``all_reduce``, ``broadcast``, ``reduce``, ``all_gather``,
``reduce_scatter``, ``all_to_all``, ``barrier``); point-to-point (``send``, ``recv``, receive
from any source) and ``scatter`` ride on the engine's Client and Server, one server per rank,
addresses exchanged through the store. See docs/torch-distributed.md.

Invariants:

- DIST-1: operations run on the Tree in the order the caller issues them (asynchronous ones on
  the Tree's own queue, the others inline behind them), so every rank sees the same order.
- DIST-2: a Work's ``wait`` raises the operation's error; nothing fails silently. Errors are
  ``torch.distributed.DistBackendError`` (a ``RuntimeError``) carrying the engine's message,
  which names the rank at fault; the engine's exception is the ``__cause__``.
- DIST-3: every wait has a deadline: the group's ``timeout`` (``init_process_group(timeout=)``).

Over 600 lines on purpose: torch's ``Backend`` interface is one class whose ~30 methods are
each a few lines mapping a c10d call onto the Tree; splitting it would scatter that mapping.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import Backend as _C10dBackend
from torch._C._distributed_c10d import ReduceOp

from ._errors import ParallelError
from ._native import Client, Connection, Server, Tree
from ._native import Job as _Job
from ._native import Lane as _Lane
from ._native import Work as _NativeWork

__all__ = ["ParallelBackend", "recv_any_source", "register"]

BACKEND_NAME = "parallel"
# The largest working copy reduce_scatter keeps between calls (ParallelBackend._scratch).
_SPARE_MAX = 1 << 30
_T = TypeVar("_T")

_OPS: dict[Any, str] = {
    ReduceOp.SUM: "sum",
    ReduceOp.PRODUCT: "prod",
    ReduceOp.MIN: "min",
    ReduceOp.MAX: "max",
    ReduceOp.AVG: "avg",
    ReduceOp.BAND: "band",
    ReduceOp.BOR: "bor",
    ReduceOp.BXOR: "bxor",
}


def register() -> bool:
    """Registers the backend ``"parallel"`` with torch.distributed (idempotent).

    Returns whether it is registered; False when torch.distributed is not available."""
    if not dist.is_available():
        return False
    if hasattr(dist.Backend, BACKEND_NAME.upper()):
        return True
    dist.Backend.register_backend(BACKEND_NAME, _create_backend, extended_api=True, devices=["cpu", "cuda"])
    return True


def _create_backend(opts: Any, _backend_options: object | None) -> ParallelBackend:
    timeout = float(opts.timeout.total_seconds())
    return ParallelBackend(opts.store, opts.group_rank, opts.group_size, timeout)


# --- Making the Tree -------------------------------------------------------------------------


def _root_host() -> str:
    """The address rank 0 listens on: the launcher's MASTER_ADDR when set (torchrun, env://),
    else this host's address, else loopback."""
    host = os.environ.get("MASTER_ADDR")
    if host:
        return socket.gethostbyname(host)
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def _local_ip_toward(host: str) -> str:
    """The local address of the interface that routes to ``host`` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def _tree_from_store(store: Any, rank: int, size: int, timeout: float) -> Tree:
    """Makes this group's Tree through the group's store (a PrefixStore per group): rank 0
    listens on an OS-assigned port and publishes its addresses under a key of its own in the
    store, the others read them there; no port of the launcher's is ever bound."""
    from . import tree  # the package's own tree(), defined before it imports this module

    return tree(store=store, rank=rank, world_size=size, timeout=timeout)


# --- Work ------------------------------------------------------------------------------------


_Pending = _NativeWork | _Job


class _Work(dist.Work):
    """A c10d Work over a pending operation: ``wait`` raises the operation's error (DIST-2),
    ``get_future`` gives a ``torch.futures.Future`` completed at the same moment (DDP's comm
    hooks chain on it).

    Whoever gets there first completes it (waits for the pending operation, runs ``after``,
    e.g. a copy back into a non-contiguous tensor, and sets the result): the caller's ``wait``
    inline (no thread hand-off on the blocking path), or, once ``get_future`` was asked for,
    a done callback of the pending operation, run by the engine's callback lane (so the future
    completes without anyone waiting, and no thread waits for it)."""

    def __init__(
        self,
        op: str,
        timeout: float,
        pending: _Pending | None = None,
        after: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        self._op = op
        self._timeout = timeout
        self._pending = pending
        self._after = after
        self._claim = threading.Lock()
        self._event = threading.Event()
        self._exc: BaseException | None = None
        self._future: torch.futures.Future[Any] | None = None  # made when asked for
        self._result: Any = None
        self._source: int | None = None

    def _finish(self, result: Any, exc: BaseException | None = None) -> None:
        with _FUTURES:
            self._exc = exc
            self._result = result
            self._pending = self._after = None
            self._event.set()
            future = self._future
        if future is not None:
            _settle_future(future, result, exc)

    def _complete(self, seconds: float) -> bool:
        """Completes the Work if no other thread is doing so; False if one is."""
        if not self._claim.acquire(blocking=False):
            return False
        try:
            if self._event.is_set() or self._pending is None:
                return True
            pending, after = self._pending, self._after
            try:
                pending.wait(seconds)
                result = after() if after is not None else None
            except TimeoutError:
                self._finish(None, self._timeout_error(seconds))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiter
                self._finish(None, _backend_error(self._op, exc))
            else:
                self._finish(result)
            return True
        finally:
            self._claim.release()

    def _complete_now(self) -> None:
        """The pending operation's done callback: completes the Work (its wait returns at once)."""
        self._complete(self._timeout)  # False: the caller's wait is completing it

    def _timeout_error(self, seconds: float) -> BaseException:
        return dist.DistBackendError(
            f"parallel backend: {self._op} did not complete within {seconds:g} s "
            "(the process group's timeout; a rank may not have called it, or be stalled)"
        )

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        seconds = self._timeout
        if timeout is not None and timeout.total_seconds() > 0:
            seconds = timeout.total_seconds()
        if not self._event.is_set():
            self._complete(seconds)
        if not self._event.wait(seconds):
            raise self._timeout_error(seconds)
        if self._exc is not None:
            raise self._exc
        return True

    def is_completed(self) -> bool:
        pending = self._pending
        if not self._event.is_set() and pending is not None and pending.done():
            self._complete(self._timeout)
        return self._event.is_set()

    def is_success(self) -> bool:
        return self.is_completed() and self._exc is None

    def exception(self) -> BaseException | None:
        return self._exc

    def get_future(self) -> torch.futures.Future[Any]:
        with _FUTURES:
            future = self._future
            if future is None:
                future = self._future = torch.futures.Future()
                if self._event.is_set():
                    _settle_future(future, self._result, self._exc)
                elif self._pending is not None:
                    self._pending.add_done_callback(self._complete_now)
        return future

    def source_rank(self) -> int:
        """The group rank a receive got its message from (after ``wait``)."""
        if self._source is None:
            raise RuntimeError(f"parallel backend: {self._op} has no source rank (yet)")
        return self._source


class _DoneWork(dist.Work):
    """The Work of an operation that completed before it was returned (the inline path of a
    caller that waits at once): nothing to wait for or to claim, so it makes no lock or event
    (they were most of the cost of a small collective's Work)."""

    def __init__(self, result: Any) -> None:
        super().__init__()
        self._result = result
        self._future: torch.futures.Future[Any] | None = None

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def exception(self) -> BaseException | None:
        return None

    def get_future(self) -> torch.futures.Future[Any]:
        with _FUTURES:
            if self._future is None:
                self._future = torch.futures.Future()
                self._future.set_result(self._result)
        return self._future


_FUTURES = threading.Lock()  # a Work's future is made once and completed once


def _settle_future(future: torch.futures.Future[Any], result: Any, exc: BaseException | None) -> None:
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


def _backend_error(op: str, exc: BaseException) -> BaseException:
    """The torch-style error for an engine error: DistBackendError with the engine's message
    (it names the rank at fault), the engine's exception as its cause. Other errors (a wrong
    argument) keep their type."""
    if isinstance(exc, ParallelError) and not isinstance(exc, ValueError | TypeError):
        err = dist.DistBackendError(f"parallel backend: {op}: {exc}")
        err.__cause__ = exc
        return err
    return exc


# --- Point-to-point --------------------------------------------------------------------------


class _P2P:
    """Point-to-point messages between the group's ranks over the engine's Client/Server.

    Each rank serves on an OS-assigned port and publishes ``host:port`` in the group's store;
    a sender connects on first use and introduces itself with its rank. Each message is two
    frames: a header ``(tag,)`` then the tensor, received straight into the caller's tensor
    when the tags match; a message for another tag waits in a stash until asked for. Sends run
    in order on one lane of the engine's executor, receives in order on another (no thread of
    their own: a lane holds a worker only while it has a job)."""

    def __init__(self, store: Any, rank: int, size: int, timeout: float, host: str) -> None:
        self.rank = rank
        self.size = size
        self.timeout = timeout
        self._store = store
        self._server = Server(host, 0, False)
        store.set(f"torch_parallel/p2p/{rank}", f"{host}:{self._server.port}")
        self._clients: dict[int, Client] = {}
        self._conns: dict[int, Connection] = {}
        self._known: set[Connection] = set()
        self._stash: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._sender = _Lane()
        self._receiver = _Lane()

    def close(self) -> None:
        for c in self._clients.values():
            c.close()
        self._server.close()

    def send(self, tensor: torch.Tensor, dst: int, tag: str) -> _Job:
        return self._sender.submit(lambda: self._send(tensor, dst, tag))

    def send_each(self, pieces: list[tuple[torch.Tensor, int]], tag: str) -> _Job:
        """Sends each ``(tensor, dst)`` in order, as one job."""

        def run() -> None:
            for tensor, dst in pieces:
                self._send(tensor, dst, tag)

        return self._sender.submit(run)

    def recv(self, out: torch.Tensor, src: int | None, tag: str) -> _Job:
        """The job returns the rank the message came from."""
        return self._receiver.submit(lambda: self._recv(out, src, tag))

    def _send(self, tensor: torch.Tensor, dst: int, tag: str) -> None:
        client = self._clients.get(dst)
        if client is None:
            addr = bytes(self._store.get(f"torch_parallel/p2p/{dst}")).decode()
            host, _, port = addr.rpartition(":")
            client = Client(host, int(port), self.timeout, False)
            client.send(self.rank, self.timeout)
            self._clients[dst] = client
        client.send(tag, self.timeout)
        client.send(tensor if tensor.is_contiguous() else tensor.contiguous(), self.timeout)

    def _identify(self) -> None:
        for conn in self._server.connections():
            if conn not in self._known:
                self._known.add(conn)
                self._conns[int(conn.recv(self.timeout))] = conn

    def _conn_from(self, src: int, deadline: float) -> Connection:
        while src not in self._conns:
            left = deadline - time.monotonic()
            if left <= 0:
                raise dist.DistBackendError(
                    f"parallel backend: recv: rank {src} did not connect to rank {self.rank} "
                    f"within {self.timeout:g} s (did it call send?)"
                )
            self._identify()
            if src not in self._conns:
                time.sleep(0.0005)
        return self._conns[src]

    def _take(self, src: int, tag: str, out: torch.Tensor) -> bool:
        stash = self._stash.get((src, tag))
        if not stash:
            return False
        _fill(out, stash.pop(0), src, tag)
        return True

    def _read(self, conn: Connection, src: int, tag: str, out: torch.Tensor) -> bool:
        """Reads one message from ``conn``: into ``out`` if its tag is ``tag``, else stashed."""
        got = str(conn.recv(self.timeout))
        if got == tag and out.is_contiguous():
            conn.recv(self.timeout, out)
            return True
        t = conn.recv(self.timeout)
        if got == tag:
            _fill(out, t, src, tag)
            return True
        self._stash.setdefault((src, got), []).append(t)
        return False

    def _recv(self, out: torch.Tensor, src: int | None, tag: str) -> int:
        deadline = time.monotonic() + self.timeout
        if src is not None:
            if self._take(src, tag, out):
                return src
            conn = self._conn_from(src, deadline)
            while not self._read(conn, src, tag, out):
                pass
            return src
        while True:  # any source
            for s in range(self.size):
                if self._take(s, tag, out):
                    return s
            left = deadline - time.monotonic()
            if left <= 0:
                raise dist.DistBackendError(
                    f"parallel backend: recv from any source (tag {tag}) on rank {self.rank}: "
                    f"nothing arrived within {self.timeout:g} s"
                )
            value, conn = self._server.recv_any_from(left)
            if conn not in self._known:
                self._known.add(conn)
                self._conns[int(value)] = conn
                continue
            s = next(r for r, c in self._conns.items() if c == conn)
            if self._read_after_header(conn, s, str(value), tag, out):
                return s

    def _read_after_header(self, conn: Connection, src: int, got: str, tag: str, out: torch.Tensor) -> bool:
        t = conn.recv(self.timeout)
        if got == tag:
            _fill(out, t, src, tag)
            return True
        self._stash.setdefault((src, got), []).append(t)
        return False


def _put(out: torch.Tensor, got: torch.Tensor, what: str) -> None:
    """Copies a gathered piece into the caller's output tensor; a dtype or size that differs is
    an error (gloo's too), never a silent cast."""
    if got.dtype != out.dtype or got.numel() != out.numel():
        raise ValueError(
            f"parallel backend: {what}: an output tensor is {out.dtype} x {out.numel()}, the "
            f"input is {got.dtype} x {got.numel()}; they must match"
        )
    out.copy_(got.view(out.shape))


def _fill(out: torch.Tensor, got: torch.Tensor, src: int, tag: str) -> None:
    """Copies a received tensor into the caller's, refusing a dtype or size that differs (a
    cast or a reshape would hide a mismatched send)."""
    if got.dtype != out.dtype or got.numel() != out.numel():
        raise ValueError(
            f"parallel backend: recv: rank {src} sent {got.dtype} x {got.numel()} (tag "
            f"{tag[1:]}), the receiving tensor is {out.dtype} x {out.numel()}"
        )
    out.copy_(got.view(out.shape))


# --- The backend -----------------------------------------------------------------------------


_OPS_BY_VALUE: dict[int, str] = {int(k): v for k, v in _OPS.items()}
_PREMUL_SUM = int(cast(Any, ReduceOp.PREMUL_SUM))


def _op_name(op: Any, what: str) -> tuple[str, Any]:
    """(the Tree's op name, PREMUL_SUM's factor or None) for a c10d ReduceOp (by the value of
    its kind: hashing torch's enum objects cost a microsecond a call)."""
    kind = getattr(op, "op", op)
    value = int(kind)
    if value == _PREMUL_SUM:
        state = op.__getstate__()
        return "sum", state[1]
    name = _OPS_BY_VALUE.get(value)
    if name is None:
        raise ValueError(
            f"parallel backend: {what}: unsupported reduce op {kind}; supported: "
            "SUM, PRODUCT, MIN, MAX, AVG, PREMUL_SUM, BAND, BOR, BXOR"
        )
    return name, None


def _one(tensors: Sequence[_T], what: str) -> _T:
    if len(tensors) != 1:
        raise ValueError(f"parallel backend: {what} takes one tensor per process, got {len(tensors)}")
    return tensors[0]


class ParallelBackend(_C10dBackend):
    """One process group's backend: a Tree for the collectives, a point-to-point endpoint for
    send/recv, no thread of its own (DIST-1..3)."""

    def __init__(self, store: Any, rank: int, size: int, timeout: float) -> None:
        super().__init__(rank, size)
        self._rank = rank
        self._size = size
        self._timeout = timeout
        self._tree = _tree_from_store(store, rank, size, timeout)
        self._p2p = _P2P(store, rank, size, timeout, _local_ip_toward(_root_host()))
        self._seq = 0
        self._options = _C10dBackend.Options(BACKEND_NAME, datetime.timedelta(seconds=timeout))
        # reduce_scatter's working copy of its input, kept between calls (see _scratch).
        self._spare = torch.empty(0, dtype=torch.uint8)
        self._spare_lock = threading.Lock()

    # -- plumbing -------------------------------------------------------------------------

    def getBackendName(self) -> str:  # noqa: N802 - torch's name
        return BACKEND_NAME

    # torch 2.15 reads these as properties of a Python backend; without an override its lookup
    # recurses, so each is spelled out.
    @property
    def supports_splitting(self) -> bool:
        return True

    @property
    def supports_coalescing(self) -> bool:
        return False

    @property
    def supports_shrinking(self) -> bool:
        return False

    @property
    def supports_reconfigure(self) -> bool:
        return False

    @property
    def supports_window(self) -> bool:
        return False

    @property
    def _supports_time_estimate(self) -> bool:
        return False

    @property
    def options(self) -> Any:
        return self._options

    def split(self, store: Any, ranks: list[int], opts: Any) -> ParallelBackend:
        """The backend of a group split from this one (``dist.split_group``): its own Tree,
        made through the new group's store. ``ranks`` are global ranks."""
        me = dist.get_rank()
        timeout = getattr(opts, "_timeout", None)
        seconds = timeout.total_seconds() if timeout else self._timeout
        return ParallelBackend(store, sorted(ranks).index(me), len(ranks), seconds)

    @property
    def tree(self) -> Tree:
        """The Tree under this group (for the direct API: ``tree.all_reduce`` and the rest)."""
        return self._tree

    def _inline(self, op: str, run: Callable[[], Any]) -> dist.Work:
        """Runs ``run`` now (DIST-1: behind the Tree's queued operations) and returns a
        completed Work, or raises the torch-style error."""
        try:
            result = run()
        except TimeoutError as exc:
            err = dist.DistBackendError(
                f"parallel backend: {op} did not complete within {self._timeout:g} s (the process "
                f"group's timeout; a rank may not have called it, or be stalled): {exc}"
            )
            raise err from exc
        except BaseException as exc:
            raise _backend_error(op, exc) from exc
        return _DoneWork(result)

    @staticmethod
    def _sync(opts: Any) -> bool:
        """True when the caller waits at once (``async_op=False``; torch passes it as
        ``opts.asyncOp``, and C++ callers such as DDP's reducer leave it True): the collective
        then runs inline on the caller (behind the Tree's queued operations, DIST-1), which
        saves two thread hand-offs, a completion wait and the Work's machinery."""
        return getattr(opts, "asyncOp", True) is False

    def _later(self, op: str, pending: _Pending, after: Callable[[], Any]) -> _Work:
        return _Work(op, self._timeout, pending, after)

    def _tag(self) -> str:
        self._seq += 1
        return f"c{self._seq}"

    # -- all-reduce family ----------------------------------------------------------------

    def _allreduce(self, tensors: list[torch.Tensor], op: Any, what: str, sync: bool = False) -> dist.Work:
        name, factor = _op_name(op, what)
        if sync and factor is None and len(tensors) == 1 and tensors[0].is_contiguous():
            # The common call (dist.all_reduce of one tensor): in place, nothing to copy back.
            t = tensors[0]
            return self._inline(what, lambda: (self._tree.all_reduce(t, name), tensors)[1])
        # PREMUL_SUM reduces scaled copies: the caller's tensors change only with the result.
        if factor is not None:
            work_on = [(t * factor).contiguous() for t in tensors]
        else:
            work_on = [t if t.is_contiguous() else t.contiguous() for t in tensors]
        value: Any = work_on[0] if len(work_on) == 1 else work_on

        def after() -> list[torch.Tensor]:
            for t, w in zip(tensors, work_on, strict=True):
                if t is not w:
                    t.copy_(w)
            return tensors

        if sync:

            def now() -> list[torch.Tensor]:
                self._tree.all_reduce(value, name)
                return after()

            return self._inline(what, now)
        try:
            pending = self._tree.all_reduce_async(value, name)
        except BaseException as exc:
            raise _backend_error(what, exc) from exc
        return self._later(what, pending, after)

    def allreduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        return self._allreduce(tensors, opts.reduceOp, "allreduce", self._sync(opts))

    def allreduce_coalesced(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        return self._allreduce(tensors, opts.reduceOp, "allreduce_coalesced", self._sync(opts))

    def reduce(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        t = _one(tensors, "reduce")
        name, factor = _op_name(opts.reduceOp, "reduce")
        root = opts.rootRank

        def run() -> list[torch.Tensor]:
            # PREMUL_SUM reduces a scaled copy: a non-root rank's tensor is left as it was.
            if factor is not None:
                work_on = (t * factor).contiguous()
            else:
                work_on = t if t.is_contiguous() else t.contiguous()
            self._tree.reduce(work_on, name, root)
            if work_on is not t and self._rank == root:
                t.copy_(work_on)
            return tensors

        return self._inline("reduce", run)

    def broadcast(self, tensors: list[torch.Tensor], opts: Any) -> dist.Work:
        t = _one(tensors, "broadcast")
        work_on = t if t.is_contiguous() else t.contiguous()

        def after() -> list[torch.Tensor]:
            if work_on is not t:
                t.copy_(work_on)
            return tensors

        if self._sync(opts):

            def now() -> list[torch.Tensor]:
                self._tree.broadcast(work_on, opts.rootRank)
                return after()

            return self._inline("broadcast", now)
        try:
            pending = self._tree.broadcast_async(work_on, opts.rootRank)
        except BaseException as exc:
            raise _backend_error("broadcast", exc) from exc
        return self._later("broadcast", pending, after)

    def barrier(self, opts: Any = None) -> dist.Work:
        if self._sync(opts):

            def now() -> list[torch.Tensor]:
                self._tree.barrier()
                return []

            return self._inline("barrier", now)
        try:
            pending = self._tree.barrier_async()
        except BaseException as exc:
            raise _backend_error("barrier", exc) from exc
        return self._later("barrier", pending, lambda: [])

    def monitored_barrier(self, opts: Any, wait_all_ranks: bool = False) -> None:
        """A barrier whose failure names the ranks that did not arrive (the Tree's errors
        name the rank at fault); bounded by the group's timeout."""
        try:
            self._tree.barrier()
        except BaseException as exc:
            raise _backend_error("monitored_barrier", exc) from exc

    # -- gather family --------------------------------------------------------------------

    def _gather_all(self, t: torch.Tensor) -> list[torch.Tensor]:
        return list(self._tree.all_gather(t if t.is_contiguous() else t.contiguous()))

    def allgather(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        def run() -> list[list[torch.Tensor]]:
            for out, t in zip(outputs, inputs, strict=True):
                if len(out) == self._size and all(o.dtype == t.dtype and o.numel() == t.numel() for o in out):
                    # Every piece the input's size (as c10d requires): gathered like
                    # all_gather_into_tensor, then handed out.
                    flat = torch.empty(self._size * t.numel(), dtype=t.dtype, device=t.device)
                    self._gather_into(flat, t)
                    for i, o in enumerate(out):
                        o.copy_(flat[i * t.numel() : (i + 1) * t.numel()].view(o.shape))
                    continue
                for o, g in zip(out, self._gather_all(t), strict=True):
                    _put(o, g, "all_gather")
            return outputs

        return self._inline("allgather", run)

    def allgather_coalesced(
        self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        return self.allgather(outputs, inputs, opts)

    def all_gather_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> dist.Work:
        def run() -> list[torch.Tensor]:
            self._gather_into(output, input)
            return [output]

        return self._inline("all_gather_into_tensor", run)

    def _gather_into(self, output: torch.Tensor, input: torch.Tensor) -> None:
        if output.numel() != input.numel() * self._size:
            raise ValueError(
                f"parallel backend: all_gather_into_tensor: output has {output.numel()} "
                f"elements, expected world_size x input = {self._size} x {input.numel()}"
            )
        # (A non-contiguous output is filled through a flat buffer: empty_like would keep its
        # strides, and a transposed one has no flat view.)
        flat = (
            output.view(-1)
            if output.is_contiguous()
            else torch.empty(output.numel(), dtype=output.dtype, device=output.device)
        )
        n = input.numel()
        if output.is_cuda or input.is_cuda or output.dtype != input.dtype:
            # Through the Tree's all_gather, whose pieces carry their dtype (a mismatch raises).
            for i, g in enumerate(self._gather_all(input)):
                flat[i * n : (i + 1) * n].copy_(g.reshape(-1))
        elif self._tree.ring_for(flat.numel() * flat.element_size()):
            # The ring's all-gather (half the bytes of an all-reduce); the native call copies
            # the input into this rank's part first (it may be that part, as FSDP passes it).
            # Its meta carries the dtype and size: ranks whose inputs differ fail with a Mismatch.
            self._tree.all_gather_into(flat, input)
        else:
            # Below the ring's threshold: each rank's slot holds its input, the others zeros,
            # and a bitwise-or all-reduce of the bytes (the flat region's one round) leaves every
            # slot's bits exactly (signed zeros, NaN payloads). The key carries the dtype and
            # size, so ranks whose inputs differ fail with a Mismatch instead of reading each
            # other's bytes as their own dtype.
            # FSDP gathers in place: its input is this rank's slot of the output. Any other
            # overlap with the output is copied out first, before the other slots are zeroed.
            mine = flat[self._rank * n : (self._rank + 1) * n]
            src = input.reshape(-1)
            if src.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr() and not (
                src.data_ptr() == mine.data_ptr() and src.is_contiguous()
            ):
                src = src.clone()
            flat[: self._rank * n].zero_()
            flat[(self._rank + 1) * n :].zero_()
            mine.copy_(src)
            self._tree.all_reduce(
                {f"all_gather_into_tensor {input.dtype} x {n}": flat.view(torch.uint8)}, "bor"
            )
        if not output.is_contiguous():
            output.copy_(flat.view(output.shape))

    def all_gather_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        def run() -> list[torch.Tensor]:
            for o, i in zip(outputs, inputs, strict=True):
                self._gather_into(o, i)
            return outputs

        return self._inline("allgather_into_tensor_coalesced", run)

    def gather(self, outputs: list[list[torch.Tensor]], inputs: list[torch.Tensor], opts: Any) -> dist.Work:
        t = _one(inputs, "gather")
        root = opts.rootRank

        def run() -> list[list[torch.Tensor]]:
            pieces = self._gather_all(t)
            if self._rank == root:
                for o, g in zip(_one(outputs, "gather"), pieces, strict=True):
                    _put(o, g, "gather")
            return outputs

        return self._inline("gather", run)

    # -- scatter family -------------------------------------------------------------------

    def scatter(self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any) -> dist.Work:
        out = _one(outputs, "scatter")
        root = opts.rootRank
        tag = self._tag()
        if self._rank == root:
            pieces = _one(inputs, "scatter")
            sends = [(p, r) for r, p in enumerate(pieces) if r != self._rank]
            out.copy_(pieces[self._rank])
            return self._later("scatter", self._p2p.send_each(sends, tag), lambda: outputs)
        return self._later("scatter", self._p2p.recv(out, root, tag), lambda: outputs)

    @contextlib.contextmanager
    def _scratch(self, numel: int, dtype: torch.dtype, device: torch.device) -> Iterator[torch.Tensor]:
        """An uninitialised tensor of ``numel`` elements, as ``world_size`` contiguous rows:
        reduce_scatter's working copy (the Tree reduces in place, and c10d leaves the input as
        it was). In host memory it is kept from one call to the next: a fresh 64 MiB tensor costs
        its page faults on every call (~20 ms of a 64 MiB reduce_scatter_tensor here). Fresh
        memory instead for CUDA tensors, above _SPARE_MAX bytes (kept, it would pin that much),
        and while another call holds the kept one."""
        nbytes = numel * dtype.itemsize
        if device.type != "cpu" or nbytes > _SPARE_MAX or not self._spare_lock.acquire(blocking=False):
            yield torch.empty((self._size, numel // self._size), dtype=dtype, device=device)
            return
        try:
            if self._spare.numel() < nbytes:
                self._spare = torch.empty(nbytes, dtype=torch.uint8)
            yield self._spare[:nbytes].view(dtype).view(self._size, -1)
        finally:
            self._spare_lock.release()

    def _reduce_scatter_rows(self, rows: torch.Tensor, op: Any, what: str) -> torch.Tensor:
        """Reduces ``rows`` (world_size rows, a copy of this backend's own) across ranks in place,
        by the ring's reduce-scatter where the size takes the ring, and returns this rank's row.
        (``Tree.reduce_scatter`` would copy them once more, to leave its input as it was.)"""
        name, factor = _op_name(op, what)
        if factor is not None:
            rows = rows * factor
        return self._tree.reduce_scatter_in_place(rows, name).view(-1)  # type: ignore[no-any-return]

    def reduce_scatter(
        self, outputs: list[torch.Tensor], inputs: list[list[torch.Tensor]], opts: Any
    ) -> dist.Work:
        out = _one(outputs, "reduce_scatter")
        pieces = _one(inputs, "reduce_scatter")

        def run() -> list[torch.Tensor]:
            if any(p.numel() != out.numel() for p in pieces) or len(pieces) != self._size:
                raise ValueError(
                    "parallel backend: reduce_scatter: expected world_size "
                    f"({self._size}) inputs of the output's size ({out.numel()}), got "
                    f"{[p.numel() for p in pieces]}"
                )
            with self._scratch(self._size * out.numel(), out.dtype, out.device) as rows:
                for row, p in zip(rows, pieces, strict=True):
                    row.copy_(p.reshape(-1))
                mine = self._reduce_scatter_rows(rows, opts.reduceOp, "reduce_scatter")
                out.copy_(mine.view(out.shape))
            return outputs

        return self._inline("reduce_scatter", run)

    def _reduce_scatter_into(self, output: torch.Tensor, input: torch.Tensor, op: Any, what: str) -> None:
        if input.numel() != output.numel() * self._size:
            raise ValueError(
                f"parallel backend: {what}: input has {input.numel()} elements, expected "
                f"world_size x output = {self._size} x {output.numel()}"
            )
        # The Tree reduces in place; c10d leaves the input as it was: a working copy.
        with self._scratch(input.numel(), input.dtype, input.device) as rows:
            rows.copy_(input.reshape(rows.shape))
            mine = self._reduce_scatter_rows(rows, op, what)
            output.copy_(mine.view(output.shape))

    def reduce_scatter_single(self, output: torch.Tensor, input: torch.Tensor, opts: Any) -> dist.Work:
        def run() -> list[torch.Tensor]:
            self._reduce_scatter_into(output, input, opts.reduceOp, "reduce_scatter_tensor")
            return [output]

        return self._inline("reduce_scatter_tensor", run)

    def reduce_scatter_single_coalesced(
        self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any
    ) -> dist.Work:
        def run() -> list[torch.Tensor]:
            for o, i in zip(outputs, inputs, strict=True):
                self._reduce_scatter_into(o, i, opts.reduceOp, "reduce_scatter_tensor_coalesced")
            return outputs

        return self._inline("reduce_scatter_tensor_coalesced", run)

    # -- all-to-all -----------------------------------------------------------------------

    def _all_to_all(
        self, outs: list[torch.Tensor], ins: list[torch.Tensor], what: str, result: Any, sync: bool = False
    ) -> dist.Work:
        """The Tree's pairwise all-to-all into ``outs``, on the Tree's queue (each output exactly
        its sender's size: a mismatch on every rank otherwise; non-contiguous outputs are filled
        in place)."""
        if len(outs) != self._size or len(ins) != self._size:
            raise ValueError(
                f"parallel backend: {what}: expected {self._size} input and output pieces, "
                f"got {len(ins)} and {len(outs)}"
            )
        if sync:

            def now() -> Any:
                self._tree.all_to_all(ins, outs)
                return result

            return self._inline(what, now)
        try:
            pending = self._tree.all_to_all_async(ins, outs)
        except BaseException as exc:
            raise _backend_error(what, exc) from exc
        return self._later(what, pending, lambda: result)

    def alltoall(self, outputs: list[torch.Tensor], inputs: list[torch.Tensor], opts: Any) -> dist.Work:
        return self._all_to_all(outputs, inputs, "alltoall", outputs, self._sync(opts))

    def all_to_all_single(
        self,
        output: torch.Tensor,
        input: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        opts: Any,
    ) -> dist.Work:
        def split(t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
            if not sizes:
                if t.shape[0] % self._size:
                    raise ValueError(
                        f"parallel backend: all_to_all_single: dimension 0 ({t.shape[0]}) is "
                        f"not divisible by world_size ({self._size}); pass split sizes"
                    )
                sizes = [t.shape[0] // self._size] * self._size
            if len(sizes) != self._size or sum(sizes) != t.shape[0]:
                raise ValueError(
                    f"parallel backend: all_to_all_single: split sizes {sizes} do not cover "
                    f"dimension 0 ({t.shape[0]}) in {self._size} pieces"
                )
            return list(torch.split(t, sizes))

        outs = split(output, list(output_splits))
        ins = split(input, list(input_splits))
        return self._all_to_all(outs, ins, "all_to_all_single", [output], self._sync(opts))

    # -- point-to-point -------------------------------------------------------------------

    def send(self, tensors: list[torch.Tensor], dst: int, tag: int) -> dist.Work:
        t = _one(tensors, "send")
        return self._later("send", self._p2p.send(t, dst, f"u{tag}"), lambda: tensors)

    def recv(self, tensors: list[torch.Tensor], src: int, tag: int) -> dist.Work:
        t = _one(tensors, "recv")
        return self._later("recv", self._p2p.recv(t, src, f"u{tag}"), lambda: tensors)

    def recv_anysource(self, tensors: list[torch.Tensor], tag: int) -> dist.Work:
        t = _one(tensors, "recv")
        pending = self._p2p.recv(t, None, f"u{tag}")
        work: _Work

        def after() -> list[torch.Tensor]:
            work._source = int(pending.wait(0))
            return tensors

        work = self._later("recv", pending, after)
        return work

    def shutdown(self) -> None:
        self._p2p.close()


def recv_any_source(tensor: torch.Tensor, group: dist.ProcessGroup | None = None, tag: int = 0) -> int:
    """Receives ``tensor`` from whichever rank of ``group`` sends first; returns its global rank.

    ``dist.recv(tensor)`` without ``src`` receives too, but torch 2.15 cannot ask a backend
    written in Python for the source rank (its Work wrapper does not forward
    ``_source_rank``), so it raises after the message has arrived; use this instead."""
    pg = group if group is not None else dist.group.WORLD
    assert pg is not None, "the default process group is not initialized"
    backend = pg._get_backend(tensor.device)
    if not isinstance(backend, ParallelBackend):
        raise TypeError(
            f"recv_any_source: the group's backend for {tensor.device} is "
            f"{type(backend).__name__}, not the {BACKEND_NAME!r} backend"
        )
    work = backend.recv_anysource([tensor], tag)
    work.wait()
    return int(dist.get_global_rank(pg, work.source_rank()))

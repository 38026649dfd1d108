"""Workers: ``map`` (n workers, joined in order), ``Pool`` (many small jobs) and ``workqueue``.

``map`` runs ``fn(*args, worker_index)`` (index from 0) on n threads, or, with
``processes=True``, in n fresh interpreters (``python -c``: the original's "totally clean
environment"; the parent's ``sys.path`` is passed on, and its main script is imported as
``__mp_main__`` only when ``fn`` is defined there, as multiprocessing does). Process workers
get ``fn`` and ``args`` through a work queue (tensors through shared memory, other values
pickled) and send their results back the same way: a returned tensor is copied once into the
queue's shared arena and the parent's tensor views it; its data is never pickled.

Invariants:
- PYMAP-1: ``join`` returns the n results in worker order.
- PYMAP-2: an exception in a worker is raised by ``join`` with its original type, after every
  worker finished; a note names the worker (and, for a process, carries its traceback). A process
  that dies without answering (killed, ``os._exit``) is a ``WorkerError`` naming its exit code.
- PYMAP-3: ``join`` has a deadline (``timeout``, default ``PARALLEL_TIMEOUT``); a timed-out join
  can be called again; a joined map is spent (``Closed``).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import pickle
import runpy
import subprocess
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterable
from typing import Any

from . import _native
from ._errors import Closed, Timeout, WorkerError

_POLL = 0.2  # seconds between liveness checks of worker processes while waiting


def workqueue(
    name: str | None = None,
    *,
    allow_pickle: bool = False,
    timeout: float | None = None,
) -> _native.WorkQueue:
    """Creates the work queue ``name`` or opens it (from any thread or process of this host).

    The thread that creates it is its owner: its ``write`` sends questions and its ``read``
    returns answers; every other thread (and every other process) reads questions and writes
    answers. ``name=None`` makes an anonymous queue (share the object itself).
    """
    return _native.WorkQueue(name, allow_pickle, timeout)


def _deadline(timeout: float | None) -> float:
    if timeout is None:
        timeout = float(_native.config()["PARALLEL_TIMEOUT"])
    return time.monotonic() + timeout


def _note(e: BaseException, text: str) -> BaseException:
    if hasattr(e, "add_note"):
        e.add_note(text)
    return e


def _raise_first(errors: dict[int, BaseException], n: int) -> None:
    if not errors:
        return
    i = min(errors)
    e = errors[i]
    if len(errors) > 1:
        others = ", ".join(str(k) for k in sorted(errors) if k != i)
        _note(e, f"(workers {others} failed too)")
    raise e


class MapHandle:
    """The handle of a running ``map``: ``join()``, ``done()``."""

    def __init__(self, n: int, fn: Callable[..., Any], args: tuple[Any, ...], processes: bool):
        if n < 0:
            raise ValueError(f"map needs n >= 0 workers, not {n}")
        self.n = n
        self.processes = processes
        self._results: dict[int, Any] = {}
        self._errors: dict[int, BaseException] = {}
        self._joined = False
        self._threads: list[threading.Thread] = []
        self._procs: list[Any] = []
        self._queue: _native.WorkQueue | None = None
        if processes:
            self._start_processes(fn, args)
        else:
            self._start_threads(fn, args)

    # -- threads --------------------------------------------------------------------------------

    def _start_threads(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        def run(i: int) -> None:
            try:
                self._results[i] = fn(*args, i)
            except BaseException as e:  # noqa: BLE001 - every failure goes back to join()
                self._errors[i] = _note(e, f"raised in parallel.map worker {i} of {self.n} (thread)")

        for i in range(self.n):
            t = threading.Thread(target=run, args=(i,), name=f"parallel-map-{i}", daemon=True)
            self._threads.append(t)
            t.start()

    # -- processes ------------------------------------------------------------------------------

    def _start_processes(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        q = _native.WorkQueue(None, True, None, False)
        self._queue = q
        if self.n:
            q.write(*[("job", fn, args)] * self.n)
        main = ""
        if getattr(fn, "__module__", None) == "__main__":
            main = getattr(sys.modules["__main__"], "__file__", None) or ""
        for i in range(self.n):
            self._procs.append(_spawn("_process_main", q.name, str(i), main))

    def _collect(self, deadline: float) -> None:
        q = self._queue
        assert q is not None
        while len(self._results) + len(self._errors) < self.n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout()
            try:
                answer = q.read(timeout=min(_POLL, left))
            except (Timeout, WorkerError):
                # WorkerError: a worker process died holding its job (the queue reports it
                # once); _check_dead names it with its index and exit code.
                self._check_dead()
                continue
            self._take(answer)

    def _take(self, answer: Any) -> None:
        kind, i = answer[0], answer[1]
        pid = self._procs[i].pid if 0 <= i < len(self._procs) else None
        if kind == "ok":
            self._results[i] = answer[2]
            return
        payload, tb, tname, msg = answer[2:]
        where = f"raised in parallel.map worker {i} of {self.n} (process {pid}); its traceback:\n{tb}"
        try:
            e = pickle.loads(payload) if payload is not None else None
        except Exception:  # noqa: BLE001 - an exception that cannot be rebuilt here
            e = None
        if not isinstance(e, BaseException):
            e = WorkerError(f"map worker {i} (process {pid}) raised {tname}: {msg}\n{tb}")
        self._errors[i] = _note(e, where)

    def _check_dead(self) -> None:
        for i, p in enumerate(self._procs):
            if i in self._results or i in self._errors or p.poll() is None:
                continue
            # It exited; its answer may still be in flight: one more look before declaring it dead.
            try:
                assert self._queue is not None
                self._take(self._queue.read(timeout=_POLL))
                continue
            except (Timeout, WorkerError):
                pass
            code = p.returncode
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            self._errors[i] = WorkerError(
                f"map worker {i} of {self.n} (process {p.pid}) {how} without returning a result"
            )

    # -- common ---------------------------------------------------------------------------------

    def _timeout(self) -> Timeout:
        left = self.n - len(self._results) - len(self._errors)
        if not self.processes:
            left = sum(t.is_alive() for t in self._threads)
        return Timeout(
            f"join: {left} of {self.n} map workers still running "
            "(pass a longer timeout, or raise PARALLEL_TIMEOUT)"
        )

    def done(self) -> bool:
        """True when every worker finished (successfully or not)."""
        if self.processes:
            return all(p.poll() is not None for p in self._procs)
        return not any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> list[Any]:
        """Waits for every worker and returns their results in worker order (PYMAP-1..3)."""
        if self._joined:
            raise Closed("join: this map was already joined")
        deadline = _deadline(timeout)
        if self.processes:
            self._collect(deadline)
            for p in self._procs:
                try:
                    p.wait(max(0.0, min(5.0, deadline - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass  # it answered; let it finish its exit in the background
            if self._queue is not None:
                self._queue.close()
        else:
            for t in self._threads:
                t.join(max(0.0, deadline - time.monotonic()))
                if t.is_alive():
                    raise self._timeout()
        self._joined = True
        _raise_first(self._errors, self.n)
        return [self._results[i] for i in range(self.n)]

    def __repr__(self) -> str:
        kind = "processes" if self.processes else "threads"
        return f"<MapHandle {self.n} {kind}{', done' if self.done() else ''}>"


def _spawn(entry: str, *args: str) -> subprocess.Popen[bytes]:
    """Starts ``torch_parallel._workers.<entry>(*args)`` in a fresh interpreter."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    code = f"import sys; from torch_parallel._workers import {entry}; {entry}(*sys.argv[1:])"
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env)


def _import_main(path: str) -> None:
    """Makes the parent's main script importable as ``__main__`` (for functions defined there)."""
    if not path:
        return
    mod = types.ModuleType("__mp_main__")
    mod.__dict__.update(runpy.run_path(path, run_name="__mp_main__"))
    sys.modules["__main__"] = sys.modules["__mp_main__"] = mod


def _process_main(queue_name: str, index_text: str, main: str) -> None:
    """Body of a map worker process: take the job, run it, send the result (or the failure)."""
    index = int(index_text)
    _import_main(main)
    q = _native.WorkQueue(queue_name, True)
    _kind, fn, args = q.read()
    try:
        q.write(("ok", index, fn(*args, index)))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent
        tb = traceback.format_exc()
        try:
            payload: bytes | None = pickle.dumps(e)
        except Exception:  # noqa: BLE001 - unpicklable exceptions travel as text
            payload = None
        q.write(("err", index, payload, tb, type(e).__qualname__, str(e)))
    q.close()


def map(n: int, fn: Callable[..., Any], *args: Any, processes: bool = False) -> MapHandle:  # noqa: A001
    """Starts n workers running ``fn(*args, worker_index)``; ``.join()`` returns their results.

    ``t1, t2, t3 = parallel.map(3, load, names).join()`` loads three files at once. Threads by
    default (torch and this engine release the GIL); ``processes=True`` runs each worker in a
    clean interpreter (``fn`` must be importable, as for multiprocessing).
    """
    return MapHandle(n, fn, args, processes)


# ----------------------------------------------------------------------------------------------
# Pool


class _Progress:
    """Prints ``done/total`` with rate and ETA to stderr, at most twice a second."""

    def __init__(self, total: int, report: bool | Callable[[int, int], None]):
        self.total, self.report = total, report
        self.start = self.last = time.monotonic()
        self.done = 0

    def step(self) -> None:
        self.done += 1
        if callable(self.report):
            self.report(self.done, self.total)
            return
        now = time.monotonic()
        if self.report and (now - self.last >= 0.5 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            end = "\n" if self.done == self.total else ""
            sys.stderr.write(f"\r[parallel] {self.done}/{self.total} ({rate:.1f}/s, eta {eta:.0f}s){end}")
            sys.stderr.flush()


class Pool:
    """A ``concurrent.futures``-style pool: ``submit(fn, *args)`` returns a Future, ``map``
    returns results in order (with optional progress). Threads by default; ``processes=True``
    runs jobs in clean interpreters fed through a work queue (tensors via shared memory)."""

    def __init__(self, workers: int | None = None, *, processes: bool = False):
        self.workers = workers or os.cpu_count() or 1
        self.processes = processes
        self._ids = itertools.count()
        self._closed = False
        self._threads: concurrent.futures.ThreadPoolExecutor | None = None
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._lock = threading.Lock()
        if not processes:
            self._threads = concurrent.futures.ThreadPoolExecutor(
                self.workers, thread_name_prefix="parallel-pool"
            )
            return
        self._queue = _native.WorkQueue(None, True, None, False)
        self._map = map(self.workers, _pool_process_main, self._queue.name, processes=True)
        self._collector = threading.Thread(target=self._collect, name="parallel-pool-collector", daemon=True)
        self._collector.start()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Queues ``fn(*args, **kwargs)``; its result or exception comes back through the Future."""
        if self._closed:
            raise Closed("submit: the pool is shut down")
        if self._threads is not None:
            return self._threads.submit(fn, *args, **kwargs)
        job = next(self._ids)
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            self._futures[job] = fut
        self._queue.write((job, fn, args, kwargs))
        return fut

    def map(
        self,
        fn: Callable[..., Any],
        items: Iterable[Any],
        *,
        timeout: float | None = None,
        progress: bool | Callable[[int, int], None] = False,
    ) -> list[Any]:
        """``[fn(x) for x in items]`` on the pool, in item order. ``progress=True`` prints
        ``done/total`` to stderr; a callable is called as ``progress(done, total)``."""
        futs = [self.submit(fn, x) for x in items]
        report = _Progress(len(futs), progress)
        deadline = _deadline(timeout)
        pending = set(futs)
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise Timeout(f"Pool.map: {len(pending)} of {len(futs)} jobs unfinished")
            done, pending = concurrent.futures.wait(
                pending, timeout=min(left, 0.5), return_when=concurrent.futures.FIRST_COMPLETED
            )
            for _ in done:
                report.step()
        return [f.result() for f in futs]

    def _collect(self) -> None:
        while True:
            try:
                answer = self._queue.read(timeout=_POLL)
            except (Timeout, WorkerError):
                # WorkerError: a worker process died holding a job (reported once by the queue).
                if self._map.done():
                    self._fail_pending("every pool worker process exited")
                    return
                continue
            except Closed:
                return
            job, ok = answer[0], answer[1]
            with self._lock:
                fut = self._futures.pop(job, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(answer[2])
            else:
                payload, tb, tname, msg = answer[2:]
                try:
                    e = pickle.loads(payload) if payload is not None else None
                except Exception:  # noqa: BLE001
                    e = None
                if not isinstance(e, BaseException):
                    e = WorkerError(f"pool job raised {tname}: {msg}")
                fut.set_exception(_note(e, f"raised in a parallel.Pool worker process; its traceback:\n{tb}"))

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            futs, self._futures = self._futures, {}
        for f in futs.values():
            f.set_exception(WorkerError(f"pool job lost: {why}"))

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """No more jobs; with ``wait``, finishes the queued ones and stops the workers."""
        if self._closed:
            return
        self._closed = True
        if self._threads is not None:
            self._threads.shutdown(wait=wait)
            return
        self._queue.close()
        if wait:
            self._map.join(timeout)
            self._collector.join(timeout if timeout is not None else 30)

    close = shutdown

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.shutdown()


def _pool_process_main(queue_name: str, _index: int) -> None:
    """Body of a pool worker process: run jobs until the pool's queue ends."""
    q = _native.WorkQueue(queue_name, True)
    for job, fn, args, kwargs in q:
        try:
            q.write((job, True, fn(*args, **kwargs)))
        except BaseException as e:  # noqa: BLE001 - every failure goes back to its Future
            tb = traceback.format_exc()
            try:
                payload: bytes | None = pickle.dumps(e)
            except Exception:  # noqa: BLE001
                payload = None
            q.write((job, False, payload, tb, type(e).__qualname__, str(e)))
    q.close()

"""The engine's log records in Python's ``logging`` (``PARALLEL_LOG``).

With ``PARALLEL_LOG`` set (``info``, ``debug``, ``parallel_collectives=debug,warn``: tracing's
EnvFilter syntax), the engine writes each record to stderr and queues it for Python; a daemon
thread started here takes queued records (waiting in native code with the GIL released) and logs
them on the ``torch_parallel`` logger's children (``torch_parallel.parallel_collectives.tree``,
...), so an application's handlers see them. The ``torch_parallel`` logger has a
``NullHandler``, as libraries should, and is set to let every record the filter passed through
unless the application set a level on it. Records still queued at exit are delivered by an
``atexit`` hook.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading

from . import _native

logger = logging.getLogger("torch_parallel")
logger.addHandler(logging.NullHandler())
logging.addLevelName(5, "TRACE")

_lock = threading.Lock()
_stop = threading.Event()


def _emit(records: list[tuple[int, str, str]]) -> None:
    for level, module, message in records:
        logging.getLogger(f"torch_parallel.{module}").log(level, "%s", message)


def flush() -> None:
    """Delivers every record queued so far to the ``torch_parallel`` loggers, now."""
    with _lock:
        _emit(_native._log_next(0.0))


def _pump() -> None:
    while not _stop.is_set():
        records = _native._log_next(0.2)
        if records:
            with _lock:
                _emit(records)


def _at_exit(thread: threading.Thread) -> None:
    _stop.set()
    thread.join(timeout=1.0)
    flush()


def start() -> None:
    """Starts delivering records when ``PARALLEL_LOG`` is set (called once, at import)."""
    if not os.environ.get("PARALLEL_LOG", "").strip():
        return
    if logger.level == logging.NOTSET:
        logger.setLevel(1)  # the engine's filter already chose what to log
    thread = threading.Thread(target=_pump, name="torch_parallel-log", daemon=True)
    thread.start()
    atexit.register(_at_exit, thread)

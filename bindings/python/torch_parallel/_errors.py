"""Exception classes of torch_parallel.

Every engine error kind maps to exactly one class; each also subclasses the built-in exception
users already catch (TimeoutError, ConnectionError, ValueError, TypeError, OSError).
Instances carry ``.kind``, ``.peer`` (the peer's address and pid, or None) and ``.op``.
"""

from __future__ import annotations


class ParallelError(Exception):
    """Base class of every torch_parallel error."""

    kind: str = "error"
    peer: str | None = None
    op: str | None = None


class Timeout(ParallelError, TimeoutError):
    """A deadline passed (the message names what was awaited and the knob to turn)."""


class PeerLost(ParallelError, ConnectionError):
    """The peer disappeared: process killed, connection reset, EOF without a close."""


class Closed(ParallelError, ConnectionError):
    """The endpoint was closed, locally or by the peer in an orderly way."""


class ProtocolError(ParallelError, ConnectionError):
    """The peer sent bytes that are not a valid Parallel frame, or exceeded our limits."""


class AuthError(ParallelError, ConnectionError):
    """Authentication failed: PARALLEL_SECRET differs or is missing on one end."""


class Mismatch(ParallelError, ValueError):
    """Data does not match what the caller expected (dtype, shape, count of out tensors)."""


class Unsupported(ParallelError, TypeError):
    """A value cannot be sent (type, int beyond 64 bits, nesting too deep)."""


class ConfigError(ParallelError, ValueError):
    """A malformed PARALLEL_* variable or argument."""


class ResourceError(ParallelError, OSError):
    """The operating system refused a resource (sockets, memory, descriptors)."""


class Cancelled(ParallelError):
    """The operation was cancelled."""


class WorkerError(ParallelError, RuntimeError):
    """A worker (a map thread or process, a pool job) failed: it raised, panicked or died."""


CLASSES: dict[str, type[ParallelError]] = {
    "timeout": Timeout,
    "peer_lost": PeerLost,
    "closed": Closed,
    "protocol": ProtocolError,
    "auth": AuthError,
    "mismatch": Mismatch,
    "unsupported": Unsupported,
    "config": ConfigError,
    "resource": ResourceError,
    "cancelled": Cancelled,
    "worker": WorkerError,
}

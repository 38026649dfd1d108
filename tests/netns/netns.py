"""A simulated multi-host network on one machine, from Linux network namespaces (stdlib only).

``Network(h)`` creates h "hosts", namespaces ``parallel_h0-TAG`` .. ``parallel_h{h-1}-TAG``, each
with one veth (``eth0``, address ``198.18.0.{i+1}/24``, the RFC 2544 benchmarking range) into a
bridge ``br0`` that lives in its own namespace ``parallel_sw-TAG``. Loopback is up everywhere.
There is no default route and nothing is attached to the caller's namespace, so traffic stays
inside. With ``rate`` (a tc rate such as ``"1gbit"``), every host link is shaped in both
directions with ``tc tbf`` (egress of the host's eth0 and egress of the bridge port towards it),
as research/peer-baselines/netns_setup.sh does. TAG defaults to "PID-K" (this process's pid and a
per-process counter), so neither concurrent runs nor two Networks of one process collide;
namespaces of this family left by a run whose process is gone are removed when a new
``Network`` is set up.

Processes run in a host with ``run_in(i, argv, env)`` (``ip netns exec``). The Network keeps
them and, on ``close()`` / ``__exit__`` / interpreter exit, kills any still running (and any
other process still inside its namespaces), then deletes the namespaces (which deletes the veths
and the bridge).

When namespaces cannot be made here (not root, no ``ip``, EPERM in a container, no tbf), the
constructor raises ``NetnsUnavailable`` with the reason; tests turn it into ``pytest.skip``.
Every subprocess this module runs has a timeout.

    with Network(4, rate="1gbit") as net:
        p = net.run_in(0, [sys.executable, "worker.py"], env)
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

PREFIX = "parallel_"
SUBNET = "198.18.0"
IFNAME = "eth0"  # the host side of each link, as in the baseline scripts (GLOO_SOCKET_IFNAME=eth0)
CMD_TIMEOUT = 15.0  # seconds, for every ip / tc call
_instances = itertools.count()
_LEFTOVER = re.compile(rf"^{PREFIX}(?:h\d+|sw)-(\d+)(?:-\w+)?$")


class NetnsUnavailable(RuntimeError):
    """Network namespaces (or the requested shaping) cannot be set up on this machine."""


class NetnsError(RuntimeError):
    """A namespace command failed after the network was known to be possible."""


def _run(
    argv: Sequence[str], timeout: float = CMD_TIMEOUT, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as e:
        raise NetnsError(f"{' '.join(argv)} did not finish in {timeout}s") from e
    if check and r.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def list_namespaces() -> list[str]:
    """Names of the named network namespaces (``ip netns list``)."""
    r = _run(["ip", "netns", "list"], check=False)
    if r.returncode != 0:
        return []
    return [line.split()[0] for line in r.stdout.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ns_pids(name: str) -> list[int]:
    r = _run(["ip", "netns", "pids", name], check=False, timeout=5)
    return [int(x) for x in r.stdout.split() if x.isdigit()] if r.returncode == 0 else []


def remove_leftovers() -> list[str]:
    """Deletes namespaces of this family whose creating process (the pid in the name) is gone."""
    removed = []
    for ns in list_namespaces():
        m = _LEFTOVER.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            if _run(["ip", "netns", "del", ns], check=False).returncode == 0:
                removed.append(ns)
    return removed


def check_available() -> None:
    """Raises NetnsUnavailable when this process cannot create network namespaces."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        raise NetnsUnavailable("network namespaces need root (ip netns add); not running as root")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("the `ip` binary (iproute2) is not installed")


def _teardown(names: list[str], procs: list[subprocess.Popen[Any]]) -> None:
    # Our own processes first (by their handles), then anything else still inside our namespaces
    # (their children), by pid; then the namespaces (the veths and the bridge go with them).
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(OSError):
                p.kill()
    for p in procs:
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            p.wait(timeout=5)
    for ns in names:
        for pid in _ns_pids(ns):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
    for ns in names:
        with contextlib.suppress(NetnsError):
            _run(["ip", "netns", "del", ns], check=False)


class Network:
    """``hosts`` namespaces on a bridge; see the module docstring."""

    def __init__(
        self,
        hosts: int,
        rate: str | None = None,
        *,
        burst: str = "256kb",
        latency: str = "20ms",
        mtu: int | None = None,
        tag: str | None = None,
    ) -> None:
        if not 1 <= hosts <= 250:
            raise ValueError("hosts must be in 1..250")
        check_available()
        if rate is not None and shutil.which("tc") is None:
            raise NetnsUnavailable("rate shaping needs the `tc` binary (iproute2), not installed")
        self.hosts = hosts
        self.rate = rate
        self.tag = tag or f"{os.getpid()}-{next(_instances)}"
        if not re.fullmatch(r"\d+(-\w+)?", self.tag):
            raise ValueError("tag must be a pid, optionally followed by -word")
        self.sw = f"{PREFIX}sw-{self.tag}"
        self.names = [f"{PREFIX}h{i}-{self.tag}" for i in range(hosts)]
        self.procs: list[subprocess.Popen[Any]] = []
        self._created: list[str] = []
        self._closed = False
        remove_leftovers()
        for ns in [self.sw, *self.names]:  # left by an earlier Network given this same tag
            if ns in list_namespaces():
                _run(["ip", "netns", "del", ns], check=False)
        # Registered before anything exists, so a failure half-way still cleans up.
        # (weakref.finalize also runs at interpreter exit.)
        self._finalizer = weakref.finalize(self, _teardown, self._created, self.procs)
        try:
            self._build(burst, latency, mtu)
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------

    def _add_ns(self, ns: str) -> None:
        r = _run(["ip", "netns", "add", ns], check=False)
        if r.returncode != 0:
            raise NetnsUnavailable(f"cannot create a network namespace (ip netns add): {r.stderr.strip()}")
        self._created.append(ns)

    def _build(self, burst: str, latency: str, mtu: int | None) -> None:
        self._add_ns(self.sw)
        # `ip netns exec` needs to unshare a mount namespace; containers without CAP_SYS_ADMIN fail here.
        r = _run(["ip", "netns", "exec", self.sw, "true"], check=False)
        if r.returncode != 0:
            raise NetnsUnavailable(f"cannot run a process in a namespace (ip netns exec): {r.stderr.strip()}")
        sw = ["ip", "-n", self.sw]
        _run([*sw, "link", "set", "lo", "up"])
        _run([*sw, "link", "add", "br0", "type", "bridge"])
        _run([*sw, "link", "set", "br0", "up"])
        for i, ns in enumerate(self.names):
            self._add_ns(ns)
            port = f"v{i}"
            # Created inside the switch namespace with the peer moved straight into the host, so the
            # caller's namespace never holds an interface of ours (no name clashes between runs).
            _run([*sw, "link", "add", port, "type", "veth", "peer", "name", IFNAME, "netns", ns])
            if mtu is not None:
                _run([*sw, "link", "set", port, "mtu", str(mtu)])
                _run(["ip", "-n", ns, "link", "set", IFNAME, "mtu", str(mtu)])
            _run([*sw, "link", "set", port, "master", "br0"])
            _run([*sw, "link", "set", port, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME])
            _run(["ip", "-n", ns, "link", "set", IFNAME, "up"])
            if self.rate is not None:
                tbf = ["root", "tbf", "rate", self.rate, "burst", burst, "latency", latency]
                for where, dev in ((ns, IFNAME), (self.sw, port)):
                    r = _run(
                        ["ip", "netns", "exec", where, "tc", "qdisc", "add", "dev", dev, *tbf], check=False
                    )
                    if r.returncode != 0:
                        raise NetnsUnavailable(f"cannot shape the links with tc tbf: {r.stderr.strip()}")
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for ns in self.names:
            while True:
                out = _run(["ip", "-n", ns, "-o", "link", "show", IFNAME]).stdout
                if "LOWER_UP" in out and "state UP" in out:
                    break
                if time.monotonic() > deadline:
                    raise NetnsError(f"{IFNAME} in {ns} did not come up: {out.strip()}")
                time.sleep(0.05)

    # -- use --------------------------------------------------------------------------------

    def name(self, host: int) -> str:
        return self.names[host]

    @staticmethod
    def addr(host: int) -> str:
        """The IPv4 address of host `host` (198.18.0.(host+1))."""
        return f"{SUBNET}.{host + 1}"

    def exec_argv(self, host: int, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.names[host], *argv]

    def run_in(
        self, host: int, argv: Sequence[str], env: Mapping[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen[Any]:
        """Starts `argv` in host `host` (``ip netns exec``); the Network kills it on close if it
        is still running. Extra keyword arguments go to Popen (stdout, stderr, text, cwd...)."""
        if self._closed:
            raise NetnsError("the network is closed")
        p = subprocess.Popen(self.exec_argv(host, argv), env=dict(env) if env is not None else None, **popen)
        self.procs.append(p)
        return p

    def close(self) -> None:
        """Kills what still runs in the namespaces and deletes them (idempotent)."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_all(procs: Sequence[subprocess.Popen[str]], timeout: float) -> list[tuple[int | None, str, str]]:
    """Waits for every process within one shared deadline; kills those that overstay (their return
    code is then None). Returns (returncode, stdout, stderr) per process; needs PIPE'd text I/O."""
    deadline = time.monotonic() + timeout
    res: list[tuple[int | None, str, str]] = [(None, "", "")] * len(procs)

    def one(k: int, p: subprocess.Popen[str]) -> None:
        # Each process is drained by its own thread, so no child blocks on a full pipe while
        # another is being waited for.
        try:
            out, err = p.communicate(timeout=max(0.1, deadline - time.monotonic()))
            res[k] = (p.returncode, out or "", err or "")
        except subprocess.TimeoutExpired:
            p.kill()
            try:
                out, err = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                out, err = "", ""
            res[k] = (None, out or "", (err or "") + f"\n[killed after {timeout:.0f}s]")

    threads = [threading.Thread(target=one, args=(k, p), daemon=True) for k, p in enumerate(procs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout + 15)
    return res

"""Shared memory cannot crash the other side (issue 11, behaviour 2): real processes, real shared
memory, real tampering.

A hostile peer on the same host reaches a shared segment through its own fd or /proc/<pid>/fd/N and
(a) ftruncate()s it: refused with EPERM, the segment's size is sealed (SHM-6, SHQ-6, SEAL-1);
(b) writes garbage into a server link's ring control words: the victim server reports a
    ProtocolError naming that peer, on that connection only, and keeps serving a good client whose
    data is checked byte for byte (SHM-2);
(c) writes garbage into a work queue's ring counters: the owner's read raises ProtocolError, no
    crash, no hang; the answers of the good worker before it were intact (SHQ-4, SHQ-6).
Each test asserts that the victim survived (no SIGBUS) and bounds the time to the error.
Skipped on TCP-only runs (PARALLEL_SHM=0): there is no shared memory to attack.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import torch_parallel as parallel

PEERS = str(pathlib.Path(__file__).resolve().parent / "shm_peers.py")
ERROR_WITHIN_S = 5.0
SEALED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

pytestmark = pytest.mark.skipif(
    parallel.config()["PARALLEL_SHM"] not in ("1", "true", "yes", "on"),
    reason="shared memory is off (PARALLEL_SHM=0)",
)


class Peer:
    """A child process running one role of shm_peers.py; reads its JSON lines."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen(
            [sys.executable, PEERS, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def next(self, event: str, timeout: float = 30) -> dict[str, Any]:
        """The next line, which must be this event."""
        deadline = time.monotonic() + timeout
        assert self.p.stdout is not None
        while time.monotonic() < deadline:
            line = self.p.stdout.readline()
            if not line:
                break
            msg: dict[str, Any] = json.loads(line)
            if msg.get("event") == event:
                return msg
            raise AssertionError(f"expected {event!r}, got {msg}")
        self.p.kill()
        _, err = self.p.communicate(timeout=10)
        raise AssertionError(f"no {event!r} from {self.p.args[2:]}: rc {self.p.returncode}\n{err}")

    def next_any(self) -> dict[str, Any]:
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        assert line, f"{self.p.args[2:]} ended without saying so"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def finish(self, timeout: float = 30) -> int:
        try:
            _, err = self.p.communicate(input="", timeout=timeout)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.communicate()
            raise AssertionError(f"{self.p.args[2:]} did not finish in {timeout}s") from None
        self.stderr = err
        return self.p.returncode

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.communicate()


def assert_sealed(resize: dict[str, Any]) -> None:
    assert resize["seals"] & SEALED == SEALED, resize
    for what in ("shrink_to_0", "shrink_by_page", "grow"):
        assert resize[what] == errno.EPERM, resize
    assert resize["size_after"] == resize["size"], resize


def echo_checked(c: parallel.Client, rounds: int, seed: int) -> None:
    """Round trips of random tensors (some larger than half the ring), compared byte for byte."""
    g = torch.Generator().manual_seed(seed)
    for i in range(rounds):
        n = int(torch.randint(1, 3 << 20, (1,), generator=g)) if i % 2 else 17 + i
        t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
        c.send(t, timeout=10)
        back = c.recv(timeout=10)
        assert isinstance(back, torch.Tensor) and torch.equal(back, t), f"round {i}: corrupted echo"


@pytest.fixture
def victim() -> Iterator[tuple[Peer, int, int]]:
    v = Peer("victim_server")
    ready = v.next("ready")
    yield v, ready["port"], ready["pid"]
    v.kill()


def test_shm_segment_cannot_be_resized_through_proc_by_another_process(
    victim: tuple[Peer, int, int],
) -> None:
    v, port, pid = victim
    with parallel.client("127.0.0.1", port, timeout=10) as c:
        assert c.link == "shm"
        echo_checked(c, 4, seed=1)
        # The victim's copy of the segment, reached as any same-user process can.
        paths = [
            f"/proc/{pid}/fd/{fd}"
            for fd in os.listdir(f"/proc/{pid}/fd")
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/memfd:parallel-ring")
        ]
        assert paths, "the victim maps no ring memfd"
        for path in paths:
            fd = os.open(path, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALED == SEALED
                for to in (0, size // 2, size * 2):
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, to)
                assert os.fstat(fd).st_size == size
            finally:
                os.close(fd)
        assert v.p.poll() is None, "the victim died"
        echo_checked(c, 6, seed=2)
        c.send("stop", timeout=10)
        assert c.recv(timeout=10) == "bye"
    assert v.next("exit")
    assert v.finish() == 0


@pytest.mark.parametrize(
    "mode", ["head_beyond_capacity", "head_behind_tail", "random_control_block", "tail_ahead_of_head"]
)
def test_shm_garbage_in_ring_control_words_fails_only_that_connection(
    victim: tuple[Peer, int, int], mode: str
) -> None:
    v, port, _ = victim
    with parallel.client("127.0.0.1", port, timeout=10) as good:
        assert good.link == "shm"
        echo_checked(good, 4, seed=3)
        bad = Peer("hostile_client", str(port), mode)
        try:
            tampered = bad.next("tampered")
            assert_sealed(tampered["resize"])
            err = v.next("error", timeout=ERROR_WITHIN_S + 5)
            took = err["t"] - tampered["t"]
            assert err["type"] == "ProtocolError", err
            assert "corrupted" in err["message"], err
            assert f"pid {tampered['pid']}" in err["message"], f"the error does not name the peer: {err}"
            assert took < ERROR_WITHIN_S, f"error after {took:.2f}s"
            print(f"{mode}: {err['where']} error after {took * 1000:.0f} ms: {err['message']}")
            # The victim survived and still serves the good client, data intact.
            assert v.p.poll() is None, "the victim died"
            echo_checked(good, 6, seed=4)
            assert bad.p.poll() is None, "the hostile peer must still be alive (no EOF error)"
        finally:
            bad.kill()
        good.send("stop", timeout=10)
        assert good.recv(timeout=10) == "bye"
    # Later reports (the hostile's link shut down, then the process killed) concern it alone.
    while (msg := v.next_any())["event"] != "exit":
        assert msg["event"] == "error" and f"pid {tampered['pid']}" in msg["message"], msg
    assert v.finish() == 0


def test_workqueue_owner_survives_a_worker_that_corrupts_the_shared_ring() -> None:
    name = f"hostile-{uuid.uuid4().hex[:10]}"
    n = 7
    owner = Peer("wq_owner", name, str(n))
    good = bad = None
    try:
        owner.next("ready")
        good = Peer("wq_good_worker", name, str(n))
        answers = owner.next("answers")
        assert answers == {"event": "answers", "ok": n, "n": n}, "the good worker's answers were not intact"
        assert good.next("done")["n"] == n
        bad = Peer("wq_hostile_worker", name, str(n))
        tampered = bad.next("tampered")
        assert_sealed(tampered["resize"])
        err = owner.next("error", timeout=ERROR_WITHIN_S + 5)
        took = err["t"] - tampered["t"]
        assert err["type"] == "ProtocolError", err
        assert "corrupted" in err["message"], err
        assert took < ERROR_WITHIN_S, f"error after {took:.2f}s"
        print(f"work queue: owner's read failed after {took * 1000:.0f} ms: {err['message']}")
        write = owner.next("write")
        assert write["result"] == "ok", "questions were not corrupted: writing them still works"
        owner.next("exit")
        assert owner.finish() == 0, f"the owner died: {owner.stderr}"
    finally:
        for p in (owner, good, bad):
            if p is not None:
                p.kill()


ODD_RING = """
import os, torch, torch_parallel as parallel
s = parallel.server("127.0.0.1", 0)
c = parallel.client("127.0.0.1", s.port, timeout=10)
s.wait_for(1, timeout=10)
conn = s.connections()[0]
assert c.link == "shm", c.link
g = torch.Generator().manual_seed(5)
for n in (1, 65537, 65537 * 3 + 11):  # up to 3 rings' worth: wraps the odd-sized ring many times
    t = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g)
    h = c.send_async(t, timeout=10)  # larger than the ring: the reader must run meanwhile
    assert torch.equal(conn.recv(timeout=10), t)
    h.wait(timeout=10)
    h = conn.send_async(t, timeout=10)
    assert torch.equal(c.recv(timeout=10), t)
    h.wait(timeout=10)
print("ok", parallel.config()["PARALLEL_SHM_RING"])
"""


def test_shm_ring_size_that_would_misalign_control_words_is_rounded_up() -> None:
    env = dict(os.environ, PARALLEL_SHM_RING="65537", PARALLEL_SHM_CMA="0")
    r = subprocess.run([sys.executable, "-c", ODD_RING], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "ok", r.stdout

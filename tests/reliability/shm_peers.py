"""The processes of test_shm.py: a victim server, a hostile client, a work queue owner, a good and a
hostile worker. Run as ``python shm_peers.py ROLE ARGS...``; each prints one JSON object per line.

A hostile peer reaches the shared memory as any process of the same user on the host can: through
its own fd (the segment it was handed) or through /proc/<pid>/fd/N of another process, then
ftruncate()s it, or mmap()s it and writes garbage into the control words.
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import struct
import sys
import time
from typing import Any

import torch

import torch_parallel as parallel

CTRL = 4096  # bytes of a ring's control block (engine/src/link/shm/mod.rs)
TAIL = 128  # offset of the reader's index in a control block


def say(**kw: Any) -> None:
    print(json.dumps(kw), flush=True)


def memfds(pid: int, prefix: str) -> list[str]:
    """/proc paths of the memfds of process `pid` whose name starts with `prefix`."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith(f"/memfd:{prefix}"):
            out.append(f"/proc/{pid}/fd/{fd}")
    return out


def try_resize(path: str) -> dict[str, Any]:
    """Tries to shrink and to grow the segment; reports the errno of each and its seals."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        got: dict[str, Any] = {"size": size, "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS)}
        for what, to in (("shrink_to_0", 0), ("shrink_by_page", size - 4096), ("grow", 2 * size)):
            try:
                os.ftruncate(fd, to)
                got[what] = "ok"
            except OSError as e:
                got[what] = e.errno
        got["size_after"] = os.fstat(fd).st_size
        return got
    finally:
        os.close(fd)


def victim_server() -> None:
    """Echoes every message to its sender; reports each error and keeps serving."""
    s = parallel.server("127.0.0.1", 0)
    say(event="ready", port=s.port, pid=os.getpid())
    while True:
        try:
            v, conn = s.recv_any_from(timeout=60)
        except Exception as e:  # noqa: BLE001 - the test reads every error
            say(event="error", where="recv", type=type(e).__name__, message=str(e), t=time.time())
            if isinstance(e, parallel.Timeout):
                break
            continue
        if isinstance(v, str) and v == "stop":
            conn.send("bye", timeout=10)
            break
        try:
            conn.send(v, timeout=10)
        except Exception as e:  # noqa: BLE001
            say(event="error", where="send", type=type(e).__name__, message=str(e), t=time.time())
    s.close()
    say(event="exit")


def hostile_client(port: int, mode: str) -> None:
    """Connects over shm, then tampers with its segment (`mode`) and stays alive (so the victim's
    error cannot come from our death), until stdin closes."""
    c = parallel.client("127.0.0.1", port, timeout=10)
    if c.link != "shm":
        say(event="no-shm", link=c.link)
        return
    c.send("hello", timeout=10)
    assert c.recv(timeout=10) == "hello"
    (path,) = memfds(os.getpid(), "parallel-ring")
    resize = try_resize(path)
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    cap = size // 2 - CTRL
    m = mmap.mmap(fd, size)
    # Ring 0: we write, the server reads. Ring 1: the server writes, we read.
    (tail0,) = struct.unpack_from("<Q", m, TAIL)
    (head1,) = struct.unpack_from("<Q", m, CTRL + cap)
    if mode == "head_beyond_capacity":
        struct.pack_into("<Q", m, 0, tail0 + 10 * cap + 12345)
    elif mode == "head_behind_tail":
        struct.pack_into("<Q", m, 0, tail0 - 1)
    elif mode == "random_control_block":
        while True:
            junk = os.urandom(CTRL)
            (head,) = struct.unpack_from("<Q", junk, 0)
            if head - tail0 > cap or head < tail0:  # 1 - 2^-40: out of range
                break
        m[0:CTRL] = junk
    elif mode == "tail_ahead_of_head":
        struct.pack_into("<Q", m, CTRL + cap + TAIL, head1 + 3 * cap)
    else:
        raise SystemExit(f"unknown mode {mode}")
    t = time.time()
    if mode == "tail_ahead_of_head":
        # The server's echoes must write into the corrupted ring, and more than a ring's worth,
        # so that it reads the reader position (a writer counts room from the position it last
        # saw and reads the shared one when that room runs short). Each message stays below the
        # cross-memory threshold (1 MiB), so that its bytes go through the ring.
        piece = (1 << 20) - 4096
        for _ in range(cap // piece + 2):
            c.send(b"p" * piece, timeout=10)
    say(event="tampered", t=t, resize=resize, pid=os.getpid(), cap=cap)
    sys.stdin.readline()


def wq_owner(name: str, n: int) -> None:
    """Writes `n` questions (i, random bytes), checks the `n` answers (i, bytes + 1) byte for byte,
    writes 4 more questions nobody reads, then reads again (a hostile worker corrupts the ring
    meanwhile) and reports what that read raised and when."""
    q = parallel.workqueue(name)
    say(event="ready", pid=os.getpid())
    g = torch.Generator().manual_seed(11)
    sent = {i: torch.randint(0, 256, (1000 + 4099 * i,), dtype=torch.uint8, generator=g) for i in range(n)}
    for i, t in sent.items():
        q.write((i, t))
    ok = 0
    for _ in range(n):
        i, t = q.read(timeout=30)
        ok += int(torch.equal(t, sent[i] + 1))
    q.write(*[(n + k, torch.zeros(1, dtype=torch.uint8)) for k in range(4)])
    say(event="answers", ok=ok, n=n)
    try:
        v = q.read(timeout=20)
        say(event="read", value=repr(v)[:200], t=time.time())
    except Exception as e:  # noqa: BLE001
        say(event="error", type=type(e).__name__, message=str(e), t=time.time())
    try:
        q.write("after", timeout=5)
        say(event="write", result="ok")
    except Exception as e:  # noqa: BLE001
        say(event="write", result=type(e).__name__, message=str(e))
    say(event="exit")


def wq_good_worker(name: str, n: int) -> None:
    q = parallel.workqueue(name)
    for _ in range(n):
        i, t = q.read(timeout=30)
        q.write((i, t + 1))
    say(event="done", n=n)


def wq_hostile_worker(name: str, n: int) -> None:
    """Opens the queue by name (it gets the queue's memfd from the owner), tries to resize it, then
    finds the answers ring's counters and moves the tail far past the capacity."""
    q = parallel.workqueue(name)  # kept open: the queue's memfd stays in our fd table
    (path,) = memfds(os.getpid(), "parallel-wq:")
    resize = try_resize(path)
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, 4096)  # the header
    # Header words: questions (head, tail), answers (head, tail), asked, answered.
    want = struct.pack("<6Q", n, n + 4, n, n, n + 4, n)
    deadline = time.time() + 10
    at = [i for i in range(0, 4096 - 48, 8) if m[i : i + 48] == want]
    while len(at) != 1 and time.time() < deadline:
        time.sleep(0.01)
        at = [i for i in range(0, 4096 - 48, 8) if m[i : i + 48] == want]
    if len(at) != 1:
        say(event="no-counters", found=at)
        return
    struct.pack_into("<Q", m, at[0] + 24, n + 1_000_000)  # answers tail
    say(event="tampered", t=time.time(), resize=resize, pid=os.getpid())
    sys.stdin.readline()
    del q


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "victim_server":
        victim_server()
    elif role == "hostile_client":
        hostile_client(int(args[0]), args[1])
    elif role == "wq_owner":
        wq_owner(args[0], int(args[1]))
    elif role == "wq_good_worker":
        wq_good_worker(args[0], int(args[1]))
    elif role == "wq_hostile_worker":
        wq_hostile_worker(args[0], int(args[1]))
    else:
        raise SystemExit(f"unknown role {role}")

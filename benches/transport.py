"""Client/Server transport benchmark: Parallel (torch_parallel) against its peers, in one run.

(a) Throughput of one large tensor message client -> server over loopback (default 256 MiB):
      iperf3 (one stream)       iperf3 -s -1 / iperf3 -c 127.0.0.1 -t S -J   (receiver's rate)
      sockets_tcp / _unix       sendall() / recv_into() of a preallocated buffer
      zmq_tcp                   PUSH/PULL, send(copy=False) / recv(copy=False)
      gloo                      torch.distributed gloo send/recv (init_method tcp://)
      ours_tcp / ours_shm       client.send(tensor) / conn.recv(out=preallocated)
                                with PARALLEL_SHM=0 / PARALLEL_SHM=1 in both processes
    Timing (all but iperf3) mirrors research/peer-baselines/tcp_py_bench.py: on the sender,
    t0; send one message; wait for a 1-byte ack from the receiver; t1. One warm-up message
    first, then --reps timed messages. Rate = bytes / (t1 - t0), 1 GB/s = 1e9 B/s.
(b) Round trip of a small message (8-byte bytes object): sockets_tcp, sockets_unix,
    zmq_tcp (REQ/REP), gloo (dist.send/dist.recv of an 8-byte uint8 tensor, rank 1 echoes),
    ours_tcp, ours_shm. Warm-up, then --rtt-reps x --rtt-n timed round trips;
    median / p10 / p90 over all timed samples, and the range of the per-rep medians.

Every measurement runs its two ends as two fresh processes (multiprocessing 'spawn'; iperf3
as two subprocesses); this process only orchestrates and never imports torch_parallel, so the
PARALLEL_* variables set in each child are read by that child alone. Every blocking call has a
timeout; every child is joined with a deadline and terminated, then killed, if it overstays.

Usage:
  .venv/bin/python benches/transport.py                 # full run (a few minutes)
  .venv/bin/python benches/transport.py --quick         # smoke run, < 60 s
  .venv/bin/python benches/transport.py --only tcp,shm  # just ours (keys: iperf3 sockets unix
                                                        # zmq gloo tcp shm, or ours / peers)
Writes --json (default bench-out/transport.json) and --md (default bench-out/transport.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from _common import (
    HOST,
    cmd,
    core_probe,
    core_record,
    cpu_seconds,
    fmt_core,
    free_port,
    pct,
    read_text,
    run_probe,
)
from _common import machine_info as base_machine_info

MiB = 1 << 20
SMALL_MSG = b"12345678"  # the 8-byte message of the round-trip test

# --only keys -> row names
TP_ROWS = {
    "iperf3": "iperf3",
    "sockets": "sockets_tcp",
    "unix": "sockets_unix",
    "zmq": "zmq_tcp",
    "gloo": "gloo",
    "tcp": "ours_tcp",
    "shm": "ours_shm",
}
LAT_ROWS = {
    "sockets": "sockets_tcp",
    "unix": "sockets_unix",
    "zmq": "zmq_tcp",
    "gloo": "gloo",
    "tcp": "ours_tcp",
    "shm": "ours_shm",
}
ALIASES = {
    "ours": ["tcp", "shm"],
    "peers": ["iperf3", "sockets", "unix", "zmq", "gloo"],
}
OURS = ("ours_tcp", "ours_shm")


# ----------------------------------------------------------------------------------------------
# helpers shared by the children


def pattern(nbytes: int) -> bytearray:
    """Touched, non-zero, deterministic payload: one random MiB repeated (both ends can rebuild it)."""
    block = random.Random(1234).randbytes(MiB)
    return bytearray(block) * (nbytes // MiB)


def verify(buf, nbytes: int, what: str) -> None:
    """Checks the first and the last MiB of a received payload against pattern()."""
    block = random.Random(1234).randbytes(MiB)
    mv = memoryview(buf).cast("B")
    if len(mv) != nbytes:
        raise AssertionError(f"{what}: received {len(mv)} bytes, expected {nbytes}")
    if mv[:MiB] != block or mv[nbytes - MiB :] != block:
        raise AssertionError(f"{what}: received payload differs from what was sent")


def _call_with_timeout(fn, timeout, **kw):
    """fn(timeout=..., **kw), or fn(**kw) where fn takes no timeout keyword."""
    try:
        return fn(timeout=timeout, **kw)
    except TypeError as e:
        if "timeout" not in str(e):
            raise
        return fn(**kw)


def _safe(fn):
    try:
        return fn()
    except Exception as e:  # stats are informative only
        return f"<{type(e).__name__}: {e}>"


def _child(role, fn, args, resq, env):
    """Entry point of every child: set env first, run fn, report (role, status, payload)."""
    for k, v in env.items():
        os.environ[k] = v
    try:
        resq.put((role, "ok", fn(*args)))
    except ImportError as e:
        status = "unavailable" if "torch_parallel" in str(e) or "torch_parallel" in repr(e.name) else "error"
        resq.put((role, status, f"{type(e).__name__}: {e}"))
    except BaseException:
        resq.put((role, "error", traceback.format_exc(limit=6)))


# ----------------------------------------------------------------------------------------------
# (a) throughput ends. Each *_recv is the server (receiver), each *_send the client (sender).
# link = (handoff queue: receiver -> sender address, done event: set by the sender at the end)


def sock_tp_recv(link, family, path, nbytes, reps, t_op):
    q, done = link
    if family == "tcp":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((HOST, 0))
        addr = srv.getsockname()[1]
    else:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        addr = path
    srv.listen(1)
    srv.settimeout(t_op)
    q.put(addr)
    c, _ = srv.accept()
    c.settimeout(t_op)
    if family == "tcp":
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(nbytes)  # zero-filled, so already faulted in
    mv = memoryview(buf)
    cpu0 = cpu_seconds()
    for i in range(reps + 1):
        got = 0
        while got < nbytes:
            n = c.recv_into(mv[got:], nbytes - got)
            if n == 0:
                raise ConnectionError("peer closed")
            got += n
        if i == 0:
            verify(buf, nbytes, "sockets")
        c.sendall(b"k")
    cpu = cpu_seconds() - cpu0
    done.wait(t_op)
    c.close()
    srv.close()
    return {"verified": True, "server_cpu_s": cpu}


def sock_tp_send(link, family, path, nbytes, reps, t_op):
    q, done = link
    data = pattern(nbytes)
    addr = q.get(timeout=t_op)
    if family == "tcp":
        s = socket.create_connection((HOST, addr), timeout=t_op)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(t_op)
        s.connect(addr)
    rates = []
    cpu0 = cpu_seconds()
    for i in range(reps + 1):  # the first one is warm-up
        t0 = time.perf_counter()
        s.sendall(data)
        if s.recv(1) != b"k":
            raise ConnectionError("bad ack")
        dt = time.perf_counter() - t0
        if i:
            rates.append(nbytes / dt / 1e9)
    cpu = cpu_seconds() - cpu0
    done.set()
    s.close()
    return {"GBps": rates, "client_cpu_s": cpu}


def zmq_tp_recv(link, nbytes, reps, t_op):
    import zmq

    q, done = link
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    ack = ctx.socket(zmq.PAIR)
    for sk in (pull, ack):
        sk.setsockopt(zmq.LINGER, 0)
        sk.setsockopt(zmq.RCVTIMEO, int(t_op * 1000))
        sk.setsockopt(zmq.SNDTIMEO, int(t_op * 1000))
    q.put(
        (
            pull.bind_to_random_port(f"tcp://{HOST}"),
            ack.bind_to_random_port(f"tcp://{HOST}"),
        )
    )
    if ack.recv() != b"hi":
        raise ConnectionError("bad hello")
    ack.send(b"ready")
    cpu0 = cpu_seconds()
    for i in range(reps + 1):
        f = pull.recv(copy=False)
        if i == 0:
            verify(f.buffer, nbytes, "zmq")
        elif len(f.buffer) != nbytes:
            raise AssertionError("zmq: short message")
        del f
        ack.send(b"k")
    cpu = cpu_seconds() - cpu0
    done.wait(t_op)
    pull.close()
    ack.close()
    ctx.term()
    return {"verified": True, "server_cpu_s": cpu}


def zmq_tp_send(link, nbytes, reps, t_op):
    import zmq

    q, done = link
    data = pattern(nbytes)
    p_data, p_ack = q.get(timeout=t_op)
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    ack = ctx.socket(zmq.PAIR)
    for sk in (push, ack):
        sk.setsockopt(zmq.LINGER, 0)
        sk.setsockopt(zmq.RCVTIMEO, int(t_op * 1000))
        sk.setsockopt(zmq.SNDTIMEO, int(t_op * 1000))
    push.connect(f"tcp://{HOST}:{p_data}")
    ack.connect(f"tcp://{HOST}:{p_ack}")
    ack.send(b"hi")
    if ack.recv() != b"ready":
        raise ConnectionError("bad ready")
    rates = []
    cpu0 = cpu_seconds()
    for i in range(reps + 1):
        t0 = time.perf_counter()
        push.send(data, copy=False)
        ack.recv()
        dt = time.perf_counter() - t0
        if i:
            rates.append(nbytes / dt / 1e9)
    cpu = cpu_seconds() - cpu0
    done.set()
    push.close()
    ack.close()
    ctx.term()
    return {
        "GBps": rates,
        "client_cpu_s": cpu,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
    }


def gloo_tp(link, rank, port, nbytes, reps, t_op):
    """rank 0 sends (client side), rank 1 receives (server side)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    _q, done = link
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{HOST}:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=t_op),
    )
    ack = torch.zeros(1)
    out = {}
    if rank == 0:
        data = torch.frombuffer(pattern(nbytes), dtype=torch.uint8)
        rates = []
        cpu0 = cpu_seconds()
        for i in range(reps + 1):
            t0 = time.perf_counter()
            dist.send(data, 1)
            dist.recv(ack, 1)
            dt = time.perf_counter() - t0
            if i:
                rates.append(nbytes / dt / 1e9)
        out = {"GBps": rates, "client_cpu_s": cpu_seconds() - cpu0}
        done.set()
    else:
        buf = torch.zeros(nbytes, dtype=torch.uint8)
        cpu0 = cpu_seconds()
        for i in range(reps + 1):
            dist.recv(buf, 0)
            if i == 0:
                verify(buf.numpy(), nbytes, "gloo")
            dist.send(ack, 0)
        out = {"verified": True, "server_cpu_s": cpu_seconds() - cpu0}
        done.wait(t_op)
    dist.destroy_process_group()
    return out


def ours_tp_recv(link, nbytes, reps, t_op):
    import torch

    import torch_parallel as parallel

    q, done = link
    s = parallel.server(host=HOST, port=0)
    q.put(s.port)
    hello, conn = s.recv_any_from(timeout=t_op)
    if hello != "hello":
        raise AssertionError(f"bad hello {hello!r}")
    conn.send("ready")
    buf = torch.zeros(nbytes, dtype=torch.uint8)  # preallocated and faulted in
    into_out = True
    cpu0 = cpu_seconds()
    for i in range(reps + 1):
        r = _call_with_timeout(conn.recv, t_op, out=buf)
        if r is not buf and not (isinstance(r, torch.Tensor) and r.data_ptr() == buf.data_ptr()):
            into_out = False
            if i == 0:
                verify(
                    r.contiguous().view(torch.uint8).numpy(),
                    nbytes,
                    "ours (returned tensor)",
                )
        if i == 0:
            verify(buf.numpy(), nbytes, "ours (out=)")
        conn.send(b"k")
    cpu = cpu_seconds() - cpu0
    done.wait(t_op)
    res = {
        "verified": True,
        "server_cpu_s": cpu,
        "recv_into_out": into_out,
        "server_conn_link": _safe(lambda: conn.link),
        "server_stats": _safe(s.stats),
    }
    s.close()
    return res


def ours_tp_send(link, nbytes, reps, t_op):
    import torch

    import torch_parallel as parallel

    q, done = link
    data = torch.frombuffer(pattern(nbytes), dtype=torch.uint8)
    port = q.get(timeout=t_op)
    c = parallel.client(HOST, port, timeout=t_op)
    c.send("hello")
    if c.recv(timeout=t_op) != "ready":
        raise AssertionError("bad ready")
    rates = []
    cpu0 = cpu_seconds()
    for i in range(reps + 1):
        t0 = time.perf_counter()
        c.send(data)
        a = c.recv(timeout=t_op)
        dt = time.perf_counter() - t0
        if a != b"k":
            raise AssertionError(f"bad ack {a!r}")
        if i:
            rates.append(nbytes / dt / 1e9)
    res = {
        "GBps": rates,
        "client_cpu_s": cpu_seconds() - cpu0,
        "link": _safe(lambda: c.link),
        "client_stats": _safe(c.stats),
        "version": getattr(parallel, "__version__", None),
    }
    done.set()
    c.close()
    return res


# ----------------------------------------------------------------------------------------------
# (b) round-trip ends: *_echo is the server, *_ping the client that measures.


def _rtt_summary(samples_us, n_per_rep):
    """Per-rep medians plus pooled percentiles (samples in microseconds)."""
    reps = [samples_us[i : i + n_per_rep] for i in range(0, len(samples_us), n_per_rep)]
    return {
        "samples_us": samples_us,
        "rep_medians_us": [statistics.median(r) for r in reps],
    }


def sock_rtt_echo(link, family, path, total, t_op):
    q, done = link
    if family == "tcp":
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((HOST, 0))
        addr = srv.getsockname()[1]
    else:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        addr = path
    srv.listen(1)
    srv.settimeout(t_op)
    q.put(addr)
    c, _ = srv.accept()
    c.settimeout(t_op)
    if family == "tcp":
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    size = len(SMALL_MSG)
    buf = bytearray(size)
    mv = memoryview(buf)
    cpu0 = cpu_seconds()
    for _ in range(total):
        got = 0
        while got < size:
            n = c.recv_into(mv[got:])
            if n == 0:
                raise ConnectionError("peer closed")
            got += n
        c.sendall(buf)
    cpu = cpu_seconds() - cpu0
    done.wait(t_op)
    c.close()
    srv.close()
    return {"server_cpu_s": cpu}


def sock_rtt_ping(link, family, path, warm, n, reps, t_op):
    q, done = link
    addr = q.get(timeout=t_op)
    if family == "tcp":
        s = socket.create_connection((HOST, addr), timeout=t_op)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    else:
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(t_op)
        s.connect(addr)
    size = len(SMALL_MSG)
    buf = bytearray(size)
    mv = memoryview(buf)
    pc = time.perf_counter_ns
    samples = []
    cpu0 = cpu_seconds()
    for i in range(warm + n * reps):
        t0 = pc()
        s.sendall(SMALL_MSG)
        got = 0
        while got < size:
            k = s.recv_into(mv[got:])
            if k == 0:
                raise ConnectionError("peer closed")
            got += k
        t1 = pc()
        if i >= warm:
            samples.append((t1 - t0) / 1e3)
    cpu = cpu_seconds() - cpu0
    if bytes(buf) != SMALL_MSG:
        raise AssertionError("echo differs")
    done.set()
    s.close()
    return {**_rtt_summary(samples, n), "client_cpu_s": cpu}


def zmq_rtt_echo(link, total, t_op):
    import zmq

    q, done = link
    ctx = zmq.Context()
    rep = ctx.socket(zmq.REP)
    rep.setsockopt(zmq.LINGER, 0)
    rep.setsockopt(zmq.RCVTIMEO, int(t_op * 1000))
    rep.setsockopt(zmq.SNDTIMEO, int(t_op * 1000))
    q.put(rep.bind_to_random_port(f"tcp://{HOST}"))
    cpu0 = cpu_seconds()
    for _ in range(total):
        rep.send(rep.recv())
    cpu = cpu_seconds() - cpu0
    done.wait(t_op)
    rep.close()
    ctx.term()
    return {"server_cpu_s": cpu}


def zmq_rtt_ping(link, warm, n, reps, t_op):
    import zmq

    q, done = link
    port = q.get(timeout=t_op)
    ctx = zmq.Context()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.setsockopt(zmq.RCVTIMEO, int(t_op * 1000))
    req.setsockopt(zmq.SNDTIMEO, int(t_op * 1000))
    req.connect(f"tcp://{HOST}:{port}")
    pc = time.perf_counter_ns
    samples = []
    r = b""
    cpu0 = cpu_seconds()
    for i in range(warm + n * reps):
        t0 = pc()
        req.send(SMALL_MSG)
        r = req.recv()
        t1 = pc()
        if i >= warm:
            samples.append((t1 - t0) / 1e3)
    cpu = cpu_seconds() - cpu0
    if r != SMALL_MSG:
        raise AssertionError("echo differs")
    done.set()
    req.close()
    ctx.term()
    return {**_rtt_summary(samples, n), "client_cpu_s": cpu}


def gloo_rtt(link, rank, port, warm, n, reps, t_op):
    """rank 0 pings and measures (client side), rank 1 echoes (server side)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    _q, done = link
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{HOST}:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=t_op),
    )
    total = warm + n * reps
    buf = torch.zeros(len(SMALL_MSG), dtype=torch.uint8)
    if rank == 0:
        msg = torch.frombuffer(bytearray(SMALL_MSG), dtype=torch.uint8)
        pc = time.perf_counter_ns
        samples = []
        cpu0 = cpu_seconds()
        for i in range(total):
            t0 = pc()
            dist.send(msg, 1)
            dist.recv(buf, 1)
            t1 = pc()
            if i >= warm:
                samples.append((t1 - t0) / 1e3)
        cpu = cpu_seconds() - cpu0
        if bytes(buf.numpy()) != SMALL_MSG:
            raise AssertionError("echo differs")
        out = {**_rtt_summary(samples, n), "client_cpu_s": cpu}
        done.set()
    else:
        cpu0 = cpu_seconds()
        for _ in range(total):
            dist.recv(buf, 0)
            dist.send(buf, 0)
        out = {"server_cpu_s": cpu_seconds() - cpu0}
        done.wait(t_op)
    dist.destroy_process_group()
    return out


def ours_rtt_echo(link, total, t_op):
    import torch_parallel as parallel

    q, done = link
    s = parallel.server(host=HOST, port=0)
    q.put(s.port)
    hello, conn = s.recv_any_from(timeout=t_op)
    if hello != "hello":
        raise AssertionError(f"bad hello {hello!r}")
    conn.send("ready")
    cpu0 = cpu_seconds()
    # Called as the pinging side calls it (conn.recv takes a timeout; the generic wrapper for
    # receive functions without one would add a Python call to every echo).
    recv = conn.recv
    for _ in range(total):
        conn.send(recv(timeout=t_op))
    cpu = cpu_seconds() - cpu0
    done.wait(t_op)
    res = {
        "server_cpu_s": cpu,
        "server_conn_link": _safe(lambda: conn.link),
        "server_stats": _safe(s.stats),
    }
    s.close()
    return res


def ours_rtt_ping(link, warm, n, reps, t_op):
    import torch_parallel as parallel

    q, done = link
    port = q.get(timeout=t_op)
    c = parallel.client(HOST, port, timeout=t_op)
    c.send("hello")
    if c.recv(timeout=t_op) != "ready":
        raise AssertionError("bad ready")
    pc = time.perf_counter_ns
    samples = []
    r = None
    cpu0 = cpu_seconds()
    for i in range(warm + n * reps):
        t0 = pc()
        c.send(SMALL_MSG)
        r = c.recv(timeout=t_op)
        t1 = pc()
        if i >= warm:
            samples.append((t1 - t0) / 1e3)
    cpu = cpu_seconds() - cpu0
    if r != SMALL_MSG:
        raise AssertionError(f"echo differs: {r!r}")
    res = _rtt_summary(samples, n)
    res.update(client_cpu_s=cpu, link=_safe(lambda: c.link), client_stats=_safe(c.stats))
    done.set()
    c.close()
    return res


# ----------------------------------------------------------------------------------------------
# orchestration (parent process)


def run_pair(ctx, recv_fn, recv_args, send_fn, send_args, env, deadline_s):
    """Starts the two ends as fresh processes, collects both results within deadline_s.
    Returns (results {role: (status, payload)}, error or None). Never leaves a child behind."""
    resq, q, done = ctx.Queue(), ctx.Queue(), ctx.Event()
    link = (q, done)
    roles = ("server", "client")
    procs = {
        "server": ctx.Process(
            target=_child,
            args=("server", recv_fn, (link, *recv_args), resq, env),
            daemon=True,
        ),
        "client": ctx.Process(
            target=_child,
            args=("client", send_fn, (link, *send_args), resq, env),
            daemon=True,
        ),
    }
    for p in procs.values():
        p.start()
    results, err, dead_since = {}, None, {}
    t_end = time.monotonic() + deadline_s
    while len(results) < 2:
        now = time.monotonic()
        if now >= t_end:
            missing = ", ".join(r for r in roles if r not in results)
            err = f"timed out after {deadline_s:.0f} s (missing: {missing})"
            break
        try:
            role, status, payload = resq.get(timeout=min(0.5, t_end - now))
            results[role] = (status, payload)
            if status != "ok":
                err = f"{role}: {status}"
                break
            continue
        except queue.Empty:
            pass
        for r in roles:  # a child that died without reporting (crash, signal)
            p = procs[r]
            if r not in results and p.exitcode is not None:
                dead_since.setdefault(r, now)
                if now - dead_since[r] > 2.0:
                    err = f"{r} process died with exit code {p.exitcode} without a result"
        if err:
            break
    grace = 5.0 if err is None else 1.0
    for p in procs.values():
        p.join(grace)
        if p.is_alive():
            p.terminate()
            p.join(3)
        if p.is_alive():
            p.kill()
            p.join(3)
    for qq in (resq, q):
        qq.close()
        qq.cancel_join_thread()
    return results, err


def _err_text(results, err):
    for status, payload in results.values():
        if status != "ok":
            return f"{status}: {str(payload).strip().splitlines()[-1][:300]}"
    return err or "unknown error"


def _status_of(results):
    if any(st == "unavailable" for st, _ in results.values()):
        return "unavailable"
    return "error"


def measure_iperf3(secs, reps, t_op):
    exe = shutil.which("iperf3")
    if not exe:
        return {
            "status": "skipped",
            "note": "iperf3 not installed (scripts/setup.sh installs it)",
        }
    rates, notes = [], []
    for _ in range(reps):
        port = str(free_port())
        srv = subprocess.Popen(
            [exe, "-s", "-1", "-B", HOST, "-p", port],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            j = None
            for _attempt in range(40):  # the server needs a moment to listen; -1 survives failed connects
                try:
                    cp = subprocess.run(
                        [exe, "-c", HOST, "-p", port, "-t", str(secs), "-J"],
                        capture_output=True,
                        text=True,
                        timeout=secs + t_op,
                    )
                except subprocess.TimeoutExpired:
                    notes.append("iperf3 client timed out")
                    break
                try:
                    j = json.loads(cp.stdout)
                except ValueError:
                    j = {"error": (cp.stderr or cp.stdout).strip()[-200:]}
                if "error" in j and "connect" in str(j["error"]) and srv.poll() is None:
                    time.sleep(0.1)
                    continue
                break
            if j and "error" not in j:
                rates.append(j["end"]["sum_received"]["bits_per_second"] / 8e9)
            elif j:
                notes.append(str(j["error"])[:200])
        finally:
            try:
                srv.wait(timeout=5)
            except subprocess.TimeoutExpired:
                srv.kill()
                srv.wait(5)
    if not rates:
        return {"status": "error", "note": "; ".join(notes) or "no result"}
    return {
        "status": "ok",
        "GBps": rates,
        "note": f"-t {secs}, one stream, receiver rate" + ("; " + "; ".join(notes) if notes else ""),
    }


def measure_tp(ctx, name, nbytes, reps, t_op, deadline, tmpdir):
    if name in ("sockets_tcp", "sockets_unix"):
        fam = "tcp" if name == "sockets_tcp" else "unix"
        path = os.path.join(tmpdir, f"tp-{time.monotonic_ns()}.sock")
        a = (fam, path, nbytes, reps, t_op)
        results, err = run_pair(ctx, sock_tp_recv, a, sock_tp_send, a, {}, deadline)
    elif name == "zmq_tcp":
        a = (nbytes, reps, t_op)
        results, err = run_pair(ctx, zmq_tp_recv, a, zmq_tp_send, a, {}, deadline)
    elif name == "gloo":
        port = free_port()
        results, err = run_pair(
            ctx,
            gloo_tp,
            (1, port, nbytes, reps, t_op),
            gloo_tp,
            (0, port, nbytes, reps, t_op),
            {},
            deadline,
        )
    else:
        env = {"PARALLEL_SHM": "1" if name == "ours_shm" else "0"}
        a = (nbytes, reps, t_op)
        results, err = run_pair(ctx, ours_tp_recv, a, ours_tp_send, a, env, deadline)
    if err:
        return {"status": _status_of(results), "note": _err_text(results, err)}
    row = {"status": "ok"}
    row.update(results["server"][1])
    row.update(results["client"][1])
    row["cpu_s_per_GB"] = (row["server_cpu_s"] + row["client_cpu_s"]) / ((reps + 1) * nbytes / 1e9)
    return row


def measure_rtt(ctx, name, warm, n, reps, t_op, deadline, tmpdir):
    total = warm + n * reps
    if name in ("sockets_tcp", "sockets_unix"):
        fam = "tcp" if name == "sockets_tcp" else "unix"
        path = os.path.join(tmpdir, f"rtt-{time.monotonic_ns()}.sock")
        results, err = run_pair(
            ctx,
            sock_rtt_echo,
            (fam, path, total, t_op),
            sock_rtt_ping,
            (fam, path, warm, n, reps, t_op),
            {},
            deadline,
        )
    elif name == "zmq_tcp":
        results, err = run_pair(
            ctx,
            zmq_rtt_echo,
            (total, t_op),
            zmq_rtt_ping,
            (warm, n, reps, t_op),
            {},
            deadline,
        )
    elif name == "gloo":
        port = free_port()
        results, err = run_pair(
            ctx,
            gloo_rtt,
            (1, port, warm, n, reps, t_op),
            gloo_rtt,
            (0, port, warm, n, reps, t_op),
            {},
            deadline,
        )
    else:
        env = {"PARALLEL_SHM": "1" if name == "ours_shm" else "0"}
        results, err = run_pair(
            ctx,
            ours_rtt_echo,
            (total, t_op),
            ours_rtt_ping,
            (warm, n, reps, t_op),
            env,
            deadline,
        )
    if err:
        return {"status": _status_of(results), "note": _err_text(results, err)}
    row = {"status": "ok"}
    row.update(results["server"][1])
    row.update(results["client"][1])
    row["cpu_us_per_rt"] = (row["server_cpu_s"] + row["client_cpu_s"]) / total * 1e6
    return row


def merge_tp(runs):
    """Pools the rates of several runs of one row into a summary."""
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return dict(runs[-1]) if runs else {"status": "skipped"}
    rates = [x for r in ok for x in r["GBps"]]
    out = {k: v for k, v in ok[-1].items() if k != "GBps"}
    out.update(
        GBps=rates,
        median_GBps=statistics.median(rates),
        min_GBps=min(rates),
        max_GBps=max(rates),
        cpu_s_per_GB=statistics.median(r["cpu_s_per_GB"] for r in ok) if "cpu_s_per_GB" in ok[0] else None,
        runs_ok=len(ok),
        runs=len(runs),
    )
    if len(ok) < len(runs):
        out["note"] = (out.get("note", "") + f"; {len(runs) - len(ok)} run(s) failed").lstrip("; ")
    return out


def merge_rtt(runs):
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        return dict(runs[-1]) if runs else {"status": "skipped"}
    samples = sorted(x for r in ok for x in r["samples_us"])
    rep_meds = [x for r in ok for x in r["rep_medians_us"]]
    out = {k: v for k, v in ok[-1].items() if k not in ("samples_us", "rep_medians_us")}
    out.update(
        n_samples=len(samples),
        median_us=statistics.median(samples),
        p10_us=pct(samples, 0.10),
        p90_us=pct(samples, 0.90),
        p99_us=pct(samples, 0.99),
        min_us=samples[0],
        rep_medians_us=rep_meds,
        rep_median_min_us=min(rep_meds),
        rep_median_max_us=max(rep_meds),
        cpu_us_per_rt=statistics.median(r["cpu_us_per_rt"] for r in ok),
        runs_ok=len(ok),
        runs=len(runs),
    )
    return out


# ----------------------------------------------------------------------------------------------
# machine description, probe of torch_parallel

PROBE = r"""
import json, sys
out = {}
try:
    import torch_parallel as p
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
else:
    out["version"] = getattr(p, "__version__", None)
    try:
        cfg = p.config()
        out["config"] = cfg if isinstance(cfg, dict) else str(cfg)
    except Exception as e:
        out["config_error"] = f"{type(e).__name__}: {e}"
    try:
        out["io_backend"] = str(p.io_backend())
    except Exception as e:
        out["io_backend_error"] = f"{type(e).__name__}: {e}"
print("PROBE" + json.dumps(out, default=str))
"""


def probe_ours(timeout=90):
    return run_probe(PROBE, timeout, "import torch_parallel")


def machine_info():
    info = base_machine_info()
    for mod in ("torch", "zmq", "numpy"):
        try:
            m = __import__(mod)  # only for versions; the children import their own copies
            info[mod if mod != "zmq" else "pyzmq"] = m.__version__
            if mod == "zmq":
                info["libzmq"] = m.zmq_version()
        except Exception as e:
            info[mod] = f"unavailable ({type(e).__name__})"
    iperf = shutil.which("iperf3")
    info["iperf3"] = (cmd([iperf, "--version"]).splitlines() or ["?"])[0] if iperf else "not installed"
    return info


def io_backend(probe, rows):
    """torch_parallel.io_backend() as the probe subprocess saw it, then PARALLEL_IO from config()
    and any io/backend key in ours' stats."""
    found = []
    if probe.get("io_backend"):
        found.append(str(probe["io_backend"]))
    elif probe.get("io_backend_error"):
        found.append(f"io_backend() failed ({probe['io_backend_error']})")
    cfg = probe.get("config")
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k.lower() in ("io", "parallel_io", "io_backend"):
                found.append(f"config {k}={v}")
    for name in OURS:
        st = rows.get(name, {}).get("client_stats")
        if isinstance(st, dict):
            for k, v in st.items():
                if "backend" in k.lower() or k.lower() in ("io", "io_backend"):
                    found.append(f"{name} stats {k}={v}")
    return "; ".join(dict.fromkeys(found)) or "unknown"


# ----------------------------------------------------------------------------------------------
# report


def _f(x, fmt):
    return "-" if x is None else format(x, fmt)


def tp_table(rows, order, nbytes):
    lines = [
        "| system | link | size | reps | median GB/s | range GB/s | Gbit/s | CPU s/GB | note |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        r = rows.get(name)
        if r is None:
            continue
        if r.get("status") == "ok":
            link = r.get("link", "")
            if name.startswith("ours"):
                link = str(link)
            else:
                link = {"iperf3": "tcp", "sockets_unix": "unix"}.get(name, "tcp")
            size = f"{nbytes // MiB} MiB" if name != "iperf3" else "stream"
            lines.append(
                f"| {name} | {link} | {size} | {len(r['GBps'])} | {r['median_GBps']:.2f} | "
                f"{r['min_GBps']:.2f}-{r['max_GBps']:.2f} | {r['median_GBps'] * 8:.1f} | "
                f"{_f(r.get('cpu_s_per_GB'), '.2f')} | {r.get('note', '')} |"
            )
        else:
            lines.append(f"| {name} | - | - | - | - | - | - | - | {r.get('status')}: {r.get('note', '')} |")
    return lines


def rtt_table(rows, order):
    lines = [
        "| system | link | round trips | median us | p10 us | p90 us | p99 us | rep medians us | CPU us/RT "
        "| note |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in order:
        r = rows.get(name)
        if r is None:
            continue
        if r.get("status") == "ok":
            link = (
                str(r.get("link", "")) if name.startswith("ours") else ("unix" if "unix" in name else "tcp")
            )
            lines.append(
                f"| {name} | {link} | {r['n_samples']} | {r['median_us']:.1f} | {r['p10_us']:.1f} | "
                f"{r['p90_us']:.1f} | {r['p99_us']:.1f} | "
                f"{r['rep_median_min_us']:.1f}-{r['rep_median_max_us']:.1f} | "
                f"{_f(r.get('cpu_us_per_rt'), '.1f')} | {r.get('note', '')} |"
            )
        else:
            lines.append(
                f"| {name} | - | - | - | - | - | - | - | - | {r.get('status')}: {r.get('note', '')} |"
            )
    return lines


def ratios(tp, lat):
    """Throughput: ours / peer (>1: ours faster). Round trip: ours / peer (<1: ours faster)."""
    out = {"throughput": {}, "rtt": {}}

    def med(rows, name, key):
        r = rows.get(name) or {}
        return r.get(key) if r.get("status") == "ok" else None

    pairs = [("ours_tcp", "iperf3"), ("ours_shm", "ours_tcp")]
    pairs += [(o, p) for o in OURS for p in ("iperf3", "sockets_tcp", "sockets_unix", "zmq_tcp", "gloo")]
    for a, b in dict.fromkeys(pairs):
        x, y = med(tp, a, "median_GBps"), med(tp, b, "median_GBps")
        if x is not None and y is not None:
            out["throughput"][f"{a} / {b}"] = x / y
    pairs = [("ours_shm", "ours_tcp")] + [
        (o, p) for o in OURS for p in ("sockets_tcp", "sockets_unix", "zmq_tcp", "gloo")
    ]
    for a, b in pairs:
        x, y = med(lat, a, "median_us"), med(lat, b, "median_us")
        if x is not None and y is not None:
            out["rtt"][f"{a} / {b}"] = x / y
    return out


def render(report):
    m, a = report["machine"], report["args"]
    nbytes = a["size_mib"] * MiB
    L = ["## Transport benchmark (Client/Server)", ""]
    L.append(f"Run {report['started']} ({report['elapsed_s']:.0f} s), `{report['command']}`.")
    L.append("")
    L.append("Machine:")
    L.append(
        f"- {m.get('nproc')} CPUs ({m.get('usable_cpus')} usable), {m.get('mem_GiB')} GiB, "
        f"kernel {m.get('kernel')}, "
        f"THP {m.get('thp', '?')}; CPU: {m.get('cpu_model', '?')}"
    )
    L.append(
        f"- Python {m.get('python')}, torch {m.get('torch')}, "
        f"pyzmq {m.get('pyzmq')} / libzmq {m.get('libzmq')}, "
        f"numpy {m.get('numpy')}, {m.get('iperf3')}"
    )
    ours = report["torch_parallel"]
    if "error" in ours:
        L.append(f"- torch_parallel: not built ({ours['error']})")
    else:
        ver = ours.get("version") or "(no __version__)"
        L.append(f"- torch_parallel {ver}, io backend: {report['io_backend']}, git {m.get('git')}")
    L.append(
        f"- load average at start / end: {' '.join(m.get('loadavg_start', []))} / "
        f"{' '.join(m.get('loadavg_end', []))}"
    )
    L.append("")
    L.append(
        f"### (a) Throughput, one {a['size_mib']} MiB message client -> server, loopback "
        f"({a['reps']} timed reps after 1 warm-up, x {a['runs']} run(s); 1 GB/s = 1e9 B/s)"
    )
    L.append("")
    L += tp_table(report["throughput"], list(TP_ROWS.values()), nbytes)
    L.append("")
    L.append(
        f"### (b) Round trip of an 8-byte message, a bytes object (gloo: a uint8 tensor) "
        f"({a['rtt_warm']} warm-up, then {a['rtt_reps']} x {a['rtt_n']} timed, x {a['runs']} run(s))"
    )
    L.append("")
    L += rtt_table(report["rtt"], list(LAT_ROWS.values()))
    L.append("")
    states = report.get("core") or {}
    if states:
        L.append(
            "Where the two CPUs were around each run (`benches/probes/core_rtt.c`, a cache line passed "
            "between them, right before / right after; near: both under 150 ns, sharing a cache): "
            + "; ".join(f"{k}: " + ", ".join(fmt_core(c) for c in v) for k, v in states.items())
            + "."
        )
        L.append("")
    L.append("### Ratios")
    L.append("")
    rt = report["ratios"]
    if rt["throughput"]:
        L.append("Throughput, median over median (> 1: the first is faster):")
        L += [f"- {k} = {v:.2f}" for k, v in rt["throughput"].items()]
    if rt["rtt"]:
        L.append("")
        L.append("Round-trip time, median over median (< 1: the first is faster):")
        L += [f"- {k} = {v:.2f}" for k, v in rt["rtt"].items()]
    if not rt["throughput"] and not rt["rtt"]:
        L.append("- none (ours did not run)")
    L.append("")
    L.append(
        "Method: every row runs its two ends as two fresh processes; throughput rows time, on the sender, "
        "one message plus a 1-byte ack (the ping-pong method of plain socket benchmarks); ours receives with "
        "`recv(out=preallocated)`; iperf3 reports its receiver's rate over the whole stream. "
        "Ranges are the min-max of single reps. CPU = user + system time of both processes (all threads) "
        "over the measured loop, warm-up included, per GB moved or per round trip; it shows what spinning "
        "costs (ours polls PARALLEL_SPIN_US before parking)."
    )
    return "\n".join(L) + "\n"


def print_console(report):
    nbytes = report["args"]["size_mib"] * MiB

    def plain(lines):
        for ln in lines:
            if ln.startswith("|---"):
                continue
            cells = [c.strip() for c in ln.strip("|").split("|")]
            yield cells

    for title, lines in (
        (
            "Throughput (GB/s = 1e9 B/s)",
            tp_table(report["throughput"], list(TP_ROWS.values()), nbytes),
        ),
        (
            "Round trip, 8-byte message (us)",
            rtt_table(report["rtt"], list(LAT_ROWS.values())),
        ),
    ):
        rows = list(plain(lines))
        if len(rows) <= 1:
            continue
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"\n{title}")
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    rt = report["ratios"]
    if rt["throughput"] or rt["rtt"]:
        print("\nRatios (throughput: >1 = first faster; round trip: <1 = first faster)")
        for k, v in rt["throughput"].items():
            print(f"  throughput {k:28s} {v:6.2f}")
        for k, v in rt["rtt"].items():
            print(f"  rtt        {k:28s} {v:6.2f}")


# ----------------------------------------------------------------------------------------------


def parse_only(spec):
    keys = set()
    for k in filter(None, (x.strip() for x in spec.split(","))):
        if k in ALIASES:
            keys.update(ALIASES[k])
        elif k in TP_ROWS:
            keys.add(k)
        else:
            raise SystemExit(f"--only: unknown key {k!r} (use {', '.join([*TP_ROWS, *ALIASES])})")
    return keys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 64 MiB, 2 reps, 300 round trips x 2, < 60 s",
    )
    ap.add_argument(
        "--only",
        default="",
        help="comma list of: iperf3 sockets unix zmq gloo tcp shm | ours | peers",
    )
    ap.add_argument("--parts", default="throughput,rtt", help="throughput, rtt or both")
    ap.add_argument(
        "--size-mib",
        type=int,
        default=None,
        help="message size for (a) (default 256; quick 64)",
    )
    ap.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed messages per run for (a) (default 5; quick 2)",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="fresh process pairs per row, rows interleaved (default 1)",
    )
    ap.add_argument(
        "--rtt-n",
        type=int,
        default=None,
        help="round trips per rep (default 2000; quick 300)",
    )
    ap.add_argument(
        "--rtt-reps",
        type=int,
        default=None,
        help="reps of --rtt-n round trips (default 5; quick 2)",
    )
    ap.add_argument(
        "--rtt-warm",
        type=int,
        default=None,
        help="warm-up round trips (default 500; quick 100)",
    )
    ap.add_argument("--iperf-secs", type=int, default=None, help="iperf3 -t (default 3; quick 1)")
    ap.add_argument(
        "--iperf-reps",
        type=int,
        default=None,
        help="iperf3 runs (default = --reps; quick 1)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="deadline per process pair, s (default: from sizes)",
    )
    ap.add_argument("--json", default="bench-out/transport.json")
    ap.add_argument("--md", default="bench-out/transport.md")
    a = ap.parse_args()

    q = a.quick
    a.size_mib = a.size_mib or (64 if q else 256)
    a.reps = a.reps or (2 if q else 5)
    a.rtt_n = a.rtt_n or (300 if q else 2000)
    a.rtt_reps = a.rtt_reps or (2 if q else 5)
    a.rtt_warm = a.rtt_warm if a.rtt_warm is not None else (100 if q else 500)
    a.iperf_secs = a.iperf_secs or (1 if q else 3)
    a.iperf_reps = a.iperf_reps or (1 if q else a.reps)
    if a.size_mib < 1 or a.reps < 1 or a.rtt_n < 1 or a.rtt_reps < 1 or a.runs < 1:
        raise SystemExit("sizes and counts must be >= 1")
    keys = parse_only(a.only) if a.only else set(TP_ROWS)
    parts = {p.strip() for p in a.parts.split(",") if p.strip()}
    if not parts <= {"throughput", "rtt"}:
        raise SystemExit("--parts: throughput, rtt")

    nbytes = a.size_mib * MiB
    t_op = max(10.0, nbytes / 50e6)  # per blocking call: 50 MB/s would be pathological
    tp_deadline = a.timeout or (45 + (a.reps + 1) * t_op)
    rtt_total = a.rtt_warm + a.rtt_n * a.rtt_reps
    rtt_deadline = a.timeout or (45 + rtt_total * 0.003)

    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    t_start = time.monotonic()
    machine = machine_info()
    want_ours = bool(keys & {"tcp", "shm"})
    probe = probe_ours() if want_ours else {"error": "not selected"}
    if want_ours and "error" in probe:
        print(
            f"torch_parallel not built ({probe['error']}); our rows are skipped",
            flush=True,
        )

    ctx = mp.get_context("spawn")
    tp_runs = {TP_ROWS[k]: [] for k in TP_ROWS if k in keys} if "throughput" in parts else {}
    rtt_runs = {LAT_ROWS[k]: [] for k in LAT_ROWS if k in keys} if "rtt" in parts else {}
    # Where the two CPUs were around each run of each row (benches/probes/core_rtt.c).
    core = {("throughput", n): [] for n in tp_runs} | {("rtt", n): [] for n in rtt_runs}
    tmpdir = tempfile.mkdtemp(prefix="parallel-bench-")
    try:
        for run in range(a.runs):
            for name in tp_runs:
                tag = f"[run {run + 1}/{a.runs}] throughput {name}"
                print(f"{tag} ...", end=" ", flush=True)
                t0 = time.monotonic()
                before = core_probe()
                if name in OURS and "error" in probe:
                    r = {"status": "unavailable", "note": "torch_parallel not built"}
                elif name == "iperf3":
                    r = measure_iperf3(a.iperf_secs, a.iperf_reps, t_op)
                else:
                    r = measure_tp(ctx, name, nbytes, a.reps, t_op, tp_deadline, tmpdir)
                after = core_probe()
                core[("throughput", name)].append(core_record(before, after))
                tp_runs[name].append(r)
                if r["status"] == "ok":
                    print(
                        f"median {statistics.median(r['GBps']):.2f} GB/s ({time.monotonic() - t0:.1f} s; "
                        f"CPUs {fmt_core(core[('throughput', name)][-1])})",
                        flush=True,
                    )
                else:
                    print(f"{r['status']}: {r.get('note', '')}", flush=True)
            for name in rtt_runs:
                tag = f"[run {run + 1}/{a.runs}] round trip {name}"
                print(f"{tag} ...", end=" ", flush=True)
                t0 = time.monotonic()
                before = core_probe()
                if name in OURS and "error" in probe:
                    r = {"status": "unavailable", "note": "torch_parallel not built"}
                else:
                    r = measure_rtt(
                        ctx,
                        name,
                        a.rtt_warm,
                        a.rtt_n,
                        a.rtt_reps,
                        t_op,
                        rtt_deadline,
                        tmpdir,
                    )
                after = core_probe()
                core[("rtt", name)].append(core_record(before, after))
                rtt_runs[name].append(r)
                if r["status"] == "ok":
                    s = sorted(r["samples_us"])
                    print(
                        f"median {statistics.median(s):.1f} us, p90 {pct(s, 0.9):.1f} us "
                        f"({time.monotonic() - t0:.1f} s; CPUs {fmt_core(core[('rtt', name)][-1])})",
                        flush=True,
                    )
                else:
                    print(f"{r['status']}: {r.get('note', '')}", flush=True)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)

    tp = {k: merge_tp(v) for k, v in tp_runs.items()}
    lat = {k: merge_rtt(v) for k, v in rtt_runs.items()}
    for name in OURS:  # say so when the shm row did not actually get a shared-memory link
        for rows in (tp, lat):
            r = rows.get(name)
            if r and r.get("status") == "ok":
                want = "shm" if name == "ours_shm" else "tcp"
                if str(r.get("link")) != want:
                    r["note"] = (r.get("note", "") + f"; link is {r.get('link')!r}, not {want!r}").lstrip(
                        "; "
                    )
                if rows is tp and r.get("recv_into_out") is False:
                    r["note"] = (r.get("note", "") + "; recv(out=) returned another tensor").lstrip("; ")
    machine["loadavg_end"] = read_text("/proc/loadavg").split()[:3]
    report = {
        "started": started,
        "elapsed_s": time.monotonic() - t_start,
        "command": " ".join(
            [
                os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable,
                *sys.argv,
            ]
        ),
        "args": vars(a),
        "machine": machine,
        "torch_parallel": probe,
        "io_backend": io_backend(probe, tp | lat),
        "units": {"throughput": "GB/s, 1e9 B/s", "rtt": "microseconds"},
        "throughput": tp,
        "rtt": lat,
        "core": {f"{part} {name}": v for (part, name), v in core.items()},
        "ratios": ratios(tp, lat),
    }
    print_console(report)
    for path, text in (
        (a.json, json.dumps(report, indent=1, default=str)),
        (a.md, render(report)),
    ):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text + ("\n" if not text.endswith("\n") else ""))
    print(f"\nwrote {a.json} and {a.md} ({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()

"""Randomized fault loop (issue 11): a victim server process serves a good client whose data is
checked end to end, while each round one hostile action, chosen at random, hits the victim:

- kill: a real client process starts sending a 32 MiB message and is killed with SIGKILL mid-message;
- stall: a raw socket sends a prefix of a real client's byte stream and then holds the connection;
- truncate: a raw socket sends a prefix of a real client's stream and closes;
- garbage: a raw socket sends a prefix of a real client's stream and then random bytes;
- flood: 100 raw sockets connect at once, half of them send random bytes, held for the round.

The real client's byte stream is recorded once through a TCP proxy (PARALLEL_SHM=0), so prefixes
cut inside the handshake, a frame header, a descriptor or a payload. Asserted: 0 hangs (every good
message is acknowledged within ACK_TIMEOUT), 0 crashes of the victim, 0 corrupt deliveries (the
victim checks each good message's digest, the client checks the echo bitwise).
20 rounds by default; 100 with TP_TEST_LONG=1 (or --long where tests/differential's conftest is loaded).
TP_FAULT_SEED=N reruns a seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

import torch_parallel as parallel

HERE = Path(__file__).resolve().parent
VICTIM = str(HERE / "fault_victim.py")
ACK_TIMEOUT = 20.0
# Issue 11 #3 (head-of-line blocking: a connection stalled mid-frame blocks recv_any for every
# other client) is being fixed on another branch; on main 2 of 4 stall rounds leave a good message
# unanswered for 20 s. Switch this on once that fix is merged (or run with TP_FAULT_STALL=1).
STALL_FIXED = True
ACTIONS = ["kill", "stall", "truncate", "garbage", "flood"]
if not (STALL_FIXED or os.environ.get("TP_FAULT_STALL") == "1"):
    ACTIONS.remove("stall")

KILLED_CLIENT = """
import sys, torch, torch_parallel as p
c = p.client("127.0.0.1", int(sys.argv[1]), timeout=30)
big = torch.randn(8 << 20)
print("sending", flush=True)
while True:
    c.send({"evil": big})
"""

RECORDED_CLIENT = """
import sys, time, torch, torch_parallel as p
c = p.client("127.0.0.1", int(sys.argv[1]), timeout=30)
c.send({"recorded": torch.arange(100000, dtype=torch.float32), "s": "x" * 100})
time.sleep(0.5)
c.close()
"""


def long_mode(config: pytest.Config) -> bool:
    try:
        if config.getoption("--long"):
            return True
    except ValueError:
        pass
    return os.environ.get("TP_TEST_LONG", "") not in ("", "0")


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def record_client_stream(port: int) -> bytes:
    """The bytes a real TCP client sends to the victim, recorded through a forwarding proxy."""
    lst = socket.create_server(("127.0.0.1", 0))
    recorded = bytearray()

    def pump(src: socket.socket, dst: socket.socket, keep: bool) -> None:
        try:
            while True:
                b = src.recv(65536)
                if not b:
                    break
                if keep:
                    recorded.extend(b)
                dst.sendall(b)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def serve() -> None:
        c, _ = lst.accept()
        with c, socket.create_connection(("127.0.0.1", port)) as up:
            t = threading.Thread(target=pump, args=(up, c, False), daemon=True)
            t.start()
            pump(c, up, True)
            t.join(5)

    th = threading.Thread(target=serve, daemon=True)
    th.start()
    env = dict(os.environ, PARALLEL_SHM="0")
    p = subprocess.run(
        [sys.executable, "-c", RECORDED_CLIENT, str(lst.getsockname()[1])],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    th.join(10)
    lst.close()
    assert p.returncode == 0, p.stderr
    assert len(recorded) > 400_000, len(recorded)
    return bytes(recorded)


class Hostile:
    """One hostile action against the victim's port; start(), then stop() after the good round."""

    def __init__(self, kind: str, port: int, stream: bytes, rng: random.Random) -> None:
        self.kind, self.port, self.stream, self.rng = kind, port, stream, rng
        self.socks: list[socket.socket] = []
        self.proc: subprocess.Popen[str] | None = None

    def prefix(self) -> bytes:
        cut = self.rng.choice(
            [self.rng.randint(0, 64), self.rng.randint(0, 4096), self.rng.randint(0, len(self.stream))]
        )
        return self.stream[:cut]

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        self.socks.append(s)
        return s

    def send(self, s: socket.socket, data: bytes) -> None:
        try:
            s.sendall(data)
        except OSError:
            pass  # the victim may drop us: that is its right

    def start(self) -> None:
        k = self.kind
        if k == "kill":
            env = dict(os.environ, PARALLEL_SHM=self.rng.choice(["0", "1"]))
            self.proc = subprocess.Popen(
                [sys.executable, "-c", KILLED_CLIENT, str(self.port)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            assert self.proc.stdout is not None
            self.proc.stdout.readline()
            time.sleep(self.rng.uniform(0.0, 0.3))
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
            self.proc.stdout.close()
        elif k in ("stall", "truncate", "garbage"):
            s = self.connect()
            self.send(s, self.prefix())
            if k == "garbage":
                self.send(s, self.rng.randbytes(self.rng.randint(1, 65536)))
            if k != "stall":
                self.stop()
        elif k == "flood":
            for _ in range(100):
                try:
                    s = self.connect()
                except OSError:
                    continue
                if self.rng.random() < 0.5:
                    self.send(s, self.rng.randbytes(self.rng.randint(1, 2048)))

    def stop(self) -> None:
        for s in self.socks:
            s.close()
        self.socks.clear()


def good_round(client: parallel.Client, seq: int, rng: random.Random, stats: dict[str, Any]) -> None:
    """Three checked messages; an ack missing after ACK_TIMEOUT is a hang."""
    for _ in range(3):
        seq += 1
        n = rng.choice([0, 1, 1000, 100_000, 1 << 20])
        data = torch.randn(n) if rng.random() < 0.5 else torch.randint(-100, 100, (n,), dtype=torch.int16)
        t0 = time.monotonic()
        client.send({"good": seq, "data": data, "digest": digest(data)}, timeout=ACK_TIMEOUT)
        while True:
            left = ACK_TIMEOUT - (time.monotonic() - t0)
            try:
                reply = client.recv(timeout=max(0.1, left))
            except parallel.Timeout:
                stats["hangs"].append((seq, stats["action"]))
                return
            if isinstance(reply, dict) and reply.get("ack") == seq:
                break
        stats["max_ack_s"] = max(stats["max_ack_s"], time.monotonic() - t0)
        got = reply.get("data")
        if not isinstance(got, torch.Tensor) or got.dtype != data.dtype or digest(got) != digest(data):
            stats["corrupt"].append(seq)
        stats["good"] += 1


def test_random_faults_cause_no_hang_no_crash_no_corrupt_delivery(pytestconfig: pytest.Config) -> None:
    rounds = 100 if long_mode(pytestconfig) else 20
    seed = int(os.environ.get("TP_FAULT_SEED", "11"))
    rng = random.Random(seed)
    stats: dict[str, Any] = {"hangs": [], "corrupt": [], "good": 0, "max_ack_s": 0.0, "actions": Counter()}
    with tempfile.TemporaryDirectory(prefix="tp-fault-") as d:
        report_path = os.path.join(d, "victim.json")
        victim = subprocess.Popen(
            [sys.executable, VICTIM, report_path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert victim.stdout is not None
            port = int(victim.stdout.readline())
            stream = record_client_stream(port)
            client = parallel.client("127.0.0.1", port, timeout=30)
            crashed = None
            t_start = time.monotonic()
            for r in range(rounds):
                kind = rng.choice(ACTIONS)
                stats["actions"][kind] += 1
                h = Hostile(kind, port, stream, rng)
                stats["action"] = kind
                h.start()
                good_round(client, 3 * r, rng, stats)
                h.stop()
                if victim.poll() is not None:
                    crashed = (r, kind, victim.returncode)
                    break
                if len(stats["hangs"]) >= 3:
                    break  # each costs ACK_TIMEOUT; three are enough to report
            elapsed = time.monotonic() - t_start
            if crashed is None and len(stats["hangs"]) < 3:
                client.send("stop", timeout=10)
                while client.recv(timeout=ACK_TIMEOUT) != "stopped":
                    pass  # acks of messages the round gave up on
                victim.wait(60)
            client.close()
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.wait()
        err = victim.stderr.read() if victim.stderr else ""
        for f in (victim.stdout, victim.stderr):
            if f:
                f.close()
        report = json.loads(Path(report_path).read_text()) if os.path.exists(report_path) else {}
    summary = (
        f"seed {seed}: {rounds} rounds in {elapsed:.1f}s, actions {dict(stats['actions'])}, "
        f"good messages {stats['good']}, hangs {stats['hangs']}, corrupt (client) {stats['corrupt']}, "
        f"victim {report}, slowest ack {stats['max_ack_s']:.2f}s"
    )
    print(summary)
    assert crashed is None, (
        f"the victim died (round, action, exit status) {crashed}: {err[-2000:]}\n{summary}"
    )
    assert not stats["hangs"], f"good messages not acknowledged within {ACK_TIMEOUT}s: {summary}"
    assert not stats["corrupt"] and not report.get("corrupt"), summary
    assert victim.returncode == 0 and report, f"victim exit {victim.returncode}: {err[-2000:]}\n{summary}"
    assert report["good"] == stats["good"] == 3 * rounds, summary
    assert report["errors"].get("timeout (nothing for 120 s)", 0) == 0, summary

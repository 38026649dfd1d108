"""Server/Client behaviour: timeouts, close, tags, broadcast, async, stats, config."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest
import torch

import torch_parallel as parallel


def test_timeouts_name_the_peer_and_leave_the_link_usable(pair):
    s, c, conn = pair
    t0 = time.monotonic()
    with pytest.raises(parallel.Timeout) as ei:
        c.recv(timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert isinstance(ei.value, TimeoutError) and "127.0.0.1" in str(ei.value)
    with pytest.raises(TimeoutError):
        s.recv_any(timeout=0.1)
    conn.send("ok")
    assert c.recv(timeout=10) == "ok"


def test_close_from_another_thread_wakes_blocked_calls(pair):
    s, c, _ = pair
    errors: list[BaseException] = []

    def block(f):
        try:
            f()
        except BaseException as e:  # noqa: BLE001 - collected for the assertion
            errors.append(e)

    threads = [
        threading.Thread(target=block, args=(lambda: c.recv(timeout=30),)),
        threading.Thread(target=block, args=(lambda: s.recv_any(timeout=30),)),
    ]
    for t in threads:
        t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    c.close()
    s.close()
    for t in threads:
        t.join(5)
    assert time.monotonic() - t0 < 2
    assert len(errors) == 2 and all(isinstance(e, parallel.Closed) for e in errors), errors
    with pytest.raises(parallel.Closed):
        c.send(1)


def test_orderly_close_is_closed(pair):
    _, c, conn = pair
    c.close()
    with pytest.raises(parallel.Closed):
        conn.recv(timeout=10)
    assert conn.closed


def test_context_managers():
    with parallel.server("127.0.0.1", 0) as s, parallel.client("127.0.0.1", s.port) as c:
        c.send(1)
        assert s.recv_any(timeout=10) == 1
    assert s.closed and c.closed


def test_clients_tags_ids_and_broadcast():
    s = parallel.server("127.0.0.1", 0)
    cs = [parallel.client("127.0.0.1", s.port) for _ in range(3)]
    seen: list[int] = []

    def tag(conn: parallel.Connection) -> None:
        seen.append(conn.id)
        conn.tag = "odd" if conn.id % 2 else "even"

    assert s.clients(3, tag, timeout=10) == 3
    assert seen == sorted(seen)
    assert s.broadcast("all") == 3
    assert [c.recv(timeout=10) for c in cs] == ["all"] * 3
    odd = s.broadcast(torch.ones(2), tag="odd")
    assert odd == sum(1 for i in seen if i % 2)
    got = 0
    for c in cs:
        try:
            assert torch.equal(c.recv(timeout=0.3), torch.ones(2))
            got += 1
        except parallel.Timeout:
            pass
    assert got == odd
    for c in cs:
        c.send("x")
    conns = {conn.id: conn for conn in s.connections()}
    for _ in range(3):
        v, conn = s.recv_any_from(timeout=10)
        assert v == "x" and conn.id in conns
    assert s.clients(0, lambda c: None, tag="even") == 3 - odd
    s.close()
    for c in cs:
        c.close()


def test_recv_any_is_fair():
    s = parallel.server("127.0.0.1", 0)
    a = parallel.client("127.0.0.1", s.port)
    b = parallel.client("127.0.0.1", s.port)
    s.wait_for(2, timeout=10)
    for i in range(100):
        a.send(i)
    b.send("b")
    order = [s.recv_any(timeout=10) for _ in range(101)]
    assert order.index("b") < 5
    s.close()


def test_async_handles(pair):
    _, c, conn = pair
    h = conn.recv_async(timeout=10, out=torch.empty(4))
    assert not h.done()
    c.send_async(torch.arange(4.0)).wait(10)
    got = h.wait(10)
    assert h.done() and torch.equal(got, torch.arange(4.0))
    hs = [c.send_async(i) for i in range(50)]
    for x in hs:
        x.wait(10)
    assert [conn.recv(timeout=10) for _ in range(50)] == list(range(50))
    with pytest.raises(parallel.Timeout):
        conn.recv_async(timeout=0.1).wait(10)


def test_stats(pair):
    s, c, conn = pair
    c.send(b"x" * 10000)
    conn.recv(timeout=10)
    cs, ss = c.stats(), s.stats()
    assert cs["msgs_sent"] == 1 and cs["bytes_sent"] >= 10000
    assert ss["bytes_recv"] == cs["bytes_sent"] and ss["connections"] == 1
    # The peer is named by its address; over shm also by its pid, which the kernel vouches for
    # (SO_PEERCRED), never one the client claims.
    assert cs["link"] in ("tcp", "shm") and cs["peer"].startswith("127.0.0.1:")
    assert ("pid" in cs["peer"]) == (cs["link"] == "shm")
    assert cs["send_bandwidth"] > 0


def test_connect_failure_says_where_and_why():
    s = parallel.server("127.0.0.1", 0)
    port = s.port
    s.close()
    del s
    time.sleep(0.3)
    with pytest.raises(parallel.Timeout, match=f"127.0.0.1:{port}.*refused"):
        parallel.client("127.0.0.1", port, timeout=0.5)


def test_bad_timeout_argument():
    with pytest.raises(ValueError, match="timeout"):
        parallel.client("127.0.0.1", 1, timeout=-1)


def test_config_lists_every_variable_and_matches_the_docs():
    cfg = parallel.config()
    assert cfg["PARALLEL_IO"] in ("auto", "uring", "epoll")
    assert "PARALLEL_TIMEOUT" in cfg and "PARALLEL_SECRET" in cfg
    assert parallel.io_backend() in ("io_uring", "epoll")
    docs = pathlib.Path(__file__).resolve().parents[3] / "docs" / "environment.md"
    assert docs.read_text() == parallel._native.environment_markdown()
    for name in cfg:
        assert f"`{name}`" in docs.read_text()

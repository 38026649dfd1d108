"""Demo: a server and clients in separate processes exchanging values and a large tensor.

Each client process connects, sends a small value, then a large float32 tensor, and receives it
back; the server receives every tensor straight into a preallocated tensor (no copy) and echoes it.
Run twice: once over shared memory (same-host default) and once forced onto TCP (PARALLEL_SHM=0).

    python examples/demo.py [--clients 2] [--mib 256] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time


def client_main(port: int, index: int, mib: int, rounds: int, shm: str, q: mp.Queue) -> None:
    os.environ["PARALLEL_SHM"] = shm
    import torch

    import torch_parallel as parallel

    c = parallel.client("127.0.0.1", port, timeout=30)
    c.send({"hello": index, "pid": os.getpid(), "link": c.link})
    t = torch.full((mib << 18,), float(index), dtype=torch.float32)
    back = torch.empty_like(t)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        c.send(t, timeout=120)
        c.recv(timeout=120, out=back)
        times.append(time.perf_counter() - t0)
    ok = bool(torch.equal(back, t))
    q.put({"index": index, "link": c.link, "seconds": times, "ok": ok, "stats": c.stats()})
    c.close()


def run(clients: int, mib: int, rounds: int, shm: str) -> list[dict]:
    os.environ["PARALLEL_SHM"] = shm
    import torch

    import torch_parallel as parallel

    ctx = mp.get_context("spawn")
    server = parallel.server("127.0.0.1", 0)
    q: mp.Queue = ctx.Queue()
    procs = [
        ctx.Process(target=client_main, args=(server.port, i, mib, rounds, shm, q)) for i in range(clients)
    ]
    for p in procs:
        p.start()
    server.wait_for(clients, timeout=60)
    conns = server.connections()  # ordered by id (connection order)
    hellos = [conn.recv(timeout=60) for conn in conns]
    links = sorted({h["link"] for h in hellos})
    print(f"  server got hellos from clients {sorted(h['hello'] for h in hellos)} (links: {links})")
    buf = torch.empty(mib << 18, dtype=torch.float32)
    for _ in range(rounds):
        for conn in conns:
            conn.recv(timeout=120, out=buf)  # straight into the preallocated tensor
            conn.send(buf, timeout=120)  # and back
    results = [q.get(timeout=120) for _ in range(clients)]
    for p in procs:
        p.join(30)
    server.close()
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    for shm, name in (("1", "shared memory"), ("0", "TCP loopback")):
        print(f"{a.clients} client processes, {a.mib} MiB float32 tensor round trips, {name}:")
        res = run(a.clients, a.mib, a.rounds, shm)
        for r in sorted(res, key=lambda r: r["index"]):
            best = min(r["seconds"])
            gbps = 2 * (a.mib << 20) / best / 1e9
            print(
                f"  client {r['index']} ({r['link']}): round trip {best * 1e3:7.1f} ms best, "
                f"{statistics.median(r['seconds']) * 1e3:7.1f} ms median -> {gbps:5.2f} GB/s both ways, "
                f"data {'verified' if r['ok'] else 'WRONG'}"
            )
            if not r["ok"]:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

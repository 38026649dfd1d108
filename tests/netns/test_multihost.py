"""The Tree across simulated hosts: network namespaces on one machine (see netns.py).

Each namespace is a host to the Tree (host identity = boot id + network namespace), so links
between namespaces are TCP over veths and a bridge, and ranks inside one namespace share memory.
Skipped, with the reason, where namespaces cannot be created (not root, no iproute2, EPERM).
All traffic stays inside the namespaces (198.18.0.0/24, no route out).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import netns  # noqa: E402

import torch_parallel as parallel  # noqa: E402

WORKER = str(HERE / "multihost_worker.py")
PORT = 29500  # each namespace has its own ports, so a fixed one cannot collide with the machine's
DEADLINE = 60  # seconds for all ranks of one test, imports included (they usually take ~10 s)


def shm_enabled() -> bool:
    return parallel.config()["PARALLEL_SHM"] in ("1", "true", "yes", "on")


def network(hosts: int, rate: str | None = None) -> netns.Network:
    try:
        return netns.Network(hosts, rate=rate)
    except netns.NetnsUnavailable as e:
        pytest.skip(f"multi-host tests need network namespaces: {e}")


def run_tree(net: netns.Network, placement: list[int], scenario: str, env: dict[str, str] | None = None):
    """Starts rank r in host placement[r]; returns each rank's RESULT dict (asserting success)."""
    world = len(placement)
    root = f"{net.addr(placement[0])}:{PORT}"
    full_env = dict(os.environ)
    full_env.update(env or {})
    procs = [
        net.run_in(
            h,
            [sys.executable, WORKER, scenario, str(r), str(world), root],
            full_env,
            stdout=netns.subprocess.PIPE,
            stderr=netns.subprocess.PIPE,
            text=True,
        )
        for r, h in enumerate(placement)
    ]
    results = netns.wait_all(procs, timeout=DEADLINE)
    failures = [
        f"rank {r} (host {placement[r]}) rc={rc}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        for r, (rc, out, err) in enumerate(results)
        if rc != 0
    ]
    assert not failures, "\n".join(failures)
    parsed = []
    for _, out, _ in results:
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        assert line, out
        parsed.append(json.loads(line[-1][len("RESULT ") :]))
    return parsed


def parse_plan(text: str) -> tuple[list[list[int]], list[tuple[int, int, str]], list[int]]:
    """(hosts as rank lists, tree edges (parent, child, kind), ring order) from tree.plan()."""
    hosts: list[list[int]] = []
    edges: list[tuple[int, int, str]] = []
    ring: list[int] = []
    for line in text.splitlines():
        if m := re.match(r"\s*host (\d+) \(.*\): ranks \[([\d, ]*)\], leader (\d+)", line):
            assert int(m.group(1)) == len(hosts), text
            hosts.append([int(x) for x in m.group(2).split(",") if x.strip()])
            assert int(m.group(3)) == hosts[-1][0], text
        elif m := re.match(r"\s*(\d+) <- (.*)$", line):
            for child in m.group(2).split(","):
                c = re.fullmatch(r"\s*(\d+) \[(\w+)\]\s*", child)
                assert c, line
                edges.append((int(m.group(1)), int(c.group(1)), c.group(2)))
        elif m := re.match(r"\s*ring: (.*)$", line):
            ring = [int(x) for x in m.group(1).split("->")]
    return hosts, edges, ring


def test_two_hosts_two_ranks_each_shm_inside_tcp_across():
    placement = [0, 0, 1, 1]  # ranks 0, 1 on host 0; ranks 2, 3 on host 1
    with network(2) as net:
        results = run_tree(net, placement, "hosts2x2")
    inside = "shm" if shm_enabled() else "tcp"
    host_of = dict(enumerate(placement))
    for res in results:
        assert res["checked"] == ["small", "large"]
        hosts, edges, ring = parse_plan(res["plan"])
        assert hosts == [[0, 1], [2, 3]], res["plan"]
        assert sorted(ring) == [0, 1, 2, 3], res["plan"]
        crossings = sum(host_of[ring[k]] != host_of[ring[(k + 1) % 4]] for k in range(4))
        assert crossings == 2, res["plan"]  # PLAN-3: each host's ranks contiguous in the ring
        assert len(edges) == 3, res["plan"]
        for parent, child, kind in edges:
            want = inside if host_of[parent] == host_of[child] else "tcp"
            assert kind == want, (parent, child, kind, res["plan"])
        assert any(host_of[p] != host_of[c] for p, c, _ in edges), res["plan"]
        # The links this rank really opened have the same kinds.
        for s in res["stats"]:
            want = inside if host_of[s["peer_rank"]] == host_of[res["rank"]] else "tcp"
            assert s["link"] == want, (res["rank"], s)


def test_four_shaped_hosts_one_rank_each_4mib():
    with network(4, rate="1gbit") as net:
        # Listening on PARALLEL_IFNAME's address here (the other test uses the route to the root).
        results = run_tree(net, [0, 1, 2, 3], "shaped4", env={"PARALLEL_IFNAME": netns.IFNAME})
    for res in results:
        assert res["checked"] == ["small", "4MiB"]
        hosts, edges, ring = parse_plan(res["plan"])
        assert hosts == [[0], [1], [2], [3]], res["plan"]
        assert all(kind == "tcp" for _, _, kind in edges) and len(edges) == 3, res["plan"]
        assert all(s["link"] == "tcp" for s in res["stats"]), res["stats"]


LAUNCHER_WORKER = str(HERE.parents[1] / "bindings" / "python" / "tests" / "launcher_worker.py")


def test_torchrun_c10d_two_hosts_two_ranks_each_meets_through_the_launchers_store(tmp_path):
    """The real torchrun on each namespaced host, c10d rendezvous at host 0: trees made from the
    launcher's environment meet through torchrun's store (never its port), shm inside a host,
    tcp across, and all-reduce right; then init_process_group("parallel") in the same job: its
    collectives and send/recv between every pair of ranks, across hosts and inside one."""
    endpoint = f"{netns.Network.addr(0)}:{PORT}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("PARALLEL_ROOT", "PARALLEL_RANK", "PARALLEL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    with network(2) as net:
        procs = [
            net.run_in(
                h,
                [
                    sys.executable, "-m", "torch.distributed.run",
                    "--nnodes=2", "--nproc-per-node=2", "--max-restarts=0",
                    "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=netns",
                    f"--local-addr={net.addr(h)}",
                    # torch guesses whether it hosts the endpoint from the machine's hostname,
                    # which resolves outside the namespaces: say so, and bound every wait.
                    f"--rdzv-conf=is_host={int(h == 0)},read_timeout=60,join_timeout=60",
                    LAUNCHER_WORKER, str(tmp_path), "--dist=parallel",
                ],
                env,
                stdout=netns.subprocess.PIPE,
                stderr=netns.subprocess.PIPE,
                text=True,
            )
            for h in range(2)
        ]  # fmt: skip
        results = netns.wait_all(procs, timeout=2 * DEADLINE)
    for h, (rc, out, err) in enumerate(results):
        assert rc == 0, f"torchrun on host {h}: rc={rc}\n{out[-3000:]}\n{err[-5000:]}"
    inside = "shm" if shm_enabled() else "tcp"
    for r in range(4):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["tree_rank"] == [r, 4] and res["sum"] == 10.0, res
        assert res["second_tree_before_dist"] == 10.0, res
        hosts, edges, _ = parse_plan(res["plan"])
        assert hosts == [[0, 1], [2, 3]], res["plan"]  # torchrun numbers each node's ranks together
        host_of = {k: i for i, rs in enumerate(hosts) for k in rs}
        for parent, child, kind in edges:
            assert kind == (inside if host_of[parent] == host_of[child] else "tcp"), res["plan"]
        assert any(host_of[p] != host_of[c] for p, c, _ in edges), res["plan"]
        for s in res["stats"]:
            assert s["link"] == (inside if host_of[s["peer_rank"]] == host_of[r] else "tcp"), s
        assert res["dist_sum"] == 10.0 and res["tree_after_dist"] == 10.0, res
        assert res["tree_group_world"] == 10.0, res
        assert res["dist_checks"] == {"broadcast": True, "all_gather": True, "pairs": 6}, res
        if r in (0, 1):
            assert res["tree_group_sub"] == [r, 2, 3.0], res


def test_network_is_torn_down_and_leftovers_are_removed():
    try:
        net = netns.Network(1)
    except netns.NetnsUnavailable as e:
        pytest.skip(f"multi-host tests need network namespaces: {e}")
    names = [net.sw, *net.names]
    p = net.run_in(0, ["sleep", "30"])
    net.close()
    assert p.poll() is not None  # killed on close
    left = netns.list_namespaces()
    assert not [n for n in names if n in left]
    # A namespace named after a process that is gone is a crashed run's leftover.
    dead = "parallel_sw-999999999"
    netns.subprocess.run(["ip", "netns", "add", dead], check=True, timeout=10)
    try:
        netns.remove_leftovers()
        assert dead not in netns.list_namespaces()  # (a concurrent run may have removed it first)
    finally:
        netns.subprocess.run(["ip", "netns", "del", dead], capture_output=True, timeout=10)

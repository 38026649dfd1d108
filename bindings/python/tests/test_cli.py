"""python -m torch_parallel info and plot; stats() are JSON-serialisable."""

from __future__ import annotations

import json
import pathlib
import socket
import subprocess
import sys

import torch_parallel as parallel

from .conftest import finish, spawn


def run(
    *args: str, env: dict[str, str] | None = None, code: str | None = None, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    import os

    full = {k: v for k, v in os.environ.items() if k not in unset}
    full.update(env or {})
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "torch_parallel", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full)


def test_info_reports_versions_backend_topology_and_every_variable_with_its_source() -> None:
    r = run("info", env={"PARALLEL_CHUNK": "2M", "PARALLEL_SECRET": "do-not-print-me"})
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for key in ("torch_parallel", "python", "numpy", "torch", "io backend", "cores", "numa nodes", "cuda"):
        assert any(line.startswith(key) for line in out.splitlines()), (key, out)
    assert f"io backend      {parallel.io_backend()} (PARALLEL_IO=" in out, out
    rows = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("  PARALLEL_")}
    assert set(rows) == set(parallel.config()), sorted(set(rows) ^ set(parallel.config()))
    assert rows["PARALLEL_CHUNK"][1:] == ["2M", "environment"], rows["PARALLEL_CHUNK"]
    assert rows["PARALLEL_TIMEOUT"][-1] == "default"
    assert rows["PARALLEL_SECRET"][1:] == ["<set>", "environment"]
    assert "do-not-print-me" not in out + r.stderr
    head, _, section = out.partition("\ntopology (")
    assert section.split(":", 1)[0] in ("hwloc", "sysfs"), out
    keys = [ln.split()[0] for ln in section.split("\n\n", 1)[0].splitlines()[1:]]
    for key in ("numa", "caches", "gpu", "nic", "reactors"):
        assert key in keys, (key, section)


def cpu_set(text: str) -> set[int]:
    """{0, 1, 2, 5} from "0-2,5 (why)"."""
    cpus: set[int] = set()
    for part in text.split()[0].split(","):
        a, _, b = part.partition("-")
        cpus.update(range(int(a), int(b or a) + 1))
    return cpus


def test_info_json_topology_matches_sysfs_and_splits_cores_between_local_ranks() -> None:
    import os

    def topology(**env: str) -> dict[str, object]:
        r = run("info", "--json", env=env, unset=("LOCAL_RANK", "LOCAL_WORLD_SIZE", "PARALLEL_CPUS"))
        assert r.returncode == 0, r.stdout + r.stderr
        topo: dict[str, object] = json.loads(r.stdout)["topology"]
        return topo

    topo = topology()
    assert topo["probe"] in ("hwloc", "sysfs"), topo
    assert topo["logical_cpus"] == os.cpu_count(), topo
    nodes = [n for n in os.listdir("/sys/devices/system/node") if n.startswith("node") and n[4:].isdigit()]
    assert isinstance(topo["numa_nodes"], list) and len(topo["numa_nodes"]) == len(nodes), topo
    assert isinstance(topo["nics"], list)
    assert {n["name"] for n in topo["nics"]} <= set(os.listdir("/sys/class/net")), topo
    assert cpu_set(str(topo["reactor_cpus"])) == os.sched_getaffinity(0), topo
    off = topology(PARALLEL_PIN="0")
    assert "PARALLEL_PIN=0" in str(off["reactor_cpus"]), off
    if len(os.sched_getaffinity(0)) >= 2 and os.sched_getaffinity(0) == set(range(os.cpu_count() or 0)):
        shares = [
            cpu_set(str(topology(LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2")["reactor_cpus"])) for r in (0, 1)
        ]
        assert shares[0] and shares[1] and not shares[0] & shares[1], shares


def test_info_json_is_machine_readable_and_a_bad_variable_is_reported_not_raised() -> None:
    # The test command sets PARALLEL_IO for every run: unset here, it must read as the default.
    r = run("info", "--json", unset=("PARALLEL_IO",), env={"PARALLEL_CHUNK": "2M"})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["config"]["PARALLEL_IO"]["source"] == "default"
    assert report["config"]["PARALLEL_CHUNK"]["source"] == "environment"
    bad = run("info", env={"PARALLEL_TIMEOUT": "soon"})
    assert bad.returncode == 1
    assert "config error" in bad.stdout and "PARALLEL_TIMEOUT='soon' is not valid" in bad.stdout, bad.stdout


STATS = """
import json, os, sys
import numpy as np
os.environ["PARALLEL_SHM_FLAT_MAX"] = "0"  # the data on the links (no shared-memory fast path)
import torch_parallel as parallel
rank, root, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tree = parallel.tree(rank, 2, root, timeout=60)
for _ in range(3):
    tree.all_reduce(np.ones(1 << 16, dtype=np.float32))
stats = tree.stats()
if rank == 0:
    with open(path, "w") as f:
        json.dump(stats, f)
print("ok")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plot_draws_the_links_of_a_two_rank_tree_and_of_a_server(tmp_path: pathlib.Path) -> None:
    stats = tmp_path / "stats.json"
    root = f"127.0.0.1:{free_port()}"
    procs = [spawn(STATS, str(r), root, str(stats)) for r in range(2)]
    for p in procs:
        rc, out, err = finish(p, timeout=120)
        assert rc == 0, out + err
    rows = json.loads(stats.read_text())
    assert len(rows) == 1 and rows[0]["peer_rank"] == 1 and rows[0]["bytes_sent"] >= 3 * 4 << 16, rows
    png = tmp_path / "links.png"
    r = run("plot", str(stats), "-o", str(png))
    assert r.returncode == 0, r.stdout + r.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    with (
        parallel.server("127.0.0.1", 0) as server,
        parallel.client("127.0.0.1", server.port, timeout=10) as c,
    ):
        c.send(list(range(100)))
        assert server.recv_any(timeout=10) == list(range(100))
        one = tmp_path / "server.json"
        one.write_text(json.dumps(server.stats()))
        conns = tmp_path / "conns.json"
        conns.write_text(json.dumps([x.stats() for x in server.connections()] + [c.stats()]))
    for src in (one, conns):
        r = run("plot", str(src), "-o", str(tmp_path / "s.png"))
        assert r.returncode == 0, r.stdout + r.stderr


def test_plot_without_matplotlib_says_how_to_install_it_and_bad_input_is_named(
    tmp_path: pathlib.Path,
) -> None:
    stats = tmp_path / "stats.json"
    stats.write_text('{"bytes_sent": 1, "bytes_recv": 1, "msgs_sent": 1, "msgs_recv": 1}')
    block = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from torch_parallel.__main__ import main; sys.exit(main(sys.argv[1:]))"
    )
    r = run("plot", str(stats), code=block)
    assert r.returncode == 2 and "pip install 'torch_parallel[plot]'" in r.stderr, r.stderr
    stats.write_text('{"hello": 1}')
    r = run("plot", str(stats), "-o", str(tmp_path / "x.png"))
    assert r.returncode == 2 and "cannot read" in r.stderr and "tree.stats()" in r.stderr, r.stderr

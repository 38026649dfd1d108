"""Command line of torch_parallel.

``python -m torch_parallel info``
    What a bug report needs: versions, the I/O backend and why, this host's topology (cores, NUMA
    nodes, GPUs), CUDA, and every configuration variable with its value and where it came from.
    ``--json`` prints the same as JSON.

``python -m torch_parallel plot stats.json -o links.png``
    Draws per-link bytes, bandwidth and mean time per message from a JSON file holding
    ``tree.stats()`` (a list, one entry per link), ``[c.stats() for c in server.connections()]``,
    or one ``server.stats()`` / ``client.stats()`` dict. Needs matplotlib
    (``pip install torch_parallel[plot]``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

from . import __version__, _native


def _version_of(module: str) -> str:
    try:
        mod = __import__(module)
    except ImportError:
        return "not installed"
    except Exception as e:  # a broken install is worth reporting, not a traceback
        return f"cannot be imported ({type(e).__name__}: {e})"
    return str(getattr(mod, "__version__", "unknown"))


def _numa_nodes() -> int:
    try:
        names = os.listdir("/sys/devices/system/node")
    except OSError:
        return 1
    return max(1, sum(1 for n in names if n.startswith("node") and n[4:].isdigit()))


def collect() -> dict[str, Any]:
    """Everything ``info`` prints, as a JSON-serialisable dict."""
    report: dict[str, Any] = {
        "torch_parallel": __version__,
        "native module": _native.__file__,
        "python": sys.version.split()[0] + f" ({sys.executable})",
        "platform": platform.platform(),
        "glibc": " ".join(platform.libc_ver()),
        "numpy": _version_of("numpy"),
        "torch": _version_of("torch"),
    }
    try:
        report["config"] = _native.config()
    except Exception as e:
        report["config error"] = str(e)
        return report
    try:
        report["io backend"] = f"{_native.io_backend()} ({_native.io_backend_reason()})"
    except Exception as e:
        report["io backend"] = f"unavailable: {e}"
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    report["host"] = platform.node()
    report["cores"] = f"{affinity} usable of {os.cpu_count()}"
    report["numa nodes"] = _numa_nodes()
    try:
        topo = _native.topology()
    except Exception as e:  # a probe that fails is worth reporting, not a traceback
        report["topology error"] = str(e)
    else:
        report["cores"] = (
            f"{topo['cores']} physical, {topo['logical_cpus']} logical, {affinity} usable by this process"
        )
        report["numa nodes"] = max(1, len(topo["numa_nodes"]))
        report["topology"] = topo
    report["cuda"] = _native.cuda_info()
    cm = _native.cross_memory()
    if cm["cma_us"] is None:
        report["cross-memory"] = (
            "process_vm_readv refused by the kernel: shared-memory links copy through their rings"
        )
    else:
        report["cross-memory"] = (
            f"{cm['bytes'] >> 20} MiB by process_vm_readv in {cm['cma_us']:.0f} us against "
            f"{cm['memcpy_us']:.0f} us by memcpy: "
            + ("used" if cm["used"] else "not used")
            + f" for large segments (PARALLEL_SHM_CMA={report['config'].get('PARALLEL_SHM_CMA')})"
        )
    sources = {}
    for name, value in report["config"].items():
        raw = os.environ.get(name, "")
        sources[name] = {"value": value, "source": "environment" if raw.strip() else "default"}
    report["config"] = sources
    return report


def _print_topology(topo: dict[str, Any]) -> None:
    """The topology section: the probe's lines (NUMA, caches, GPUs and NICs with their locality)."""
    print(f"\ntopology ({topo['probe']}: {topo['reason']}):")
    rows = [(k, v) for k, v in topo["lines"] if k not in ("topology probe", "cores")]
    if not topo["gpus"]:
        rows.append(("gpu", "none found"))
    if not topo["nics"]:
        rows.append(("nic", "none on PCI (virtual interfaces only)"))
    rows.append(("reactors", f"cpus {topo['reactor_cpus']}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")


def _info(args: argparse.Namespace) -> int:
    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if "config error" not in report else 1
    config = report.pop("config", {})
    topo = report.pop("topology", None)
    width = max(len(k) for k in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if topo is not None:
        _print_topology(topo)
    if config:
        print("\nconfiguration (value, source):")
        width = max(len(k) for k in config)
        for name, row in config.items():
            shown = row["value"] if row["value"] != "" else "(unset)"
            print(f"  {name:<{width}}  {shown:<12}  {row['source']}")
    return 0 if "config error" not in report else 1


def _links(stats: Any) -> list[dict[str, Any]]:
    rows = stats if isinstance(stats, list) else [stats]
    if not rows or not all(isinstance(r, dict) and "bytes_sent" in r for r in rows):
        raise ValueError(
            "expected tree.stats() (a list of per-link dicts), a list of connection stats or one "
            "server.stats()/client.stats() dict, each with bytes_sent, bytes_recv, msgs_sent, ..."
        )
    return rows


def _label(row: dict[str, Any], i: int) -> str:
    if "peer_rank" in row:
        return f"rank {row['peer_rank']} ({row.get('link', '?')})"
    if "peer" in row:
        return f"{row['peer']} ({row.get('link', '?')})"
    if "connections" in row:
        return f"server ({row['connections']} connections)"
    return f"link {i}"


def _plot(args: argparse.Namespace) -> int:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "python -m torch_parallel plot needs matplotlib, which is not installed here: "
            "pip install 'torch_parallel[plot]' (or pip install matplotlib)",
            file=sys.stderr,
        )
        return 2
    try:
        with open(args.stats) as f:
            rows = _links(json.load(f))
    except (OSError, ValueError) as e:
        print(f"python -m torch_parallel plot: cannot read {args.stats}: {e}", file=sys.stderr)
        return 2
    labels = [_label(r, i) for i, r in enumerate(rows)]
    x = range(len(rows))
    mib = 1 << 20

    def mean_us(r: dict[str, Any], secs: str, msgs: str) -> float:
        n = r.get(msgs, 0)
        return 1e6 * float(r.get(secs, 0.0)) / n if n else 0.0

    Get = Callable[[dict[str, Any], str], float]
    panels: list[tuple[str, str, str, Get]] = [
        ("bytes (MiB)", "bytes_sent", "bytes_recv", lambda r, k: r.get(k, 0) / mib),
        ("bandwidth (MiB/s)", "send_bandwidth", "recv_bandwidth", lambda r, k: r.get(k, 0.0) / mib),
        (
            "mean time per message (µs)",
            "send",
            "recv",
            lambda r, k: mean_us(r, f"{k}_seconds", "msgs_sent" if k == "send" else "msgs_recv"),
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(5 + 1.2 * len(rows), 4.5))
    width = 0.4
    for ax, (title, sent, recv, get) in zip(axes, panels, strict=True):
        ax.bar([i - width / 2 for i in x], [get(r, sent) for r in rows], width, label="sent")
        ax.bar([i + width / 2 for i in x], [get(r, recv) for r in rows], width, label="received")
        ax.set_title(title)
        ax.set_xticks(list(x))
        ax.set_xticklabels(labels, rotation=30, ha="right")
    axes[0].legend()
    fig.suptitle(f"per-link traffic ({args.stats})")
    fig.tight_layout()
    fig.savefig(args.output)
    print(f"wrote {args.output} ({len(rows)} link(s))")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Runs ``python -m torch_parallel`` with ``argv`` (default: the command line)."""
    parser = argparse.ArgumentParser(prog="python -m torch_parallel", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, I/O backend, topology, CUDA and configuration")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(run=_info)
    plot = sub.add_parser("plot", help="draw per-link bytes, bandwidth and latency from stats JSON")
    plot.add_argument("stats", help="JSON file of tree.stats(), connection stats or server.stats()")
    plot.add_argument("-o", "--output", default="links.png", help="image to write (default links.png)")
    plot.set_defaults(run=_plot)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())

"""The under-load mode of benches/allreduce.py (`--load N`): every rank keeps N compute threads busy
(torch matmul, or NumPy where torch is absent: the same kind for every system of a run) while its
main thread all-reduces 4 KiB, 1 MiB and 64 MiB, as a trainer's ranks do while backward computes.

Per launch (a fresh set of processes), rank 0's p50 and p99 of the per-op times; per system, the
worst p50 over the launches, the p99 of every timed op pooled, and the spread (largest p50 /
smallest p50 over the launches); then the ratio rows of issue #14: ours / peer for the worst p50
and for the pooled p99 (targets <= 0.5 each) and our spread (target <= 2).
"""

from __future__ import annotations

import threading

from _common import near_spread, pct

# Timed ops per launch in load mode (a few launches of these fit in a short run).
ITERS = {"4KiB": 300, "1MiB": 100, "64MiB": 6}
ITERS_QUICK = {"4KiB": 100, "1MiB": 40, "64MiB": 3}
# issue #14's targets under load, p=2
TARGET_P50 = 0.5
TARGET_P99 = 0.5
TARGET_SPREAD = 2.0


def load_kind():
    """'torch' where torch imports, else 'numpy' (decided once in the parent for every system)."""
    import importlib.util

    return "torch" if importlib.util.find_spec("torch") is not None else "numpy"


def start_load(n, kind):
    """Starts n threads doing 256x256 float32 matmuls until the returned stop() is called.
    Both libraries release the GIL inside the matmul, so each thread keeps a core busy."""
    if n <= 0:
        return lambda: 0
    stop = threading.Event()
    done = [0] * n

    def work(i):
        if kind == "torch":
            import torch

            a, b = torch.rand(256, 256), torch.rand(256, 256)
            mm = torch.mm
        else:
            import numpy as np

            a = np.random.rand(256, 256).astype(np.float32)
            b = np.random.rand(256, 256).astype(np.float32)
            mm = np.matmul
        while not stop.is_set():
            mm(a, b)
            done[i] += 1

    threads = [threading.Thread(target=work, args=(i,), daemon=True, name=f"load-{i}") for i in range(n)]
    for t in threads:
        t.start()

    def finish():
        stop.set()
        for t in threads:
            t.join(30)
        return sum(done)

    return finish


def per_launch(run, label):
    """Rank 0's p50 and p99 of one launch, or None."""
    s = run["ranks"][0]["sizes"].get(label)
    if not s:
        return None
    xs = sorted(s["samples_s"])
    return {"p50_s": pct(xs, 0.5), "p99_s": pct(xs, 0.99), "samples_s": xs, "verified": s["verified"]}


def summarize(runs, sizes):
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        last = runs[-1] if runs else {"status": "skipped"}
        return {"status": last.get("status"), "note": last.get("note", "")}
    out = {"status": "ok", "launches": len(ok), "of": len(runs), "sizes": {}}
    # Where the two CPUs were in each launch (the core-to-core probe right before and after it).
    out["core_states"] = [r.get("core", {}).get("state", "unknown") for r in ok]
    for label in sizes:
        per = [p for p in (per_launch(r, label) for r in ok) if p]
        if not per:
            continue
        pooled = sorted(x for p in per for x in p["samples_s"])
        p50s = [p["p50_s"] for p in per]
        out["sizes"][label] = {
            "p50_per_launch_s": p50s,
            "p99_per_launch_s": [p["p99_s"] for p in per],
            "worst_p50_s": max(p50s),
            "pooled_p99_s": pct(pooled, 0.99),
            "spread": max(p50s) / min(p50s),
            # Over the near launches; None when a launch lacks this size (no state to pair).
            "near_spread": (
                near_spread(p50s, out["core_states"]) if len(p50s) == len(out["core_states"]) else None
            ),
            "ops_per_launch": len(per[0]["samples_s"]),
            "verified": all(
                rr["sizes"][label]["verified"]
                for r in ok
                for rr in r["ranks"].values()
                if label in rr["sizes"]
            ),
        }
    out["load_ops_per_s"] = [r.get("load_ops_per_s") for r in ok]
    out["cpu_pressure"] = [r.get("cpu_pressure") for r in ok]
    if len(ok) < len(runs):
        out["note"] = f"{len(runs) - len(ok)} launch(es) failed: {runs[-1].get('note', '')}"[:300]
    return out


def ratios(rows, ours, peers, sizes):
    out = {}
    for label in sizes:
        o = (rows.get(ours) or {}).get("sizes", {}).get(label)
        if not o:
            continue
        for p in peers:
            q = (rows.get(p) or {}).get("sizes", {}).get(label)
            if q:
                out.setdefault(label, {})[p] = {
                    "worst_p50": o["worst_p50_s"] / q["worst_p50_s"],
                    "pooled_p99": o["pooled_p99_s"] / q["pooled_p99_s"],
                }
    return out


def _t(s):
    return "-" if s is None else (f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms")


def table(report):
    rows, sizes = report["systems"], report["sizes"]
    lines = [
        "| size | system | p50 per launch | p99 per launch | worst p50 | pooled p99 "
        "| spread (max/min p50) | check |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label in sizes:
        for name in report["order"]:
            r = rows.get(name) or {}
            s = r.get("sizes", {}).get(label)
            if r.get("status") != "ok" or not s:
                lines.append(f"| {label} | {name} | - | - | - | - | - | {r.get('status')} |")
                continue
            lines.append(
                f"| {label} | {name} | {', '.join(_t(x) for x in s['p50_per_launch_s'])} "
                f"| {', '.join(_t(x) for x in s['p99_per_launch_s'])} | **{_t(s['worst_p50_s'])}** "
                f"| **{_t(s['pooled_p99_s'])}** | {s['spread']:.2f}x | {'ok' if s['verified'] else 'WRONG'} |"
            )
    return lines


def ratio_lines(report):
    ours, rt, rows = report["ours"], report["ratios"], report["systems"]
    lines = [
        f"| size | ratio | {' | '.join(f'{ours} / {p}' for p in report['peers'])} | target |",
        "|---|---|" + "---|" * len(report["peers"]) + "---|",
    ]
    for label in report["sizes"]:
        d = rt.get(label, {})
        for key, name, target in (
            ("worst_p50", "worst p50", TARGET_P50),
            ("pooled_p99", "p99", TARGET_P99),
        ):
            cells = [f"{d[p][key]:.2f}x" if p in d else "-" for p in report["peers"]]
            lines.append(f"| {label} | {name} | {' | '.join(cells)} | <= {target}x |")
        s = (rows.get(ours) or {}).get("sizes", {}).get(label)
        spread = f"{s['spread']:.2f}x" if s else "-"
        if s and s.get("near_spread"):
            spread += f" ({s['near_spread']:.2f}x over the launches with the CPUs near)"
        lines.append(
            f"| {label} | spread of {ours} (max/min p50) | {spread}"
            + " | -" * (len(report["peers"]) - 1)
            + f" | <= {TARGET_SPREAD}x |"
        )
    return lines


def render(report):
    a = report["args"]
    L = [
        f"## All-reduce under load (p={a['world']}, "
        f"{a['load']} {report['load_kind']} matmul thread(s) per rank)",
        "",
        f"Run {report['started']} ({report['elapsed_s']:.0f} s), `{report['command']}`; "
        f"{a['reps']} launch(es) per system, interleaved; load average at start / end: "
        f"{' '.join(report['loadavg_start'])} / {' '.join(report['loadavg_end'])}.",
        "",
    ]
    L += table(report)
    states = [
        f"`{n}` " + ", ".join((report["systems"].get(n) or {}).get("core_states") or ["-"])
        for n in report["order"]
    ]
    work = [
        f"`{n}` "
        + ", ".join(
            f"{x:.0f}" if x is not None else "-"
            for x in (report["systems"].get(n) or {}).get("load_ops_per_s") or []
        )
        for n in report["order"]
    ]
    L += [
        "",
        "The compute threads' work, launch by launch (256x256 matmuls per second, both ranks, over each "
        "rank's whole run: what the library's waits and copies left them; Open MPI's ranks poll on the "
        "core their compute threads are bound to with them): " + "; ".join(work) + ".",
    ]
    L += [
        "",
        "Where the two CPUs were, launch by launch (the core-to-core probe right before and after "
        "each launch, `benches/probes/core_rtt.c`; near: both found the CPUs sharing a cache): "
        + "; ".join(states)
        + ".",
    ]
    L += ["", "Ratios (time ours / peer, < 1 = ours faster; targets from issue #14):", ""]
    L += ratio_lines(report)
    L += [
        "",
        "Method: every rank starts its compute threads (256x256 float32 matmuls in a loop, GIL released) "
        "before it joins, then runs the same checked warm-up and timed loop as the default mode; "
        "p50/p99 are rank 0's per-op times in one launch; pooled p99 takes every timed op of every launch. "
        "Other work on the machine competes too: compare systems within one run.",
    ]
    return "\n".join(L) + "\n"


def print_console(report):
    for title, lines in (("Under load", table(report)), ("Ratios", ratio_lines(report))):
        rows = [
            [c.strip().replace("**", "") for c in ln.strip("|").split("|")]
            for ln in lines
            if not ln.startswith("|---")
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(f"\n{title}")
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())

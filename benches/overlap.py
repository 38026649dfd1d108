"""Overlap benchmark: all-reduce of gradient buckets while a simulated backward computes (the DDP
pattern), ours against gloo, in one run (issue #14: the overlap "must not slow the compute by
more than the bytes it moves justify").

Two ranks on this machine, each a separate process with one thread of torch compute
(torch.set_num_threads(1), as a trainer's rank: 2 ranks = 2 busy cores). One step of the
simulated backward is L layers (default 8); each layer is K float32 NxN matmuls (default 4 of
512x512, about 10 ms on one core here), after which the all-reduce (sum) of that layer's gradient
bucket is launched asynchronously; the step ends when every bucket's all-reduce has been waited
for. Buckets (MiB, in launch order) default to 2,8,16,25,16,8,4,1 = 80 MiB per step, as DDP's
(a small first bucket, then up to 25 MiB).

Systems:
    ours       torch_parallel.tree(rank=r, world_size=2, root=...).all_reduce_async(t) -> handle;
               handle.wait() (shared memory, the default on one host)
    ours_dist  torch.distributed with backend "parallel" (`import torch_parallel` registers it):
               dist.all_reduce(t, async_op=True) -> work; work.wait()
    gloo       torch.distributed gloo: dist.all_reduce(t, async_op=True) -> work; work.wait()
    ours_nospin  ours with PARALLEL_SPIN_US=0 in both ranks (a diagnosis: --only ours,ours_nospin)

Three kinds of step, in interleaved blocks within every launch (a barrier before each block):
    compute   the L layers' matmuls alone, no communication
    comm      the L all-reduces alone: all launched, then all waited for (no compute)
    overlap   compute of layer i, then launch bucket i's all-reduce; wait for all at the end
Per step and rank: wall time, the wall and thread-CPU time of the compute parts
(time.perf_counter, time.thread_time around each layer's matmuls), the process's CPU time (user +
system of every thread, getrusage: the engine's and gloo's threads included) and the final wait.

Definitions (per rank and step; per launch the median over the steps, averaged over the two ranks;
per system the median over the launches, with their range):
    compute slowdown   compute wall inside an overlap step - compute wall of a compute step
                       (the same matmuls; what overlapping cost the compute)
    preempted          of that slowdown, the part in which the compute thread was not on a core:
                       (wall - thread CPU) of the compute parts, overlap minus compute step
    comm CPU           process CPU time of a comm step: what moving and reducing the bucket bytes
                       costs this system when nothing else runs (its own threads' work, spinning
                       included). On 2 cores that the compute keeps busy, this CPU has to come out
                       of the compute's time unless the system hides it in the compute's stalls:
                       it is what the bytes justify.
    overlap efficiency (compute + comm - overlap) / min(compute, comm), step times: 1 = the
                       shorter of the two entirely hidden, 0 = no overlap at all
Target (issue #14): compute slowdown <= the system's own comm CPU; gloo's comm CPU is the
reference a user already accepts, so ours is also compared with it and with gloo's slowdown.

Every rank is a fresh process started with subprocess (this orchestrating process imports
neither torch nor torch_parallel), in its own session; each launch has a deadline after which its
process groups and every rank (by the pid it wrote) are terminated, then killed, and each rank
arms SIGALRM a little after that deadline. The buckets are all-reduced with rank-dependent data
and checked on every rank (each element must be 1 + 2 = 3) before and after the timed steps;
the timed steps reduce zeros (the sums stay finite and the bytes are the same).

Usage:
  .venv/bin/python benches/overlap.py                 # 5 launches per system (1-2 minutes)
  .venv/bin/python benches/overlap.py --quick         # 1 launch per system, fewer steps
  .venv/bin/python benches/overlap.py --only ours,gloo --reps 5
Writes --json (default bench-out/overlap.json) and --md (default bench-out/overlap.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time

from _common import (
    HOST,
    cpu_seconds,
    free_port,
    launch_ranks,
    machine_info,
    read_text,
    run_probe,
)

MiB = 1 << 20
SCRIPT = os.path.abspath(__file__)
SYSTEMS = ("ours", "ours_dist", "gloo", "ours_nospin")
DEFAULT = ("ours", "ours_dist", "gloo")
OURS = ("ours", "ours_dist", "ours_nospin")
LABEL = {
    "ours": "ours: Tree.all_reduce_async + handle.wait (shared memory)",
    "ours_dist": 'ours through torch.distributed, backend "parallel" (dist.all_reduce async_op=True)',
    "gloo": "torch.distributed gloo (dist.all_reduce async_op=True, TCP)",
    "ours_nospin": "ours with PARALLEL_SPIN_US=0 (waits never spin; a diagnosis, not run by default)",
}
MODES = ("compute", "comm", "overlap")
WORLD = 2
T_OP = 60.0  # every collective's own timeout in a rank, s


# ----------------------------------------------------------------------------------------------
# children: one rank each


class Comm:
    """One system's asynchronous all-reduce: start(t) -> pending, wait(pending), barrier()."""

    def __init__(self, system, rank, cfg):
        self.system = system
        if system in ("ours", "ours_nospin"):
            import torch_parallel as parallel

            self.tree = parallel.tree(rank=rank, world_size=WORLD, root=f"{HOST}:{cfg['port']}", timeout=T_OP)
            self.start = lambda t: self.tree.all_reduce_async(t, "sum")
            self.wait = lambda w: w.wait(T_OP)
            self.barrier = self.tree.barrier
            return
        from datetime import timedelta

        import torch.distributed as dist

        if system == "ours_dist":
            import torch_parallel  # noqa: F401 - registers the backend "parallel"
        dist.init_process_group(
            "parallel" if system == "ours_dist" else "gloo",
            init_method=f"tcp://{HOST}:{cfg['port']}",
            rank=rank,
            world_size=WORLD,
            timeout=timedelta(seconds=T_OP),
        )
        self.start = lambda t: dist.all_reduce(t, async_op=True)
        self.wait = lambda w: w.wait()
        self.barrier = dist.barrier

    def close(self):
        self.barrier()
        if self.system in ("ours_dist", "gloo"):
            import torch.distributed as dist

            dist.destroy_process_group()


def run_rank(system, rank, cfg):
    import torch

    torch.set_num_threads(1)
    comm = Comm(system, rank, cfg)
    n, k = cfg["n"], cfg["k"]
    g = torch.Generator().manual_seed(rank)
    a = [torch.rand(n, n, generator=g) for _ in cfg["buckets_mib"]]
    b = torch.rand(n, n, generator=g)
    out = torch.empty(n, n)
    buckets = [torch.zeros(int(m * MiB) // 4) for m in cfg["buckets_mib"]]
    pc, tt = time.perf_counter, time.thread_time

    def layer(i):
        for _ in range(k):
            torch.mm(a[i], b, out=out)

    def step(mode):
        comp_wall = comp_cpu = 0.0
        pend = []
        cpu0, t0, main0 = cpu_seconds(), pc(), tt()
        for i, buf in enumerate(buckets):
            if mode != "comm":
                c0, u0 = pc(), tt()
                layer(i)
                comp_wall += pc() - c0
                comp_cpu += tt() - u0
            if mode != "compute":
                pend.append(comm.start(buf))
        w0, cpu_w0, main_w0 = pc(), cpu_seconds(), tt()
        for w in pend:
            comm.wait(w)
        t1 = pc()
        return {
            "step_s": t1 - t0,
            "compute_s": comp_wall,
            "compute_cpu_s": comp_cpu,
            "wait_s": t1 - w0,
            "cpu_s": cpu_seconds() - cpu0,
            # CPU of the other threads (the system's) before the final wait, while compute ran
            "others_cpu_before_wait_s": (cpu_w0 - cpu0) - (main_w0 - main0),
        }

    def checked():
        expected = WORLD * (WORLD + 1) / 2
        for buf in buckets:
            buf.fill_(float(rank + 1))
        step("overlap")
        ok = all(bool(torch.all(buf == expected)) for buf in buckets)
        for buf in buckets:
            buf.zero_()
        return ok

    verified = [checked()]
    samples = {m: [] for m in MODES}
    for m in MODES:  # warm-up: links open, pages faulted, threads started
        comm.barrier()
        for _ in range(cfg["warmup"]):
            step(m)
    threads = {m: {} for m in MODES}
    for r in range(cfg["rounds"]):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for m in order:
            comm.barrier()
            before = thread_stats()
            for _ in range(cfg["block"]):
                samples[m].append(step(m))
            add_thread_delta(threads[m], before, thread_stats(), cfg["rounds"] * cfg["block"])
    verified.append(checked())
    links = None
    if system in ("ours", "ours_nospin"):
        links = sorted({str(s.get("link")) for s in comm.tree.stats()})
    comm.close()
    return {
        "samples": samples,
        "threads": threads,
        "verified": all(verified),
        "links": links,
        "torch": torch.__version__,
    }


def thread_stats():
    """{tid: (group, run s, runqueue wait s, voluntary, involuntary context switches)} of this
    process's threads, from /proc (schedstat: nanoseconds). Group: "main" for the thread that
    computes, else the thread's name without its number ("parallel-lane", gloo's own names)."""
    out = {}
    base = f"/proc/{os.getpid()}/task"
    for tid in os.listdir(base):
        try:
            name = read_text(f"{base}/{tid}/comm").strip()
            run, wait = (int(x) / 1e9 for x in read_text(f"{base}/{tid}/schedstat").split()[:2])
            sw = {}
            for line in read_text(f"{base}/{tid}/status").splitlines():
                if "ctxt_switches:" in line:
                    key, val = line.split(":")
                    sw[key.strip()] = int(val)
        except ValueError:
            continue
        group = "main" if tid == str(os.getpid()) else (name.rstrip("0123456789-") or name)
        out[tid] = (
            group,
            run,
            wait,
            sw.get("voluntary_ctxt_switches", 0),
            sw.get("nonvoluntary_ctxt_switches", 0),
        )
    return out


def add_thread_delta(acc, before, after, steps):
    """Adds after - before, per thread group and per step (of `steps`), into acc."""
    for tid, (group, *now) in after.items():
        was = before.get(tid, (group, 0, 0, 0, 0))[1:]
        d = acc.setdefault(group, {"cpu_s": 0.0, "runqueue_s": 0.0, "vcsw": 0.0, "ivcsw": 0.0})
        for key, x, y in zip(("cpu_s", "runqueue_s", "vcsw", "ivcsw"), now, was, strict=True):
            d[key] += (x - y) / steps


def child_main(system, rank, cfg):
    signal.alarm(max(1, int(cfg["alarm_s"])))  # if the parent is gone, this ends the rank
    d = cfg["out_dir"]
    with open(os.path.join(d, f"pid-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    res = run_rank(system, rank, cfg)
    tmp = os.path.join(d, f".rank-{rank}.json")
    with open(tmp, "w") as f:
        json.dump(res, f)
    os.replace(tmp, os.path.join(d, f"rank-{rank}.json"))


# ----------------------------------------------------------------------------------------------
# orchestration (parent process)


def launch(system, cfg, tmpdir, tag, deadline):
    """Runs one pair of ranks. Returns ({rank: result}, error or None, CPU pressure)."""
    out_dir = os.path.join(tmpdir, tag)
    os.makedirs(out_dir)
    cfg = dict(cfg, port=free_port(), out_dir=out_dir, alarm_s=deadline + 15)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if system == "ours_nospin":
        env["PARALLEL_SPIN_US"] = "0"
    argvs = [
        [sys.executable, SCRIPT, "--child", system, "--rank", str(r), "--cfg", json.dumps(cfg)]
        for r in range(WORLD)
    ]
    return launch_ranks(argvs, out_dir, env, deadline, SCRIPT)


def _med(xs):
    return statistics.median(xs)


def per_launch(ranks):
    """The figures of one launch: per rank the median over its steps, then the mean of the ranks."""

    def fig(mode, key):
        return statistics.fmean(_med([s[key] for s in rr["samples"][mode]]) for rr in ranks.values())

    f = {
        "compute_step_s": fig("compute", "step_s"),
        "comm_step_s": fig("comm", "step_s"),
        "overlap_step_s": fig("overlap", "step_s"),
        "compute_alone_s": fig("compute", "compute_s"),
        "compute_in_overlap_s": fig("overlap", "compute_s"),
        "comm_cpu_s": fig("comm", "cpu_s"),
        "compute_step_cpu_s": fig("compute", "cpu_s"),
        "overlap_step_cpu_s": fig("overlap", "cpu_s"),
        "final_wait_s": fig("overlap", "wait_s"),
        "others_cpu_during_compute_s": fig("overlap", "others_cpu_before_wait_s"),
    }
    off_alone = fig("compute", "compute_s") - fig("compute", "compute_cpu_s")
    off_overlap = fig("overlap", "compute_s") - fig("overlap", "compute_cpu_s")
    f["slowdown_s"] = f["compute_in_overlap_s"] - f["compute_alone_s"]
    f["preempted_s"] = off_overlap - off_alone
    # CPU the communication took while overlapped: the overlap step's process CPU minus the
    # compute step's (both do the same matmuls).
    f["comm_cpu_in_overlap_s"] = f["overlap_step_cpu_s"] - f["compute_step_cpu_s"]
    c, m, s = f["compute_step_s"], f["comm_step_s"], f["overlap_step_s"]
    f["efficiency"] = (c + m - s) / min(c, m)
    return f


def thread_figures(ranks):
    """Per mode and thread group: CPU, runqueue wait and context switches per step, the mean of
    the two ranks."""
    out = {}
    for mode in MODES:
        groups = {g for rr in ranks.values() for g in rr["threads"][mode]}
        out[mode] = {
            g: {
                k: statistics.fmean(rr["threads"][mode].get(g, {}).get(k, 0.0) for rr in ranks.values())
                for k in ("cpu_s", "runqueue_s", "vcsw", "ivcsw")
            }
            for g in sorted(groups)
        }
    return out


KEYS = (
    "compute_step_s",
    "comm_step_s",
    "overlap_step_s",
    "compute_alone_s",
    "compute_in_overlap_s",
    "slowdown_s",
    "preempted_s",
    "comm_cpu_s",
    "comm_cpu_in_overlap_s",
    "final_wait_s",
    "others_cpu_during_compute_s",
    "efficiency",
)


def summarize(runs):
    ok = [r for r in runs if r.get("status") == "ok"]
    if not ok:
        last = runs[-1] if runs else {"status": "skipped"}
        return {"status": last.get("status"), "note": last.get("note", "")}
    per = [r["figures"] for r in ok]
    out = {
        "status": "ok",
        "launches": len(ok),
        "of": len(runs),
        "verified": all(r["verified"] for r in ok),
        "per_launch": per,
        "median": {k: _med([p[k] for p in per]) for k in KEYS},
        "min": {k: min(p[k] for p in per) for k in KEYS},
        "max": {k: max(p[k] for p in per) for k in KEYS},
        "cpu_pressure": [r.get("cpu_pressure") for r in ok],
        "links": ok[-1].get("links"),
        "threads": _median_threads([r["threads"] for r in ok]),
    }
    if len(ok) < len(runs):
        out["note"] = f"{len(runs) - len(ok)} launch(es) failed: {runs[-1].get('note', '')}"[:300]
    return out


def _median_threads(per):
    """Per mode, group and figure: the median over the launches (0 where a launch lacked it)."""
    out = {}
    for mode in MODES:
        groups = sorted({g for p in per for g in p[mode]})
        out[mode] = {
            g: {
                k: _med([p[mode].get(g, {}).get(k, 0.0) for p in per])
                for k in ("cpu_s", "runqueue_s", "vcsw", "ivcsw")
            }
            for g in groups
        }
    return out


def verdicts(rows):
    """Per system: slowdown against its own comm CPU, and (ours) against gloo's."""
    g = rows.get("gloo", {})
    g_ok = g.get("status") == "ok"
    out = {}
    for name, r in rows.items():
        if r.get("status") != "ok":
            out[name] = f"not measured ({r.get('status')}: {r.get('note', '')[:300]})"
            continue
        m = r["median"]
        slow, own = m["slowdown_s"], m["comm_cpu_s"]
        if slow <= own:
            met = "met"
        elif slow <= r["max"]["comm_cpu_s"]:
            met = (
                f"MISSED by {_ms(slow - own)}, inside the spread of its comm CPU over the launches "
                f"({_ms(r['min']['comm_cpu_s'])} .. {_ms(r['max']['comm_cpu_s'])})"
            )
        else:
            met = f"MISSED by {_ms(slow - own)}"
        text = (
            f"{met}: compute slowdown {_ms(slow)} per step against its own comm CPU {_ms(own)} "
            f"({_x(slow, own)}; per ms of concurrent comm CPU: "
            f"{_x(slow, m['others_cpu_during_compute_s'])})"
        )
        if name in OURS and g_ok:
            gm = g["median"]
            text += (
                f"; against gloo's comm CPU {_ms(gm['comm_cpu_s'])}: {_x(slow, gm['comm_cpu_s'])}, "
                f"against gloo's slowdown {_ms(gm['slowdown_s'])}"
                + f": {_x(slow, gm['slowdown_s'])}"
                + f"; overlapped step {_x(m['overlap_step_s'], gm['overlap_step_s'])} gloo's"
            )
        if not r["verified"]:
            text += "; WRONG RESULT on some rank"
        out[name] = text
    return out


# ----------------------------------------------------------------------------------------------
# report


def _x(a, b):
    """a / b as "1.23x", or "-" where b is not positive (a ratio to nothing says nothing)."""
    return f"{a / b:.2f}x" if b > 0 else "-"


def _ms(s):
    return "-" if s is None else f"{s * 1e3:.1f} ms"


def _cell(r, key, fmt=_ms):
    med, lo, hi = r["median"][key], r["min"][key], r["max"][key]
    if r["launches"] == 1:
        return f"**{fmt(med)}**"
    return f"**{fmt(med)}** ({fmt(lo)} .. {fmt(hi)})"


ROWS = (
    ("compute step alone", "compute_step_s", _ms),
    ("comm step alone", "comm_step_s", _ms),
    ("overlapped step", "overlap_step_s", _ms),
    ("compute inside the overlapped step", "compute_in_overlap_s", _ms),
    ("compute slowdown", "slowdown_s", _ms),
    ("of it, compute thread off its core", "preempted_s", _ms),
    ("comm CPU alone (what the bytes justify)", "comm_cpu_s", _ms),
    ("comm CPU while overlapped", "comm_cpu_in_overlap_s", _ms),
    ("final wait of the overlapped step", "final_wait_s", _ms),
    ("other threads' CPU while the compute ran", "others_cpu_during_compute_s", _ms),
    ("overlap efficiency", "efficiency", lambda x: f"{x:.2f}"),
)


def table(report):
    rows = report["systems"]
    names = [n for n in report["order"] if rows.get(n, {}).get("status") == "ok"]
    lines = ["| per rank and step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for title, key, fmt in ROWS:
        lines.append(f"| {title} | " + " | ".join(_cell(rows[n], key, fmt) for n in names) + " |")
    lines.append("| check | " + " | ".join("ok" if rows[n]["verified"] else "WRONG" for n in names) + " |")
    return lines


def thread_table(report):
    """Per system and thread group: CPU, runqueue wait and context switches per step and rank, in
    each kind of step (medians over the launches)."""
    lines = [
        "| system | threads | CPU: compute / comm / overlapped step | waiting for a core: compute / comm "
        "/ overlapped | voluntary switches: comm / overlapped | involuntary: comm / overlapped |",
        "|---|---|---|---|---|---|",
    ]
    for n in report["order"]:
        r = report["systems"].get(n, {})
        if r.get("status") != "ok":
            continue
        th = r["threads"]
        groups = sorted({g for mode in MODES for g in th[mode]}, key=lambda g: (g != "main", g))
        for g in groups:
            v = {
                mode: th[mode].get(g, {"cpu_s": 0, "runqueue_s": 0, "vcsw": 0, "ivcsw": 0}) for mode in MODES
            }
            if max(v[mode]["cpu_s"] for mode in MODES) < 0.2e-3:
                continue
            lines.append(
                f"| {n} | {g} | "
                + " / ".join(_ms(v[mode]["cpu_s"]) for mode in MODES)
                + " | "
                + " / ".join(_ms(v[mode]["runqueue_s"]) for mode in MODES)
                + f" | {v['comm']['vcsw']:.0f} / {v['overlap']['vcsw']:.0f}"
                + f" | {v['comm']['ivcsw']:.0f} / {v['overlap']['ivcsw']:.0f} |"
            )
    return lines


def render(report):
    a, m = report["args"], report["machine"]
    total = sum(a["buckets_mib"])
    L = [
        "## Overlap: all-reduce of gradient buckets during a simulated backward (p=2)",
        "",
        f"Run {report['started']} ({report['elapsed_s']:.0f} s), `{report['command']}`; "
        f"{a['reps']} launch(es) per system, interleaved; {m.get('nproc')} CPUs "
        f"({m.get('cpu_model', '?')}), torch {report.get('torch', '?')}, git {m.get('git')}; load average "
        f"at start / end: {' '.join(m.get('loadavg_start', []))} / {' '.join(m.get('loadavg_end', []))}.",
        "",
        f"A step: {len(a['buckets_mib'])} layers of {a['k']} float32 {a['n']}x{a['n']} matmuls on one "
        f"thread per rank; after each layer the all-reduce of its bucket starts asynchronously "
        f"(buckets {', '.join(f'{x:g}' for x in a['buckets_mib'])} MiB = {total:g} MiB per step); "
        f"all are waited for at the end. {a['rounds']} rounds of {a['block']} steps of each kind "
        "(compute alone, communication alone, overlapped) per launch, interleaved.",
        "",
        "Medians over the launches (range over the launches); per launch, each rank's median over its "
        "steps, averaged over the two ranks:",
        "",
    ]
    L += table(report)
    L += [
        "",
        "Where the CPU goes, per thread of a rank and per step (from /proc/<pid>/task/*/schedstat "
        "and status; 'main' computes and launches; medians over the launches):",
        "",
    ]
    L += thread_table(report)
    L += ["", "Verdicts (issue #14: the compute slowdown at most the communication's own CPU cost):", ""]
    for n in report["order"]:
        L.append(f"- `{n}`: {report['verdicts'][n]}")
    psi = {
        n: [x for x in (r.get("cpu_pressure") or []) if x is not None] for n, r in report["systems"].items()
    }
    L += [
        "",
        "Systems: "
        + "; ".join(f"`{n}` {LABEL[n]}" for n in report["order"])
        + ". CPU pressure per launch (share of the wall time some task waited for a CPU): "
        + "; ".join(f"{n} {', '.join(f'{x * 100:.0f} %' for x in v) or '?'}" for n, v in psi.items())
        + ".",
        "",
        "Definitions: compute slowdown = wall time of the same matmuls inside an overlapped step minus "
        "in a compute-only step; 'off its core' = the part of it in which the compute thread did not "
        "run (wall minus thread CPU time); comm CPU alone = user + system CPU of the whole process "
        "(every thread) over a communication-only step: the cost of moving and reducing the step's "
        "bytes on that system. With both cores busy computing, that CPU has to come out of the "
        "compute unless it fits in the compute's own stalls, so it is what the bytes justify, and "
        "gloo's is what users accept today. Comm CPU while overlapped = an overlapped step's process "
        "CPU minus a compute step's. Overlap efficiency = (compute step + comm step - overlapped "
        "step) / min(compute step, comm step): near 0 on 2 cores that the compute keeps busy, where "
        "the communication's CPU cannot hide. A system whose all-reduces finish after the compute "
        "(a long final wait) spends that part of its CPU where it slows nothing: compare the "
        "slowdown with the other threads' CPU while the compute ran too (the verdicts' 'per ms of "
        "concurrent comm CPU'). Every bucket is checked (rank-dependent data) before and after the "
        "timed steps; the timed steps reduce zeros. Other work on the machine competes too: compare "
        "systems within one run.",
    ]
    return "\n".join(L) + "\n"


def print_console(report):
    for lines in (table(report), thread_table(report)):
        rows = [
            [c.strip().replace("**", "") for c in ln.strip("|").split("|")]
            for ln in lines
            if not ln.startswith("|---")
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print()
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print()
    for n in report["order"]:
        print(f"  {n}: {report['verdicts'][n]}")


# ----------------------------------------------------------------------------------------------

PROBE = r"""
import json
out = {}
try:
    import torch
    out["torch"] = torch.__version__
    import torch_parallel as p
    out["version"] = getattr(p, "__version__", None)
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print("PROBE" + json.dumps(out, default=str))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 launch per system, fewer steps")
    ap.add_argument("--only", default="", help=f"comma list of: {', '.join(SYSTEMS)}")
    ap.add_argument("--reps", type=int, default=None, help="launches per system (default 5; quick 1)")
    ap.add_argument("--buckets", default="2,8,16,25,16,8,4,1", help="bucket sizes, MiB, one per layer")
    ap.add_argument("--n", type=int, default=512, help="matmul size N (N x N float32)")
    ap.add_argument("--k", type=int, default=4, help="matmuls per layer")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of blocks per launch (default 4)")
    ap.add_argument("--block", type=int, default=3, help="steps per block")
    ap.add_argument("--timeout", type=float, default=None, help="deadline per launch, s")
    ap.add_argument("--json", default="bench-out/overlap.json")
    ap.add_argument("--md", default="bench-out/overlap.md")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main(a.child, a.rank, json.loads(a.cfg))
        return
    a.reps = a.reps or (1 if a.quick else 5)
    a.rounds = a.rounds or (2 if a.quick else 4)
    a.buckets_mib = [float(x) for x in a.buckets.split(",") if x.strip()]
    systems = [s.strip() for s in a.only.split(",") if s.strip()] or list(DEFAULT)
    bad = [s for s in systems if s not in SYSTEMS]
    if bad or a.reps < 1 or not a.buckets_mib or min(a.buckets_mib) <= 0:
        raise SystemExit(f"--only {bad}: use {', '.join(SYSTEMS)}; --reps >= 1; buckets > 0")
    warmup = 1
    steps = len(MODES) * (a.rounds * a.block + warmup) + 2
    # Deadline: startup, then every step at a pathological 3 s (a healthy one takes ~0.1-0.2 s).
    deadline = a.timeout or (90 + 3.0 * steps)
    cfg = {
        "buckets_mib": a.buckets_mib,
        "n": a.n,
        "k": a.k,
        "rounds": a.rounds,
        "block": a.block,
        "warmup": warmup,
    }
    started, t_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.monotonic()
    machine = machine_info()
    probe = run_probe(PROBE, 120, "import torch_parallel")
    runs = {s: [] for s in systems}
    tmpdir = tempfile.mkdtemp(prefix="parallel-overlap-")
    try:
        for rep in range(a.reps):
            for s in systems:
                if s in OURS and "error" in probe:
                    if rep == 0:
                        runs[s].append({"status": "skipped", "note": probe["error"]})
                    continue
                print(f"[launch {rep + 1}/{a.reps}] {s} ...", end=" ", flush=True)
                t0 = time.monotonic()
                res, err, psi = launch(s, cfg, tmpdir, f"{s}-{rep}", deadline)
                if err:
                    runs[s].append({"status": "error", "note": err})
                    print(f"error: {err}", flush=True)
                    continue
                f = per_launch(res)
                th = thread_figures(res)
                ok = all(r["verified"] for r in res.values())
                runs[s].append(
                    {
                        "status": "ok",
                        "figures": f,
                        "verified": ok,
                        "cpu_pressure": psi,
                        "links": res[0].get("links"),
                        "threads": th,
                        "ranks": res,
                    }
                )
                print(
                    f"compute {_ms(f['compute_step_s'])}, comm {_ms(f['comm_step_s'])}, overlap "
                    f"{_ms(f['overlap_step_s'])}, slowdown {_ms(f['slowdown_s'])}, comm CPU "
                    f"{_ms(f['comm_cpu_s'])} ({time.monotonic() - t0:.0f} s, CPU pressure "
                    f"{'?' if psi is None else f'{psi * 100:.0f} %'})" + ("" if ok else "  WRONG RESULT"),
                    flush=True,
                )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    rows = {s: summarize(runs[s]) for s in systems}
    machine["loadavg_end"] = read_text("/proc/loadavg").split()[:3]
    exe = sys.executable
    report = {
        "started": started,
        "elapsed_s": time.monotonic() - t_start,
        "command": " ".join([os.path.relpath(exe) if exe.startswith(os.getcwd()) else "python", *sys.argv]),
        "args": vars(a) | {"deadline_s": deadline, "t_op_s": T_OP},
        "machine": machine,
        "torch": probe.get("torch"),
        "torch_parallel": probe,
        "order": systems,
        "systems": rows,
        "verdicts": verdicts(rows),
        "units": {"time": "seconds per rank and step"},
        "runs": runs,
    }
    print_console(report)
    for path, text in ((a.json, json.dumps(report, indent=1, default=str)), (a.md, render(report))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    print(f"\nwrote {', '.join(p for p in (a.json, a.md) if p)} ({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()

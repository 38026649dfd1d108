"""FSDP's collectives through torch.distributed: all_gather_into_tensor (the forward's parameter
gather) and reduce_scatter_tensor (the backward's gradient reduce-scatter), on the backend
"parallel" against gloo, in one run.

Two ranks on this machine (default), each a separate process with one thread of torch compute:
    ours_dist  dist.init_process_group("parallel", ...) (`import torch_parallel` registers it)
    gloo       dist.init_process_group("gloo", ...)
Sizes are the whole tensor (all_gather_into_tensor's output, reduce_scatter_tensor's input):
1, 4, 16 and 64 MiB of float32; each rank holds 1/p of it in the other tensor.

Per launch, per size and op: one call with rank-dependent data whose result is checked on every
rank (all-gather: slot r holds rank r's values; reduce-scatter: each element the sum over
ranks), warm-up calls, then timed calls, each after a barrier and timed alone on rank 0
(time.perf_counter around the call, async_op=False). Launches alternate systems (--reps each);
a system's figure is the median of its launches' medians, with their range.

Every rank is a fresh process started with subprocess (this orchestrating process imports
neither torch nor torch_parallel), in its own session; each launch has a deadline after which
its process groups and every rank (by the pid it wrote) are terminated, then killed, and each
rank arms SIGALRM a little after that deadline.

Usage:
  .venv/bin/python benches/fsdp_collectives.py              # 3 launches per system (~1 minute)
  .venv/bin/python benches/fsdp_collectives.py --quick      # 1 launch per system, fewer calls
Writes --json (default bench-out/fsdp_collectives.json) and --md (default
bench-out/fsdp_collectives.md).
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

from _common import HOST, free_port, git_revision, launch_ranks

SCRIPT = os.path.abspath(__file__)
MiB = 1 << 20
SYSTEMS = ("ours_dist", "gloo")
OPS = ("all_gather_into_tensor", "reduce_scatter_tensor")
SIZES = {"1MiB": MiB, "4MiB": 4 * MiB, "16MiB": 16 * MiB, "64MiB": 64 * MiB}
ITERS = {"1MiB": 50, "4MiB": 30, "16MiB": 15, "64MiB": 10}
ITERS_QUICK = {"1MiB": 10, "4MiB": 6, "16MiB": 4, "64MiB": 3}


# ----------------------------------------------------------------------------------------------
# one rank


def run_rank(system, rank, cfg):
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if system == "ours_dist":
        import torch_parallel  # noqa: F401  (registers the backend "parallel")
    torch.set_num_threads(1)
    world = cfg["world"]
    dist.init_process_group(
        "parallel" if system == "ours_dist" else "gloo",
        init_method=f"tcp://{HOST}:{cfg['port']}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=cfg["t_op"]),
    )
    out = {}
    for label in cfg["sizes"]:
        n = SIZES[label] // 4  # float32 elements of the whole tensor
        part = n // world
        whole = torch.empty(part * world)
        mine = torch.empty(part)
        for op in OPS:
            if op == "all_gather_into_tensor":

                def call(whole=whole, mine=mine):
                    dist.all_gather_into_tensor(whole, mine)

                mine.copy_(torch.arange(part, dtype=torch.float32) + rank * part)
                call()
                ok = bool(torch.equal(whole, torch.arange(part * world, dtype=torch.float32)))
            else:

                def call(whole=whole, mine=mine):
                    dist.reduce_scatter_tensor(mine, whole)

                whole.fill_(float(rank + 1))
                call()
                ok = bool(torch.all(mine == world * (world + 1) / 2))
            for _ in range(3):
                call()
            lat = []
            for _ in range(cfg["iters"][label]):
                dist.barrier()
                t0 = time.perf_counter()
                call()
                lat.append(time.perf_counter() - t0)
            out[f"{op} {label}"] = {"median_s": statistics.median(lat), "samples_s": lat, "verified": ok}
    dist.barrier()
    dist.destroy_process_group()
    return {"ops": out, "torch": torch.__version__}


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
    """Runs one set of ranks. Returns ({rank: result}, error or None, CPU pressure)."""
    out_dir = os.path.join(tmpdir, tag)
    os.makedirs(out_dir)
    world = cfg["world"]
    cfg = dict(cfg, port=free_port(), out_dir=out_dir, alarm_s=deadline + 15)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    argvs = [
        [sys.executable, SCRIPT, "--child", system, "--rank", str(r), "--cfg", json.dumps(cfg)]
        for r in range(world)
    ]
    return launch_ranks(argvs, out_dir, env, deadline, SCRIPT)


def fmt_t(s):
    if s is None:
        return "-"
    return f"{s * 1e6:.0f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def summarize(runs):
    """Per system and (op, size): the median of the launches' rank-0 medians, their range, and
    whether every rank of every launch verified its result."""
    rows = {}
    for system, launches in runs.items():
        ok = [x for x in launches if x["error"] is None]
        row = {
            "launches": len(launches),
            "ok": len(ok),
            "errors": [x["error"] for x in launches if x["error"]],
        }
        row["psi"] = [x["psi"] for x in ok]
        for key in ok[0]["ranks"]["0"]["ops"] if ok else []:
            meds = [x["ranks"]["0"]["ops"][key]["median_s"] for x in ok]
            verified = all(rr["ops"][key]["verified"] for x in ok for rr in x["ranks"].values())
            row[key] = {"median_s": statistics.median(meds), "launch_medians_s": meds, "verified": verified}
        rows[system] = row
    return rows


def render(report):
    rows, a = report["rows"], report["args"]
    L = ["## FSDP's collectives through torch.distributed (`benches/fsdp_collectives.py`)", ""]
    L.append(
        f"{a['world']} ranks, float32; the size is the whole tensor (all_gather_into_tensor's output, "
        f"reduce_scatter_tensor's input), each rank holding 1/{a['world']} of it; {a['reps']} launch(es) "
        f"per system, alternating; per launch rank 0's median call. Run {report['started']}, "
        f"git {report['git']}, torch {report['torch']}."
    )
    L.append("")
    L.append("| op | size | ours_dist | gloo | ours / gloo | ours_dist launches | gloo launches | check |")
    L.append("|---|---|---|---|---|---|---|---|")
    for op in OPS:
        for label in a["sizes"]:
            key = f"{op} {label}"
            o, g = rows.get("ours_dist", {}).get(key), rows.get("gloo", {}).get(key)
            ratio = f"**{o['median_s'] / g['median_s']:.2f}x**" if o and g else "-"
            rng = [", ".join(fmt_t(x) for x in r["launch_medians_s"]) if r else "-" for r in (o, g)]
            check = "ok" if all(r is None or r["verified"] for r in (o, g)) else "WRONG RESULT"
            L.append(
                f"| {op} | {label} | {fmt_t(o and o['median_s'])} | {fmt_t(g and g['median_s'])} "
                f"| {ratio} | {rng[0]} | {rng[1]} | {check} |"
            )
    for system, r in rows.items():
        if r["errors"]:
            L.append(
                f"- `{system}`: {len(r['errors'])} of {r['launches']} launch(es) failed: "
                f"{r['errors'][-1][:300]}"
            )
    L.append("")
    L.append(
        "Method: every call after a barrier, `async_op=False`; the first call of each size and op "
        "checks its result on every rank (all-gather: every rank's values in its slot; "
        "reduce-scatter: the sum over ranks). The backend's all_gather_into_tensor of CPU tensors "
        "takes the ring's all-gather (Tree.all_gather_into) from the ring's threshold up, and a "
        "bitwise-or all-reduce over zero-filled parts below it; its reduce_scatter_tensor copies "
        "the input into a working buffer kept between calls and reduce-scatters it in place by "
        "the ring (an all-reduce below the threshold)."
    )
    return "\n".join(L) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 launch per system, fewer calls")
    ap.add_argument("--reps", type=int, default=None, help="launches per system (default 3; quick 1)")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--sizes", default=",".join(SIZES), help=f"comma list of: {', '.join(SIZES)}")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"comma list of: {', '.join(SYSTEMS)}")
    ap.add_argument("--json", default="bench-out/fsdp_collectives.json")
    ap.add_argument("--md", default="bench-out/fsdp_collectives.md")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main(a.child, a.rank, json.loads(a.cfg))
        return 0
    sizes = [s for s in a.sizes.split(",") if s]
    systems = [s for s in a.only.split(",") if s]
    bad = [s for s in sizes if s not in SIZES] + [s for s in systems if s not in SYSTEMS]
    if bad:
        raise SystemExit(f"unknown size or system: {bad}")
    a.reps = a.reps or (1 if a.quick else 3)
    iters = ITERS_QUICK if a.quick else ITERS
    cfg = {"world": a.world, "sizes": sizes, "iters": iters, "t_op": 120}
    deadline = 60 + sum(iters[s] * SIZES[s] / MiB for s in sizes) * 0.5
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    runs = {s: [] for s in systems}
    tmpdir = tempfile.mkdtemp(prefix="parallel-fsdp-")
    try:
        for rep in range(a.reps):
            for system in systems:
                print(f"[rep {rep + 1}/{a.reps}] {system} ...", end=" ", flush=True)
                res, err, psi = launch(system, cfg, tmpdir, f"{system}-{rep}", deadline)
                ranks = {str(r): v for r, v in res.items()}
                runs[system].append({"ranks": ranks, "error": err, "psi": psi})
                if err:
                    print(f"FAILED: {err[:300]}", flush=True)
                else:
                    r0 = ranks["0"]["ops"]
                    wrong = [k for k in r0 if not all(rr["ops"][k]["verified"] for rr in ranks.values())]
                    print(
                        ", ".join(f"{k} {fmt_t(v['median_s'])}" for k, v in r0.items())
                        + (f"  WRONG RESULT at {wrong}" if wrong else ""),
                        flush=True,
                    )
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    torch_version = next(
        (x["ranks"]["0"]["torch"] for s in systems for x in runs[s] if x["error"] is None), "?"
    )
    report = {
        "started": started,
        "git": git_revision(),
        "torch": torch_version,
        "args": {"world": a.world, "reps": a.reps, "sizes": sizes, "iters": iters},
        "rows": summarize(runs),
    }
    for path in (a.json, a.md):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(report | {"runs": runs}, f, indent=1)
    with open(a.md, "w") as f:
        f.write(render(report))
    print(render(report))
    bad_rows = [
        k for r in report["rows"].values() for k, v in r.items() if isinstance(v, dict) and not v["verified"]
    ]
    return 1 if bad_rows else 0


if __name__ == "__main__":
    sys.exit(main())

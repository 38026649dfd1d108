"""CUDA benchmark (issue #5): torch_parallel with CUDA tensors against the obvious alternatives, in one run.

Two processes on one GPU (cuda:0), float32 tensors:
  (a) ipc       client.send(t) of 1 GiB / conn.recv(out=preallocated CUDA tensor), defaults (CUDA IPC)
      d2d       peer: dst.copy_(src); torch.cuda.synchronize() of the same size, in the receiving
                process of the same run (before and after the transfers)
                target: ipc rate >= 0.8 x d2d rate; run twice: as shipped (the receiver closes
                each CUDA IPC mapping after its copy) and with PARALLEL_CUDA_IPC_CACHE=16
  (b) staged    64 MiB and 256 MiB with PARALLEL_CUDA_IPC=0 (shared-memory link, "shm") and with
                PARALLEL_CUDA_IPC=0 PARALLEL_SHM=0 (TCP link, "tcp"):
      ours      client.send(cuda_tensor) / conn.recv(out=preallocated CUDA tensor)
      manual    peer, same processes and link: client.send(t.cpu()) /
                conn.recv(out=preallocated CPU tensor); buf.cuda(); torch.cuda.synchronize()
                ours and manual alternate message by message
  (c) allreduce 1 MiB and 64 MiB, p=2, in place, every element checked once:
      ours      tree = torch_parallel.tree(rank, 2, "127.0.0.1:PORT"); tree.all_reduce(t)
      gloo      peer: torch.distributed gloo with the same CUDA tensors, dist.all_reduce(t),
                init_method tcp://127.0.0.1:PORT
                each op followed by torch.cuda.synchronize() in both

Method. (a), (b): timed on the sender, as benches/transport.py: t0; send one message; wait for
a 1-byte ack the receiver sends once its receive returned (the data is then on the device); t1.
The first --warm messages of each kind are not timed (the first one is checked element by element
on the receiver, which zeroes its buffer before it). Rate = bytes / median time, 1 GB/s = 1e9 B/s.
(c): as benches/allreduce.py: per size one checked all-reduce of rank-dependent data, buffer zeroed,
warm-up ops, a barrier, then timed ops, each timed alone on rank 0; --reps fresh process pairs per
system, systems interleaved; the figure is the median of the per-rep medians.

Every process is started with subprocess (this orchestrating process imports neither torch nor
torch_parallel), each in its own session; every launch has a deadline after which its process
groups are terminated, then killed; every child also arms SIGALRM a little after that deadline.
Without a CUDA device, prints why and exits 0.

Usage:
  .venv/bin/python benches/cuda.py              # full run (about 2 minutes on an H100)
  .venv/bin/python benches/cuda.py --quick      # smoke run
  .venv/bin/python benches/cuda.py --only a,c   # parts a, b, c
Writes --json (default bench-out/cuda.json) and --md (default bench-out/cuda.md). Exits 1 when a
part failed or a result was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from _common import HOST, cmd, free_port, git_revision, run_probe, stop_ranks, tail

MiB = 1 << 20
GiB = 1 << 30
SCRIPT = os.path.abspath(__file__)
SIZES = {"1MiB": MiB, "64MiB": 64 * MiB, "256MiB": 256 * MiB, "1GiB": GiB}
TARGET_IPC_VS_D2D = 0.8
KNOBS = (
    "PARALLEL_CUDA",
    "PARALLEL_CUDA_IPC",
    "PARALLEL_CUDA_IPC_CACHE",
    "PARALLEL_CUDA_IPC_THRESHOLD",
    "PARALLEL_SHM",
)
STAGED = {"shm": {"PARALLEL_CUDA_IPC": "0"}, "tcp": {"PARALLEL_CUDA_IPC": "0", "PARALLEL_SHM": "0"}}
ITERS = {"1MiB": 100, "64MiB": 20}
ITERS_QUICK = {"1MiB": 30, "64MiB": 5}


# ----------------------------------------------------------------------------------------------
# children


def summary(times, nbytes):
    s = sorted(times)
    med = statistics.median(s)
    return {
        "n": len(s),
        "median_s": med,
        "p10_s": s[int(0.1 * (len(s) - 1))],
        "p90_s": s[int(0.9 * (len(s) - 1) + 0.5)],
        "min_s": s[0],
        "GBps": nbytes / med / 1e9,
    }


def payload(numel, dev):
    """The sent tensor, rebuilt by the receiver to check: exact in float32, period 65521."""
    import torch

    return (torch.arange(numel, dtype=torch.int32, device=dev) % 65521).float()


def d2d(nbytes, reps, warm):
    import torch

    src = payload(nbytes // 4, "cuda:0")
    dst = torch.empty_like(src)
    times = []
    for i in range(warm + reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    assert torch.equal(dst, src)
    return times


def child_recv(cfg):
    import torch

    import torch_parallel as parallel

    t_op = cfg["t_op"]
    s = parallel.server(HOST, cfg["port"])
    hello, conn = s.recv_any_from(timeout=t_op)
    assert hello == "hello", hello
    res = {"verified": {}, "link": conn.link}
    d2d_times = {label: [] for label in cfg["sizes"]} if cfg["d2d"] else {}
    for label in d2d_times:
        d2d_times[label] += d2d(SIZES[label], cfg["reps"], cfg["warm"])
    conn.send("ready", timeout=t_op)
    for label in cfg["sizes"]:
        numel = SIZES[label] // 4
        expected = payload(numel, "cuda:0")
        gpu_out = torch.empty(numel, device="cuda:0")
        cpu_buf = torch.empty(numel) if "manual" in cfg["methods"] else None
        for i in range(cfg["warm"] + cfg["reps"]):
            for m in cfg["methods"]:
                if m == "ours":
                    if i == 0:
                        gpu_out.zero_()
                    got = conn.recv(timeout=t_op, out=gpu_out)
                    ok = got is gpu_out
                else:
                    conn.recv(timeout=t_op, out=cpu_buf)
                    got = cpu_buf.cuda()
                    torch.cuda.synchronize()
                    ok = True
                if i == 0:
                    res["verified"][f"{label} {m}"] = bool(ok and torch.equal(got, expected))
                conn.send(b"k", timeout=t_op)
        del expected, gpu_out, cpu_buf, got
        torch.cuda.empty_cache()
    assert conn.recv(timeout=t_op) == "end"
    for label in d2d_times:
        d2d_times[label] += d2d(SIZES[label], cfg["reps"], cfg["warm"])
        res.setdefault("d2d", {})[label] = summary(d2d_times[label], SIZES[label])
    conn.send("done", timeout=t_op)
    res["stats"] = conn.stats()
    time.sleep(0.2)
    s.close()
    return res


def child_send(cfg):
    import torch

    import torch_parallel as parallel

    t_op = cfg["t_op"]
    c = parallel.client(HOST, cfg["port"], timeout=t_op)
    c.send("hello", timeout=t_op)
    assert c.recv(timeout=t_op) == "ready"
    res = {"link": c.link, "sizes": {}}
    pc = time.perf_counter
    for label in cfg["sizes"]:
        t = payload(SIZES[label] // 4, "cuda:0")
        torch.cuda.synchronize()
        times = {m: [] for m in cfg["methods"]}
        for i in range(cfg["warm"] + cfg["reps"]):
            for m in cfg["methods"]:
                t0 = pc()
                c.send(t if m == "ours" else t.cpu(), timeout=t_op)
                ack = c.recv(timeout=t_op)
                dt = pc() - t0
                assert ack == b"k", ack
                if i >= cfg["warm"]:
                    times[m].append(dt)
        res["sizes"][label] = {m: summary(times[m], SIZES[label]) for m in cfg["methods"]}
        del t
        torch.cuda.empty_cache()
    c.send("end", timeout=t_op)
    assert c.recv(timeout=t_op) == "done"
    res["stats"] = c.stats()
    c.close()
    return res


def child_allreduce(system, rank, cfg):
    import torch

    dev = torch.device("cuda", 0)
    if system == "gloo":
        from datetime import timedelta

        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{HOST}:{cfg['port']}",
            rank=rank,
            world_size=2,
            timeout=timedelta(seconds=cfg["t_op"]),
        )
        op, barrier, extra = dist.all_reduce, dist.barrier, {"version": torch.__version__}
    else:
        import torch_parallel as parallel

        tree = parallel.tree(rank=rank, world_size=2, root=f"{HOST}:{cfg['port']}", timeout=cfg["t_op"])
        op, barrier = tree.all_reduce, tree.barrier
        extra = {"plan": tree.plan(), "version": getattr(parallel, "__version__", None)}
    out = {}
    for label in cfg["sizes"]:
        nbytes, iters = SIZES[label], cfg["iters"][label]
        buf = torch.full((nbytes // 4,), float(rank + 1), device=dev)
        op(buf)
        torch.cuda.synchronize()
        ok = bool(torch.all(buf == 3.0).item())
        buf.zero_()
        for _ in range(max(3, iters // 10)):
            op(buf)
        torch.cuda.synchronize()
        barrier()
        lat = []
        for _ in range(iters):
            t0 = time.perf_counter()
            op(buf)
            torch.cuda.synchronize()
            lat.append(time.perf_counter() - t0)
        out[label] = summary(lat, nbytes) | {"verified": ok}
        del buf
    barrier()
    if system == "gloo":
        dist.destroy_process_group()
    else:
        extra["stats"] = tree.stats()
    return {"sizes": out, **extra}


def child_main(role, rank, cfg):
    signal.alarm(max(1, int(cfg["alarm_s"])))  # if the parent is gone, do not linger
    d = cfg["out_dir"]
    with open(os.path.join(d, f"pid-{role}-{rank}"), "w") as f:
        f.write(str(os.getpid()))
    if role == "recv":
        res = child_recv(cfg)
    elif role == "send":
        res = child_send(cfg)
    else:
        res = child_allreduce(role, rank, cfg)
    tmp = os.path.join(d, f".{role}-{rank}.json")
    with open(tmp, "w") as f:
        json.dump(res, f, default=str)
    os.replace(tmp, os.path.join(d, f"{role}-{rank}.json"))


# ----------------------------------------------------------------------------------------------
# orchestration


def launch(children, env_extra, cfg, tmpdir, tag, deadline):
    """Runs children [(role, rank)] together. Returns ({(role, rank): result}, error or None)."""
    out_dir = os.path.join(tmpdir, tag)
    os.makedirs(out_dir)
    cfg = dict(cfg, port=free_port(), out_dir=out_dir, alarm_s=deadline + 15)
    env = {k: v for k, v in os.environ.items() if k not in KNOBS}
    env.update(env_extra)
    procs, logs = [], []
    try:
        for role, rank in children:
            logs.append(os.path.join(out_dir, f"log-{role}-{rank}.txt"))
            argv = [sys.executable, SCRIPT, "--child", role, "--rank", str(rank), "--cfg", json.dumps(cfg)]
            with open(logs[-1], "w") as lf:
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.DEVNULL,
                        stdout=lf,
                        stderr=subprocess.STDOUT,
                        env=env,
                        start_new_session=True,
                    )
                )
        err, failed_at, t_end = None, None, time.monotonic() + deadline
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now >= t_end:
                err = f"timed out after {deadline:.0f} s"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                failed_at = failed_at or now
                if now - failed_at > 3:
                    break
            time.sleep(0.05)
    finally:
        stop_ranks(procs, out_dir, SCRIPT)
    results = {}
    for role, rank in children:
        path = os.path.join(out_dir, f"{role}-{rank}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[(role, rank)] = json.load(f)
    if err is None and len(results) < len(children):
        err = f"exit codes {[p.returncode for p in procs]}"
    tails = " | ".join(t for t in (tail(x) for x in logs) if t)
    if err and tails:
        err += ": " + tails[-800:]
    return results, err


PROBE = r"""
import json
out = {}
try:
    import torch
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    out["cuda"] = torch.cuda.is_available()
    if out["cuda"]:
        out["device"] = torch.cuda.get_device_name(0)
        out["device_count"] = torch.cuda.device_count()
    import torch_parallel as p
    out["torch_parallel"] = getattr(p, "__version__", None)
    out["cuda_available"] = getattr(p, "cuda_available", lambda: None)()
    out["cuda_info"] = getattr(p, "cuda_info", lambda: None)()
    out["config"] = {k: v for k, v in p.config().items() if "CUDA" in k or k == "PARALLEL_SHM"}
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print("PROBE" + json.dumps(out, default=str))
"""


def probe(timeout=120):
    return run_probe(PROBE, timeout, "importing torch")


def run_pair(env, cfg, tmpdir, tag, deadline):
    res, err = launch([("recv", 0), ("send", 0)], env, cfg, tmpdir, tag, deadline)
    if err:
        print(f"error: {err}", flush=True)
        return {"status": "error", "note": err}
    r, s = res[("recv", 0)], res[("send", 0)]
    bad = [k for k, v in r["verified"].items() if not v]
    out = {"status": "ok", "link": s["link"], "sizes": s["sizes"], "verified": r["verified"], "wrong": bad}
    out |= {"d2d": r["d2d"]} if "d2d" in r else {}
    out["stats"] = {"sender": s.get("stats"), "receiver": r.get("stats")}
    return out


# (a) runs twice: as shipped (each mapping closed after its copy, as CUDA requires before the
# sender may free the memory) and keeping mappings open across messages from the same allocation.
IPC_VARIANTS = {
    "default (mapping closed after each copy)": {},
    "PARALLEL_CUDA_IPC_CACHE=16 (mapping kept)": {"PARALLEL_CUDA_IPC_CACHE": "16"},
}


def part_a(a, tmpdir):
    out = {}
    for name, env in IPC_VARIANTS.items():
        cfg = {"sizes": ["1GiB"], "methods": ["ours"], "d2d": True, "reps": a.reps_p2p, "warm": a.warm}
        cfg["t_op"] = 120
        print(f"(a) CUDA IPC 1 GiB vs device-to-device copy, {name} ...", end=" ", flush=True)
        r = run_pair(env, cfg, tmpdir, "a", a.timeout)
        if r["status"] == "ok":
            ours, peer = r["sizes"]["1GiB"]["ours"], r["d2d"]["1GiB"]
            r["ratio"] = ours["GBps"] / peer["GBps"]
            r["target"] = f"ipc rate >= {TARGET_IPC_VS_D2D} x d2d rate"
            r["verdict"] = "met" if r["ratio"] >= TARGET_IPC_VS_D2D else "missed"
            wrong = f"  WRONG RESULT {r['wrong']}" if r["wrong"] else ""
            print(
                f"ours {ours['GBps']:.1f} GB/s, d2d {peer['GBps']:.1f} GB/s, ratio {r['ratio']:.2f} "
                f"({r['verdict']}; link {r['link']}){wrong}",
                flush=True,
            )
        out[name] = r
    return out


def part_b(a, tmpdir):
    out = {}
    for link, env in STAGED.items():
        cfg = {"sizes": ["64MiB", "256MiB"], "methods": ["ours", "manual"], "d2d": False}
        cfg |= {"reps": a.reps_p2p, "warm": a.warm, "t_op": 120}
        print(f"(b) staged over {link}, ours vs manual ...", end=" ", flush=True)
        r = run_pair(env, cfg, tmpdir, f"b-{link}", a.timeout)
        if r["status"] == "ok":
            r["env"] = env
            r["ratio"] = {k: v["ours"]["GBps"] / v["manual"]["GBps"] for k, v in r["sizes"].items()}
            print(
                ", ".join(
                    f"{k} ours {v['ours']['GBps']:.2f} / manual {v['manual']['GBps']:.2f} GB/s"
                    for k, v in r["sizes"].items()
                )
                + f" (link {r['link']})"
                + (f"  WRONG RESULT {r['wrong']}" if r["wrong"] else ""),
                flush=True,
            )
        out[link] = r
    return out


def part_c(a, tmpdir):
    iters = ITERS_QUICK if a.quick else ITERS
    cfg = {"sizes": list(iters), "iters": iters, "t_op": 120}
    runs = {"ours": [], "gloo": []}
    for rep in range(a.reps):
        for system in runs:
            print(f"(c) [rep {rep + 1}/{a.reps}] all-reduce {system} ...", end=" ", flush=True)
            res, err = launch([(system, 0), (system, 1)], {}, cfg, tmpdir, f"c-{system}-{rep}", a.timeout)
            if err:
                print(f"error: {err}", flush=True)
                runs[system].append({"status": "error", "note": err})
                continue
            r0 = res[(system, 0)]
            ok = all(res[(system, k)]["sizes"][s]["verified"] for k in (0, 1) for s in iters)
            runs[system].append({"status": "ok", "rank0": r0, "verified": ok})
            print(
                ", ".join(f"{s} {r0['sizes'][s]['median_s'] * 1e3:.3f} ms" for s in iters)
                + ("" if ok else "  WRONG RESULT"),
                flush=True,
            )
    out = {}
    for system, rs in runs.items():
        ok = [r for r in rs if r["status"] == "ok"]
        if not ok:
            out[system] = {"status": "error", "note": rs[-1]["note"] if rs else "not run"}
            continue
        sizes = {}
        for s in iters:
            meds = [r["rank0"]["sizes"][s]["median_s"] for r in ok]
            sizes[s] = {"median_s": statistics.median(meds), "rep_medians_s": meds}
        out[system] = {"status": "ok", "sizes": sizes, "verified": all(r["verified"] for r in ok)}
        out[system]["reps_ok"] = f"{len(ok)}/{len(rs)}"
        out[system] |= {k: ok[-1]["rank0"][k] for k in ("plan", "version") if k in ok[-1]["rank0"]}
    if all(out[s]["status"] == "ok" for s in out):
        out["ratio_time_ours_over_gloo"] = {
            s: out["ours"]["sizes"][s]["median_s"] / out["gloo"]["sizes"][s]["median_s"] for s in iters
        }
    return out


# ----------------------------------------------------------------------------------------------
# report


def fmt_t(s):
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def render(rep):
    p, L = rep["probe"], []
    L.append("## CUDA benchmark (issue #5)")
    L.append("")
    L.append(f"Run {rep['started']} ({rep['elapsed_s']:.0f} s), `{rep['command']}`.")
    L.append("")
    L.append(
        f"Machine: {p.get('device')} ({p.get('device_count')} visible), driver {rep['driver']}; "
        f"torch {p.get('torch')} (CUDA {p.get('torch_cuda')}); torch_parallel {p.get('torch_parallel')}, "
        f"{p.get('cuda_info')}; {rep['machine']['nproc']} CPUs; git {rep['machine']['git']}"
    )
    parts = rep["parts"]
    if "a" in parts:
        L += [
            "",
            "### (a) CUDA IPC, 1 GiB float32, process to process on cuda:0, vs a device-to-device copy",
            "",
        ]
        for name, r in parts["a"].items():
            if r["status"] != "ok":
                L.append(f"{name}: error: {r['note']}")
                continue
            o, d = r["sizes"]["1GiB"]["ours"], r["d2d"]["1GiB"]
            L += [f"{name}:", "", "| path | median | p10 | p90 | GB/s | check |", "|---|---|---|---|---|---|"]
            check = "WRONG" if r["wrong"] else "ok"
            L.append(
                f"| ours, CUDA IPC (link {r['link']}), recv(out=CUDA) | **{fmt_t(o['median_s'])}** | "
                f"{fmt_t(o['p10_s'])} | {fmt_t(o['p90_s'])} | {o['GBps']:.1f} | {check} |"
            )
            L.append(
                f"| d2d: dst.copy_(src); synchronize() | **{fmt_t(d['median_s'])}** | {fmt_t(d['p10_s'])} | "
                f"{fmt_t(d['p90_s'])} | {d['GBps']:.1f} | ok |"
            )
            L += [
                "",
                f"Rate ours / d2d: **{r['ratio']:.2f}** (target >= {TARGET_IPC_VS_D2D}: {r['verdict']}).",
                "",
            ]
    if "b" in parts:
        L += ["", "### (b) Staged transfers (PARALLEL_CUDA_IPC=0) vs t.cpu() -> send -> recv -> .cuda()", ""]
        L += [
            "| link | size | ours (CUDA in, CUDA out) | GB/s | manual (.cpu(), .cuda()) | GB/s "
            "| rate ours/manual | check |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for link, r in parts["b"].items():
            if r["status"] != "ok":
                L.append(f"| {link} | - | error: {r['note'][:200]} | | | | | |")
                continue
            for size, v in r["sizes"].items():
                o, m = v["ours"], v["manual"]
                check = "WRONG" if any(k.startswith(size) for k in r["wrong"]) else "ok"
                L.append(
                    f"| {r['link']} | {size} | **{fmt_t(o['median_s'])}** | {o['GBps']:.2f} | "
                    f"{fmt_t(m['median_s'])} | {m['GBps']:.2f} | {r['ratio'][size]:.2f}x | {check} |"
                )
    if "c" in parts:
        c = parts["c"]
        L += ["", "### (c) All-reduce of CUDA float32 tensors, p=2 on one GPU: ours vs gloo", ""]
        L += ["| size | ours | gloo | time ours/gloo (< 1: ours faster) | check |", "|---|---|---|---|---|"]
        ok = all(c[s]["status"] == "ok" for s in ("ours", "gloo"))
        for s in ITERS:
            cells = [
                f"**{fmt_t(c[k]['sizes'][s]['median_s'])}**" if c[k]["status"] == "ok" else "error"
                for k in ("ours", "gloo")
            ]
            ratio = f"{c['ratio_time_ours_over_gloo'][s]:.2f}" if ok else "-"
            check = "ok" if all(c[k].get("verified") for k in ("ours", "gloo")) else "WRONG or error"
            L.append(f"| {s} | {cells[0]} | {cells[1]} | {ratio} | {check} |")
        for k in ("ours", "gloo"):
            if c[k]["status"] != "ok":
                L.append(f"\n{k}: error: {c[k]['note'][:400]}")
    L += [
        "",
        f"Method: see the docstring of benches/cuda.py. (a), (b): {rep['args']['reps_p2p']} timed messages "
        f"of each kind after {rep['args']['warm']} warm-up ones, timed on the sender up to the receiver's "
        f"ack; (c): {rep['args']['reps']} fresh process pair(s) per system, median of the per-rep medians "
        "of rank 0's per-op times (each op followed by torch.cuda.synchronize()). 1 GB/s = 1e9 B/s.",
    ]
    return "\n".join(L) + "\n"


def failed(rep):
    parts = rep["parts"]
    pairs = list(parts.get("a", {}).values())
    pairs += list(parts.get("b", {}).values())
    if any(r["status"] != "ok" or r["wrong"] for r in pairs):
        return True
    c = parts.get("c")
    return bool(c) and not all(c[s]["status"] == "ok" and c[s]["verified"] for s in ("ours", "gloo"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: fewer messages and ops, 1 rep")
    ap.add_argument("--only", default="a,b,c", help="comma list of parts: a (ipc) b (staged) c (allreduce)")
    ap.add_argument("--reps", type=int, default=None, help="(c) fresh process pairs per system (default 3)")
    ap.add_argument("--timeout", type=float, default=240, help="deadline per launch, s")
    ap.add_argument("--json", default="bench-out/cuda.json")
    ap.add_argument("--md", default="bench-out/cuda.md")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cfg", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child_main(a.child, a.rank, json.loads(a.cfg))
        return 0
    a.reps = a.reps or (1 if a.quick else 3)
    a.reps_p2p, a.warm = (5, 2) if a.quick else (20, 3)
    parts = [x.strip() for x in a.only.split(",") if x.strip()]
    if not parts or any(x not in "abc" for x in parts):
        raise SystemExit("--only: a comma list of a, b, c")

    p = probe()
    if not p.get("cuda"):
        why = (
            p.get("error")
            or f"torch {p.get('torch')} sees no CUDA device (torch.cuda.is_available() is False)"
        )
        print(f"benches/cuda.py: nothing to measure here: {why}")
        return 0
    if "error" in p:
        print(f"torch_parallel cannot be imported: {p['error']} (bash scripts/setup.sh)")
        return 1
    print(f"{p['device']}; torch {p['torch']} (CUDA {p['torch_cuda']}); torch_parallel: {p.get('cuda_info')}")
    started, t_start = time.strftime("%Y-%m-%d %H:%M:%S %z"), time.monotonic()
    git = git_revision()
    machine = {"nproc": os.cpu_count(), "python": platform.python_version(), "git": git}
    driver = cmd(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "?"
    results = {}
    tmpdir = tempfile.mkdtemp(prefix="parallel-cuda-")
    try:
        for part, fn in (("a", part_a), ("b", part_b), ("c", part_c)):
            if part in parts:
                results[part] = fn(a, tmpdir)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    python = os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd()) else sys.executable
    report = {
        "started": started,
        "elapsed_s": time.monotonic() - t_start,
        "command": " ".join([python, *sys.argv]),
        "args": {k: v for k, v in vars(a).items() if k not in ("child", "rank", "cfg")},
        "probe": p,
        "driver": driver,
        "machine": machine,
        "units": {"time": "seconds", "rate": "GB/s, 1e9 B/s"},
        "parts": results,
    }
    md = render(report)
    print("\n" + md)
    for path, text in ((a.json, json.dumps(report, indent=1, default=str) + "\n"), (a.md, md)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    print(f"wrote {a.json}, {a.md} ({report['elapsed_s']:.0f} s)")
    return 1 if failed(report) else 0


if __name__ == "__main__":
    sys.exit(main())

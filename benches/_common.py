"""Helpers the benchmark programs share: ports, percentiles, CPU time, logs, subprocess probes,
launching a set of ranks, and the description of the machine a run was measured on.

Imported by the programs in benches/ (which run with this folder first on sys.path, as scripts
and as their own child processes).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pct(xs_sorted, q):
    """The q-quantile of sorted samples, linearly interpolated."""
    k = (len(xs_sorted) - 1) * q
    f = int(k)
    c = min(f + 1, len(xs_sorted) - 1)
    return xs_sorted[f] + (xs_sorted[c] - xs_sorted[f]) * (k - f)


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process, all threads (the engine's reactor threads too)."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def read_text(path):
    """A file's text, or "" when it cannot be read."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def cmd(args, timeout=10):
    """A command's stdout, stripped, or "" when it cannot run or overruns `timeout`."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def tail(path, n=3):
    """The last n non-empty lines of a log, joined."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.read()[-6000:].splitlines() if ln.strip()]
    except OSError:
        return ""
    return " / ".join(lines[-n:])


def run_probe(code, timeout, what):
    """Runs `code` (which prints one line "PROBE" + JSON) in a fresh interpreter; its dict, or
    {"error": ...} saying why there is none."""
    try:
        cp = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"{what} timed out after {timeout} s"}
    for line in cp.stdout.splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[5:])
    return {"error": (cp.stderr.strip().splitlines() or ["probe failed"])[-1]}


# The core-to-core probe (benches/probes/core_rtt.c): what two CPUs cost each other right now.
CORE_RTT_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "probes", "core_rtt.c")
# A cache-line round trip at or above this means the two CPUs do not share a last-level cache at
# the moment (on the VM the benches were written on: about 55 ns sharing one, 250-350 ns not).
CORE_RTT_NEAR_NS = 150.0
_core_rtt_bin = None


def core_probe(timeout=10):
    """One run of the core-to-core probe: {"rtt_ns", "read_1mib_us", "near"}, or {"error": why}.
    Compiled with the system's C compiler on first use, into this user's own folder under the
    temporary directory (mode 0700), named by the source's hash."""
    global _core_rtt_bin
    if _core_rtt_bin is None:
        _core_rtt_bin = _build_core_probe()
    if isinstance(_core_rtt_bin, dict):
        return dict(_core_rtt_bin)
    try:
        cp = subprocess.run([_core_rtt_bin], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the core probe overran {timeout} s"}
    except OSError as e:
        return {"error": f"the core probe could not run: {e}"}
    if cp.returncode != 0:
        why = cp.stderr.strip().splitlines() or [f"the core probe exited with {cp.returncode}"]
        return {"error": why[-1]}
    try:
        got = json.loads(cp.stdout)
        rtt, read = float(got["rtt_ns"]), float(got["read_1mib_us"])
    except (ValueError, KeyError, TypeError):
        return {"error": f"unreadable core probe output: {cp.stdout.strip()[:200]}"}
    return {"rtt_ns": rtt, "read_1mib_us": read, "near": rtt < CORE_RTT_NEAR_NS}


def _build_core_probe():
    """The probe's path, built if needed, or {"error": why}."""
    import hashlib
    import shutil
    import stat
    import tempfile

    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return {"error": "no C compiler (cc) to build benches/probes/core_rtt.c"}
    with open(CORE_RTT_SRC, "rb") as f:
        tag = hashlib.sha256(f.read()).hexdigest()[:12]
    home = os.path.join(tempfile.gettempdir(), f"parallel-probes-{os.getuid()}")
    try:
        os.makedirs(home, mode=0o700, exist_ok=True)
        st = os.lstat(home)
    except OSError as e:
        return {"error": f"no folder for the core probe: {e}"}
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        return {"error": f"{home} is not a folder of this user's that only it can write; remove it"}
    path = os.path.join(home, f"core-rtt-{tag}")
    if os.path.exists(path):
        return path
    tmp = f"{path}.{os.getpid()}"
    try:
        cp = subprocess.run(
            [cc, "-O2", "-pthread", "-o", tmp, CORE_RTT_SRC], capture_output=True, text=True, timeout=60
        )
        if cp.returncode != 0:
            return {"error": f"building the core probe failed: {cp.stderr.strip()[-300:]}"}
        os.replace(tmp, path)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": f"building the core probe failed: {e}"}
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def near_state(before, after):
    """A launch's placement from the probes right before and right after it: "near" (both found
    the two CPUs sharing a cache), "apart" (neither did), "changed", or "unknown"."""
    a, b = before.get("near"), after.get("near")
    if a is None or b is None:
        return "unknown"
    if a and b:
        return "near"
    return "apart" if not a and not b else "changed"


def fmt_probe(p):
    """ "52 ns" or "probe failed: why", for a log line."""
    return f"{p['rtt_ns']:.0f} ns" if "rtt_ns" in p else f"probe failed: {p.get('error')}"


def core_record(before, after):
    """What a launch keeps of the probes around it: both, and its state (near_state)."""
    return {"before": before, "after": after, "state": near_state(before, after)}


def fmt_core(rec):
    """ "near (52 ns / 55 ns)", for a log line or a report."""
    probes = f"{fmt_probe(rec.get('before', {}))} / {fmt_probe(rec.get('after', {}))}"
    return f"{rec.get('state', 'unknown')} ({probes})"


def near_spread(xs, states):
    """Largest / smallest of the figures whose launch was near (states: one per figure), or None
    with fewer than two such figures."""
    near = [x for x, s in zip(xs, states, strict=True) if s == "near"]
    return max(near) / min(near) if len(near) > 1 and min(near) > 0 else None


def git_revision():
    """The checkout's short commit, marked "(dirty)" with uncommitted changes."""
    here = os.path.dirname(os.path.abspath(__file__))
    rev = cmd(["git", "-C", here, "rev-parse", "--short", "HEAD"])
    if cmd(["git", "-C", here, "status", "--porcelain"]):
        rev += " (dirty)"
    return rev


def machine_info():
    """What every report records of the machine: cores, memory, CPU, kernel, huge pages, Python,
    git revision and the load when the run started. Programs add their peers' versions."""
    info = {"nproc": os.cpu_count()}
    try:
        info["usable_cpus"] = len(os.sched_getaffinity(0))
    except AttributeError:
        pass
    for line in read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            info["mem_GiB"] = round(int(line.split()[1]) / 2**20, 1)
    for line in read_text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            info["cpu_model"] = line.split(":", 1)[1].strip()
            break
    info["kernel"] = platform.release()
    thp = read_text("/sys/kernel/mm/transparent_hugepage/enabled").strip()
    if thp:
        info["thp"] = thp
    info["python"] = platform.python_version()
    info["git"] = git_revision()
    info["loadavg_start"] = read_text("/proc/loadavg").split()[:3]
    return info


def ours_child(pid, script):
    """Whether pid is still a rank of `script` (started with --child): guards against pid reuse."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return script.encode() in argv and b"--child" in argv


def stop_ranks(procs, out_dir, script):
    """Terminates, then kills, each launched process group and each rank of `script` that wrote
    its pid into out_dir (files pid-*)."""
    pids = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        if name.startswith("pid-"):
            try:
                with open(os.path.join(out_dir, name)) as f:
                    pids.append(int(f.read().strip()))
            except (OSError, ValueError):
                pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except OSError:
                    pass
        for pid in pids:
            if ours_child(pid, script):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        t_end = time.monotonic() + 3
        while time.monotonic() < t_end and (
            any(p.poll() is None for p in procs) or any(ours_child(x, script) for x in pids)
        ):
            time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.wait(2)


def cpu_stall_us():
    """Microseconds some task waited for a CPU since boot (/proc/pressure/cpu, "some"), or None."""
    for line in read_text("/proc/pressure/cpu").splitlines():
        if line.startswith("some"):
            for f in line.split():
                if f.startswith("total="):
                    return int(f[6:])
    return None


def launch_ranks(argvs, out_dir, env, deadline, script):
    """Runs one process per argument list (rank r: argvs[r]), each in its own session, its
    output in out_dir/log-r.txt, until all have exited, or the deadline passed, or one failed
    3 s ago (the others would only wait for their timeout); then stops them (stop_ranks).
    Returns ({rank: the JSON it wrote to out_dir/rank-r.json}, error or None, CPU pressure: the
    share of the wall time in which some task waited for a CPU)."""
    world = len(argvs)
    procs, logs, err = [], [], None
    stall0, w0 = cpu_stall_us(), time.monotonic()
    try:
        for r, argv in enumerate(argvs):
            logs.append(os.path.join(out_dir, f"log-{r}.txt"))
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
        t_end, failed_at = time.monotonic() + deadline, None
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now >= t_end:
                err = f"timed out after {deadline:.0f} s"
                break
            if any(p.poll() not in (None, 0) for p in procs):
                failed_at = failed_at or now
                if now - failed_at > 3.0:
                    break
            time.sleep(0.05)
    finally:
        stop_ranks(procs, out_dir, script)
    stall1, w1 = cpu_stall_us(), time.monotonic()
    psi = (stall1 - stall0) / 1e6 / (w1 - w0) if stall0 is not None and stall1 is not None else None
    results = {}
    for r in range(world):
        path = os.path.join(out_dir, f"rank-{r}.json")
        if os.path.exists(path):
            with open(path) as f:
                results[r] = json.load(f)
    codes = [p.returncode for p in procs]
    if err is None and (any(codes) or len(results) < world):
        err = f"exit codes {codes}, no result from rank(s) {[r for r in range(world) if r not in results]}"
    if err:
        tails = [t for t in (tail(x) for x in logs) if t]
        if tails:
            err += ": " + " | ".join(tails)[-600:]
    return results, err, psi
